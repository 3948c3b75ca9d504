"""torch FSDP2 (``fully_shard``): layouts, context and quantizer state of DTensor parameters.

Calibration never unshards: the search reads ``param.to_local()`` (this rank's rows), and the
quantizer state of a weight is a DTensor with the weight's own mesh and placements, so it is
sharded exactly like the weight and travels with DCP. The one gather is in the fake-quant
forward: FSDP2 hands the module its unsharded weight, so the (16x smaller, fp32) block-scale
buffers are gathered with ``full_tensor()`` to match it (see :func:`state_for_weight`).

Meshes: 1-D (``Shard(d)``: FSDP) or 2-D with placements ``(Replicate(), Shard(d))`` (HSDP: the
first mesh dimension holds identical replicas, the second shards). A weight's shard group is the
mesh dimension that shards it; replicas hold identical weights, so MAX over that group alone
gives the global amax.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layout.naming import ExportNaming, PassThrough
from ..layout.roles import GroupRole
from ..layout.slots import ShardLayout
from ..errors import LayoutError
from ..numerics.constants import BLOCK_SIZE
from .context import ParallelContext

FSDP_GROUP = GroupRole.FSDP


def shard_placement(tensor) -> tuple[int | None, int | None]:
    """``(mesh dim, tensor dim)`` of the one ``Shard`` placement of a DTensor, ``(None, None)``
    when it is replicated on every mesh dimension.

    Accepted: 1-D ``(Shard(d),)`` / ``(Replicate(),)``; 2-D (HSDP) ``(Replicate(), Shard(d))`` /
    ``(Replicate(), Replicate())``. Anything else (two Shard placements, Shard on the replica
    dimension, Partial, meshes of more dimensions) raises LayoutError.
    """
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(tensor.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    others = [p for p in placements if not isinstance(p, (Shard, Replicate))]
    hsdp_ok = len(placements) == 2 and shard_dims in ([], [1])
    if others or not (len(placements) == 1 or hsdp_ok):
        raise LayoutError(
            f"DTensor placements {placements} over a {len(placements)}-D mesh are not supported: "
            "nvfp4_dist handles FSDP2 over a 1-D mesh (Shard) and HSDP over a 2-D mesh "
            "(Replicate(), Shard(d)); shard over the last mesh dimension only")
    if not shard_dims:
        return None, None
    return shard_dims[0], placements[shard_dims[0]].dim


def _chunk_offset(tensor, mesh_dim: int, axis: int) -> int:
    """Offset of this rank's piece along ``axis`` under FSDP2's ``torch.chunk`` split over mesh
    dimension ``mesh_dim``: every rank but the last holds ``ceil(n / ranks)``, the last ones may
    hold fewer (or none)."""
    mesh = tensor.device_mesh
    n = int(tensor.shape[axis])
    chunk = -(-n // mesh.size(mesh_dim))
    return min(mesh.get_local_rank(mesh_dim) * chunk, n)


def dtensor_split(tensor) -> tuple[int, int, object] | None:
    """``(tensor axis, this rank's offset along it, ProcessGroup of the mesh dimension that
    shards it)`` of a DTensor of any dimension; None when it is replicated everywhere."""
    mesh_dim, axis = shard_placement(tensor)
    if mesh_dim is None:
        return None
    return axis, _chunk_offset(tensor, mesh_dim, axis), tensor.device_mesh.get_group(mesh_dim)


def dtensor_layout(param) -> ShardLayout:
    """ShardLayout of a 2-D DTensor parameter (FSDP2 1-D mesh or HSDP 2-D mesh, see
    :func:`shard_placement`); the shard group is the mesh dimension that shards it."""
    mesh_dim, axis = shard_placement(param)
    global_shape = tuple(int(s) for s in param.shape)
    if mesh_dim is None:
        return ShardLayout.whole(global_shape)
    local = tuple(int(s) for s in param.to_local().shape)
    offset = [0, 0]
    offset[axis] = _chunk_offset(param, mesh_dim, axis)
    return ShardLayout(global_shape, local, tuple(offset), axis, FSDP_GROUP)


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor) -> bool:
    return isinstance(tensor, _dtensor_cls())


def fsdp_mesh(model: nn.Module):
    """The device mesh of ``model``'s DTensor parameters (None when it has none); one mesh only."""
    dtensor = _dtensor_cls()
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if isinstance(p, dtensor)}
    if len(meshes) > 1:
        raise LayoutError(f"the model's parameters live on {len(meshes)} device meshes; "
                          "nvfp4_dist handles one FSDP2 mesh per model")
    return next(iter(meshes.values()), None)


def fsdp_context(model: nn.Module, data_split: bool = True) -> ParallelContext:
    """Context of an FSDP2 / HSDP model: the mesh dimension that shards the weights as "fsdp".

    ``data_split=True``: each rank feeds its own share of the calibration data (FSDP is data
    parallel), statistics are summed over every rank of the mesh (for HSDP both dimensions:
    replicas see different data too). ``False``: every rank feeds all the data and nothing is
    summed, which makes the result bit-identical to one process.
    """
    mesh = fsdp_mesh(model)
    if mesh is None:
        raise LayoutError("fsdp_context: the model has no DTensor parameters; apply "
                          "torch.distributed.fsdp.fully_shard first")
    dtensor = _dtensor_cls()
    for name, param in model.named_parameters():
        if isinstance(param, dtensor):
            try:
                shard_placement(param)
            except LayoutError as exc:
                raise LayoutError(f"fsdp_context: parameter {name}: {exc}") from None
    if mesh.ndim == 1:
        group = mesh.get_group()
        return ParallelContext(dp=group if data_split else None, groups={FSDP_GROUP: group})
    # HSDP: weights are sharded over the last mesh dimension. The statistics group spans both
    # dimensions: torch's flattened mesh (created once, cached by the mesh, on every rank;
    # DeviceMesh has no public API for one group over several dimensions).
    shard = mesh.get_group(1)
    dp = mesh._flatten().get_group() if data_split else None
    return ParallelContext(dp=dp, groups={FSDP_GROUP: shard})


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
    shape ``[rows, cin / 16]``; HSDP: replicated over the replica dimension, sharded over the
    other); 0-d state is replicated on every mesh dimension. Plain parameters: ``value`` unchanged.
    """
    dtensor = _dtensor_cls()
    if not isinstance(param, dtensor):
        return value
    from torch.distributed.tensor import Replicate

    mesh = param.device_mesh
    if value.dim() == 0:
        return dtensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
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


class DTensorNaming(ExportNaming):
    """Exported names of HF-style models, plain or FSDP2: state keys are the exported keys;
    DTensors are split as their placement says (FSDP2: ``torch.chunk`` along the shard dim, over
    the mesh dimension that shards them: HSDP replicas are other holders of the same pieces),
    plain tensors are whole."""

    def passthrough(self, key, module, tensor):
        whole = ((key, slice(None)),)
        split = dtensor_split(tensor) if is_dtensor(tensor) else None
        if split is None:
            return PassThrough(whole)
        axis, offset, group = split
        return PassThrough(whole, axis, offset, group)
