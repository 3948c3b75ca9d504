"""torch FSDP2 (``fully_shard``) parameters: layouts of DTensor shards."""

from __future__ import annotations

from ..calib.slots import ShardLayout
from ..errors import LayoutError


def dtensor_layout(param) -> ShardLayout:
    """ShardLayout of a 2-D DTensor sharded on at most one dimension over a 1-D mesh.

    FSDP2 shards dim 0 with ``torch.chunk`` semantics: every rank but the last holds
    ``ceil(rows / world)`` rows, the last ones may hold fewer (or none).
    """
    from torch.distributed.tensor import Replicate, Shard

    placements = param.placements
    if len(placements) != 1:
        raise LayoutError(f"DTensor over a {len(placements)}-D mesh is not supported (need 1-D)")
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
    return ShardLayout(global_shape, local, tuple(offset), axis, "fsdp")
