"""transformers fused experts under torch FSDP2 (``fully_shard``): layouts and quantizer state.

FSDP2 shards a 3-D experts parameter ``[E, rows, cin]`` (``gate_up_proj`` / ``down_proj``, see
:mod:`nvfp4_dist.parallel.hf_experts`) along one dimension over the mesh dimension that shards it
(:func:`~nvfp4_dist.parallel.fsdp.shard_placement`), with ``torch.chunk``'s split:

* dim 0, the experts (``fully_shard``'s default): each rank holds whole experts, ``ceil(E / n)``
  per rank (uneven E: the last ranks hold fewer, or none). Expert ``e``'s slot is a row split
  over the FSDP group in which the rank that holds it has every row and the others none: that
  rank searches and exports it (:func:`held_elsewhere`: the others list no export piece), and the
  MAX of the global amax and the sums of the per-layer report over the group give every rank the
  holder's values;
* dim 1, the rows (``shard_placement_fn=lambda p: Shard(1)``): every rank holds its rows of every
  expert, and each expert's slot is a row shard over the FSDP group exactly like a 2-D FSDP2
  weight (global amax: MAX over the group; the export gathers packed codes and FP8 scales);
* dim 2, the input channels: refused (the observer would have to split every expert's input).

Statistics: FSDP2 unshards the experts for the forward, so the observer of
:class:`~nvfp4_dist.parallel.hf_experts.HFExpertsAdapter` (unchanged) sees the whole module and
accumulates every expert's statistics from this rank's tokens; every rank keeps slots for every
expert, so the sums over the data-parallel ranks are those of any FSDP2 weight, and dead experts
(no token on any rank) are known, and given their borrowed input amax, everywhere. Only the
search is per rank: each rank searches the experts (or rows) it holds, never gathering a weight.

State: DTensor buffers sharded like the weight, so that DCP saves and reshards them. Block state
``[E, rows, cin/16]`` takes the weight's placements; the per-expert vectors ``[E]`` (global and
input amax) are replicated: the global amax is the MAX over the group, the input statistics are
reduced over the data-parallel ranks, so both are the same on every rank, and the W4A4 forward
reads an expert's input scale without communication. The fake-quant forward sees the unsharded
weight and gathers the (16x smaller) block state once per call
(:func:`~nvfp4_dist.parallel.fsdp.state_for_weight`), as for 2-D weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LayoutError
from ..layout.slots import ShardLayout
from .context import ParallelContext
from .fsdp import FSDP_GROUP, dtensor_split, is_dtensor, shard_placement
from .hf_experts import HFExpertsAdapter, _param_names, is_fused_experts


def _local_index(tensor: torch.Tensor, expert: int) -> int | None:
    """Index of expert ``expert`` in this rank's part of ``tensor`` (a 3-D experts weight or its
    ``[E, ...]`` state): the expert itself unless the experts axis is split; None when another
    rank holds the expert."""
    split = dtensor_split(tensor) if is_dtensor(tensor) else None
    if split is None or split[0] != 0:
        return expert
    offset, held = split[1], int(tensor.to_local().shape[0])
    return expert - offset if offset <= expert < offset + held else None


def local_expert(param: torch.Tensor, expert: int) -> torch.Tensor:
    """This rank's part of expert ``expert`` of a 3-D experts parameter as a ``[rows, cin]``
    view: the expert's slice of a plain tensor; of a DTensor, the expert's slice of the local
    tensor (its rows when the rows are split), or an empty ``[0, cin]`` tensor when another rank
    holds the expert. No copy, no communication."""
    if not is_dtensor(param):
        return param[expert]
    local = param.to_local()
    index = _local_index(param, expert)
    return local[index] if index is not None else local.new_empty((0, local.shape[-1]))


def expert_layout(param: torch.Tensor, expert: int) -> ShardLayout:
    """ShardLayout of expert ``expert`` of a 3-D experts parameter, plain or FSDP2 (see the
    module docstring)."""
    rows, cin = int(param.shape[1]), int(param.shape[2])
    split = dtensor_split(param) if is_dtensor(param) else None
    if split is None:
        return ShardLayout.whole((rows, cin))
    axis, offset, _ = split
    if axis == 0:  # all rows on the rank that holds the expert, none on the others
        held = rows if _local_index(param, expert) is not None else 0
        return ShardLayout((rows, cin), (held, cin), (0, 0), 0, FSDP_GROUP)
    if axis == 1:
        local_rows = int(param.to_local().shape[1])
        return ShardLayout((rows, cin), (local_rows, cin), (offset, 0), 0, FSDP_GROUP)
    raise LayoutError(f"a fused-experts parameter sharded over its input channels (dim {axis}) is not "
                      "supported; shard it over dim 0 (experts) or dim 1 (rows)")


def held_elsewhere(slot) -> bool:
    """Whether another rank holds the whole of expert slot ``slot`` and this rank none of it
    (FSDP2 experts sharded over the expert axis): that rank exports it."""
    param = slot.parameter()
    if slot.expert is None or not is_dtensor(param):
        return False
    split = dtensor_split(param)
    return split is not None and split[0] == 0 and _local_index(param, slot.expert) is None


def attach_expert_state(module: nn.Module, name: str, param: torch.Tensor, expert: int,
                        value: torch.Tensor, fill: float) -> None:
    """Write expert ``expert``'s quantizer tensor ``value`` (this rank's part: ``[rows_local,
    cin/16]``, possibly empty, or 0-d, the same on every rank) into the DTensor buffer ``name``
    of ``module`` (block state sharded like the DTensor ``param``, ``[E]`` vectors replicated;
    see the module docstring), created on first use filled with ``fill``. Block state of an
    expert another rank holds is not written here."""
    from torch.distributed.tensor import DTensor, Replicate

    per_block = value.dim() > 0
    n_experts = int(param.shape[0])
    shape = (n_experts, int(param.shape[1]), int(value.shape[-1])) if per_block else (n_experts,)
    buf = getattr(module, name, None)
    if buf is None or not is_dtensor(buf) or tuple(buf.shape) != shape:
        local_param = param.to_local()
        if per_block:
            placements = list(param.placements)
            local_shape = (*local_param.shape[:2], shape[2])
        else:
            placements, local_shape = [Replicate()] * param.device_mesh.ndim, shape
        local = torch.full(local_shape, fill, dtype=value.dtype, device=value.device)
        buf = DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=shape,
                                 stride=torch.empty(shape, device="meta").stride())
        module.register_buffer(name, buf, persistent=True)
    index = _local_index(buf, expert)
    if index is not None:
        with torch.no_grad():
            buf.to_local()[index] = value


def expert_state(buf: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s part of a quantizer buffer ``[E, ...]``: ``buf[expert]`` of a plain
    buffer; of a DTensor buffer, this rank's part (block state of an expert another rank holds:
    empty, ``[0, cin/16]``). No communication."""
    if not is_dtensor(buf):
        return buf[expert]
    local = buf.to_local()
    index = _local_index(buf, expert)
    return local[index] if index is not None else local.new_empty((0, local.shape[-1]))


