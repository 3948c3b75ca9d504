"""Access/writeback: the local shard of a slot's weight as a plain ``[rows, cin]`` tensor.

* plain parameters and Megatron local partitions: the parameter itself (a view);
* FSDP2 DTensors: ``to_local()``, the shard this rank owns (no unshard, no gather); writes into
  it reach the sharded parameter. FSDP2 leaves the ROOT module's weights unsharded after a
  forward, so :func:`local_shards` reshards (frees, no communication) before shards are read;
* FSDP1 (``FullyShardedDataParallel``, flat parameters): no per-weight shard exists, so
  :func:`local_shards` falls back to ``summon_full_params(writeback=True)``: every rank sees the
  whole weights (a gather, documented as the FSDP1 cost) and writes reach the flat shards;
* fused experts: the expert's slice of the 3-D parameter (FSDP2: of its local tensor, see
  :func:`nvfp4_dist.parallel.hf_experts_fsdp.local_expert`).
Writes into the yielded tensor land in the model (the context writes back where the tensor is a
copy).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..layout.slots import WeightSlot
from .fsdp import is_fsdp1, reshard_all
from .hf_experts_fsdp import local_expert


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: ``to_local()`` of a DTensor (FSDP2 weights and quantizer
    state), ``t`` itself otherwise. No copy, no communication."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_weight(slot: WeightSlot) -> torch.Tensor:
    """The slot's local shard as a plain tensor view (no copy, no communication)."""
    if slot.expert is not None:
        return local_expert(slot.parameter().data, slot.expert)
    return local_tensor(slot.parameter().data)


def expose_local_shards(model: nn.Module) -> None:
    """Make every FSDP2 module expose its DTensor shard again (frees the unsharded weights the
    root keeps after a forward; no communication). FSDP1 has no per-weight shard: see
    :func:`local_shards`."""
    reshard_all(model)


@contextlib.contextmanager
def local_shards(model: nn.Module):
    """Context in which every module exposes the weight this rank calibrates (see module
    docstring): FSDP2 resharded, FSDP1 summoned with writeback, others untouched."""
    if is_fsdp1(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=True):
            yield
        return
    reshard_all(model)
    yield
