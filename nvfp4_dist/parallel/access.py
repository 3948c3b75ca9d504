"""Access/writeback: the local shard of a slot's weight as a plain ``[rows, cin]`` tensor.

* plain parameters and Megatron local partitions: the parameter itself (a view);
* FSDP2 DTensors: ``to_local()``, the shard this rank owns (no unshard, no gather); writes into
  it reach the sharded parameter;
* fused experts: the expert's slice of the 3-D parameter.
Writes into the yielded tensor land in the model (the context writes back where the tensor is a
copy).
"""

from __future__ import annotations

import contextlib

import torch

from ..calib.slots import WeightSlot


def _plain(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_weight(slot: WeightSlot) -> torch.Tensor:
    """The slot's local shard as a plain tensor view (no copy, no communication)."""
    param = _plain(slot.parameter().data)
    return param if slot.expert is None else param[slot.expert]


@contextlib.contextmanager
def weight_access(slot: WeightSlot, writeback: bool = False):
    """Yield the slot's local shard; with ``writeback`` the (possibly modified) tensor is
    copied back if it is not a view of the parameter's storage."""
    w = local_weight(slot)
    yield w
    if writeback:
        target = local_weight(slot)
        if target.data_ptr() != w.data_ptr():
            with torch.no_grad():
                target.copy_(w)
