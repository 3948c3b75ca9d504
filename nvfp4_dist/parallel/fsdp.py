"""torch FSDP2 (``fully_shard``): layouts, context and quantizer state of DTensor parameters.

Calibration never unshards: the search reads ``param.to_local()`` (this rank's rows), and the
quantizer state of a weight is a DTensor with the weight's own mesh and placements, so it is
sharded exactly like the weight and travels with DCP. The one gather is in the fake-quant
forward: FSDP2 hands the module its unsharded weight, so the (16x smaller, fp32) block-scale
buffers are gathered with ``full_tensor()`` to match it (see :func:`state_for_weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calib.slots import ShardLayout
from ..errors import LayoutError
from ..numerics.constants import BLOCK_SIZE
from .context import ParallelContext

FSDP_GROUP = "fsdp"


def dtensor_layout(param) -> ShardLayout:
    """ShardLayout of a 2-D DTensor sharded on at most one dimension over a 1-D mesh.

    FSDP2 shards dim 0 with ``torch.chunk`` semantics: every rank but the last holds
    ``ceil(rows / world)`` rows, the last ones may hold fewer (or none).
    """
    from torch.distributed.tensor import Replicate, Shard

    placements = param.placements
    if len(placements) != 1:
        raise LayoutError(f"DTensor over a {len(placements)}-D mesh is not supported (need 1-D): "
                          "HSDP meshes are not handled; shard over one mesh dimension")
    placement = placements[0]
    global_shape = tuple(int(s) for s in param.shape)
    if isinstance(placement, Replicate):
        return ShardLayout.whole(global_shape)
    if not isinstance(placement, Shard):
        raise LayoutError(f"unsupported DTensor placement {placement}")
    axis = placement.dim
    local = tuple(int(s) for s in param.to_local().shape)
    mesh = param.device_mesh
    rank = mesh.get_local_rank()
    chunk = -(-global_shape[axis] // mesh.size())
    offset = [0, 0]
    offset[axis] = min(rank * chunk, global_shape[axis])
    return ShardLayout(global_shape, local, tuple(offset), axis, FSDP_GROUP)


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def fsdp_mesh(model: nn.Module):
    """The device mesh of ``model``'s DTensor parameters (None when it has none); one mesh only."""
    dtensor = _dtensor_cls()
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if isinstance(p, dtensor)}
    if len(meshes) > 1:
        raise LayoutError(f"the model's parameters live on {len(meshes)} device meshes; "
                          "nvfp4_dist handles one FSDP2 mesh per model")
    return next(iter(meshes.values()), None)


def fsdp_context(model: nn.Module, data_split: bool = True) -> ParallelContext:
    """Context of an FSDP2 model: its mesh group as "fsdp".

    ``data_split=True``: each rank feeds its own share of the calibration data (FSDP is data
    parallel), statistics are summed over the mesh. ``False``: every rank feeds all the data and
    nothing is summed, which makes the result bit-identical to one process.
    """
    mesh = fsdp_mesh(model)
    if mesh is None:
        raise LayoutError("fsdp_context: the model has no DTensor parameters; apply "
                          "torch.distributed.fsdp.fully_shard first")
    if mesh.ndim != 1:
        raise LayoutError(f"fsdp_context: a {mesh.ndim}-D mesh is not supported (need 1-D)")
    group = mesh.get_group()
    return ParallelContext(dp=group if data_split else None, groups={FSDP_GROUP: group})


def reshard_all(model: nn.Module) -> None:
    """Free every FSDP2 unsharded parameter (the root keeps its weights unsharded after a
    forward), so that modules expose their DTensor shards again. Frees memory; communicates
    nothing."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def state_like(param, value: torch.Tensor) -> torch.Tensor:
    """``value`` (this rank's quantizer state of ``param``) as a DTensor sharded like ``param``.

    Block-shaped state ``[local_rows, local_cin / 16]`` takes the weight's placements (global
    shape ``[rows, cin / 16]``); 0-d state is replicated. Plain parameters: ``value`` unchanged.
    """
    dtensor = _dtensor_cls()
    if not isinstance(param, dtensor):
        return value
    from torch.distributed.tensor import Replicate

    mesh = param.device_mesh
    if value.dim() == 0:
        return dtensor.from_local(value, mesh, [Replicate()], run_check=False)
    shape = (int(param.shape[0]), int(param.shape[1]) // BLOCK_SIZE)
    return dtensor.from_local(value, mesh, list(param.placements), run_check=False, shape=shape,
                              stride=(shape[1], 1))


def state_for_weight(state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The quantizer state matching ``weight`` as the caller holds it: the local shard for a
    DTensor weight, the gathered whole (``full_tensor``, scale buffers only) for the unsharded
    weight FSDP2 hands a module in its forward; plain tensors unchanged."""
    dtensor = _dtensor_cls()
    if not isinstance(state, dtensor):
        return state
    if isinstance(weight, dtensor):
        return state.to_local()
    return state.full_tensor()


def is_fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP1 (``FullyShardedDataParallel``) wrappers."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