class FSDPExpertsAdapter(HFExpertsAdapter):
    """transformers fused experts whose parameters FSDP2 shards (see the module docstring)."""

    accepts_dtensors = True

    def matches(self, module):
        return is_fused_experts(module) and any(is_dtensor(getattr(module, p)) for p in _param_names(module))

    def slots(self, name, module, ctx: ParallelContext):
        if ctx.group(FSDP_GROUP) is None:
            raise LayoutError(f"{name}: fused experts sharded as DTensors need the FSDP2 context "
                              "(ctx=fsdp_context(model), or no ctx to detect it); tensor-parallel "
                              "plans of fused experts are not supported")
        for param in _param_names(module):
            weight = getattr(module, param)
            if not is_dtensor(weight):
                continue
            try:
                _, axis = shard_placement(weight)
            except LayoutError as exc:
                raise LayoutError(f"{name}.{param}: {exc}") from None
            if axis == 2:
                raise LayoutError(f"{name}.{param}: FSDP2 shards it over its input channels (dim 2), "
                                  "which nvfp4_dist does not calibrate; shard fused experts over dim 0 "
                                  "(experts, fully_shard's default) or dim 1 (rows)")
        return super().slots(name, module, ctx)

    def expert_layout(self, weight, expert):
        return expert_layout(weight, expert)
