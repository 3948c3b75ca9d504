"""Reduce: the only module that talks to torch.distributed (thin calls on the framework's groups).

* Input statistics (unnormalised Hessians, token counts) are SUMMED over the data-parallel group,
  and also over the slot's shard group when its inputs are sequence-parallel; input amax is a MAX
  over the same groups, and also over the shard group when input channels are split (row
  parallel: each rank sees its channels of every token).
* Weight amax is a MAX over the local shards of one logical weight (its shard group); the fused
  group's global amax (q/k/v, gate/up) is then the MAX over its members, locally.
* Gathers (export and tests only): the whole of a slot's per-shard tensor along its shard axis.
Collectives are issued in sorted key order so every rank of a group makes the same calls, batched
into one collective per group and kind. In a single process every function here is a pure local
computation.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from ..layout.slots import ShardLayout, WeightSlot
from ..layout.stats import StatsStore
from .context import ParallelContext, group_size


# Elements per batched collective (64 MiB of fp32): bounds the temporary concatenation.
_BUCKET_ELEMS = 1 << 24


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _batched_all_reduce(tensors: list[torch.Tensor], op, group) -> None:
    """All-reduce ``tensors`` (same dtype and device) in place with as few collectives as the
    bucket bound allows: flattened, concatenated, reduced, copied back. Element-wise results are
    those of one collective per tensor."""
    if group_size(group) == 1 or not tensors:
        return
    bucket, size = [], 0
    for tensor in tensors + [None]:
        if tensor is None or (bucket and size + tensor.numel() > _BUCKET_ELEMS):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=op, group=group)
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))
            bucket, size = [], 0
        if tensor is not None:
            bucket.append(tensor)
            size += tensor.numel()


def _stats_groups(slot: WeightSlot, ctx: ParallelContext) -> list:
    expert_data = slot.moe.data_group if slot.moe is not None else None
    groups = [ctx.dp if expert_data is None else ctx.group(expert_data)]
    if slot.sequence_parallel:
        groups.append(ctx.group(slot.layout.shard_group))
    return groups


def _by_group(keyed_groups) -> list[tuple[object, list[str]]]:
    """``(key, [groups])`` pairs -> ``[(group, [keys])]`` for groups of more than one rank, in
    order of first appearance (the same on every rank: keys come sorted)."""
    order: list = []
    keys: dict[int, list[str]] = {}
    for key, groups in keyed_groups:
        for group in groups:
            if group_size(group) == 1:
                continue
            if id(group) not in keys:
                order.append(group)
                keys[id(group)] = []
            keys[id(group)].append(key)
    return [(group, keys[id(group)]) for group in order]


def reduce_stats(store: StatsStore, slots: list[WeightSlot], ctx: ParallelContext,
                 device: torch.device) -> None:
    """Sum Hessians/token counts and MAX input amax over the right groups, in place.

    One batched collective per group and kind (tokens, amax, Hessians) instead of one per
    weight; the sums are the same numbers a per-weight all-reduce gives.
    """
    slot_of_key = {}
    for slot in slots:
        slot_of_key.setdefault(slot.stats_key, slot)
    for key in store:
        store[key].ensure_allocated(device)
    plan = _by_group((key, _stats_groups(slot_of_key[key], ctx)) for key in sorted(store))
    for group, keys in plan:
        stats = [store[key] for key in keys]
        # Token counts travel as float64: exact for any count below 2^53.
        tokens = torch.tensor([s.tokens for s in stats], dtype=torch.float64, device=stats[0].amax.device)
        _all_reduce(tokens, dist.ReduceOp.SUM, group)
        for s, n in zip(stats, tokens.tolist()):
            s.tokens = int(n)
        amax = torch.stack([s.amax for s in stats])
        _all_reduce(amax, dist.ReduceOp.MAX, group)
        for s, a in zip(stats, amax):
            s.amax = a.clone()
        _batched_all_reduce([s.hessian_sum for s in stats if s.hessian_sum is not None],
                            dist.ReduceOp.SUM, group)
    # A weight whose input channels are split (row parallel) sees part of each token: its
    # Hessian blocks are its own, but the input amax is the MAX over the whole input.
    channel_split = ((key, [ctx.group(slot_of_key[key].layout.shard_group)]) for key in sorted(store)
                     if slot_of_key[key].layout.shard_axis == 1)
    for group, keys in _by_group(channel_split):
        amax = torch.stack([store[key].amax for key in keys])
        _all_reduce(amax, dist.ReduceOp.MAX, group)
        for key, a in zip(keys, amax):
            store[key].amax = a.clone()


def reduce_weight_amax(slots: list[WeightSlot], local_amax: dict[str, torch.Tensor],
                       ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """slot name -> fp32 0-d amax of the whole weight (MAX over its shards).

    ``local_amax``: slot name -> max |w| of this rank's shard (fp32 0-d). One MAX collective per
    shard group, over every weight sharded on it. (A fused group's global amax is the MAX over
    its members' values: a local step, see :func:`nvfp4_dist.calib.stages.reduce`.)
    """
    result = {name: local_amax[name] for name in sorted(local_amax)}
    by_group = defaultdict(list)
    for slot in sorted(slots, key=lambda s: s.name):
        if slot.layout.shard_axis is not None:
            by_group[slot.layout.shard_group].append(slot.name)
    for group_name in sorted(by_group):
        names = by_group[group_name]
        amax = torch.stack([result[n] for n in names])
        _all_reduce(amax, dist.ReduceOp.MAX, ctx.group(group_name))
        for n, a in zip(names, amax):
            result[n] = a.clone()
    return result


def reduce_report_sums(slots: list[WeightSlot], sums: dict[str, torch.Tensor],
                       ctx: ParallelContext) -> None:
    """Sum each weight's report sums over its shard group, in place (sorted slot order)."""
    for slot in sorted(slots, key=lambda s: s.name):
        if slot.layout.shard_axis is None:
            continue
        group = ctx.group(slot.layout.shard_group)
        if group_size(group) > 1:
            buf = sums[slot.name].to(_group_device(group))
            dist.all_reduce(buf, group=group)
            sums[slot.name] = buf.cpu()


def _group_device(group) -> torch.device:
    """The device collectives of ``group`` need (CUDA for NCCL, CPU for gloo)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_max_by_key(values: dict[str, torch.Tensor], groups: dict[str, str | None],
                      ctx: ParallelContext) -> None:
    """MAX-reduce each 0-d ``values[key]`` over the group named ``groups[key]``, in place.

    Keys are visited in sorted order, so every rank of a group must hold the same keys for it
    (MoE: the expert families of a layer exist on every expert-parallel rank).
    """
    for key in sorted(values):
        _all_reduce(values[key], dist.ReduceOp.MAX, ctx.group(groups.get(key)))


def gather_objects(obj, group_name: str | None, ctx: ParallelContext) -> list:
    """``obj`` from every rank of the group named ``group_name``, in group-rank order
    (``[obj]`` when the group has one rank)."""
    group = ctx.group(group_name)
    if group_size(group) == 1:
        return [obj]
    out = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# Gathers: export (and tests) only, never calibration, which works on local shards. A file
# format that stores a tensor whole gets the small packed results (codes, FP8 scales) gathered,
# never the high-precision weight. Shards may be uneven (FSDP2's torch.chunk split) or empty:
# ranks first share (offset, size) along the shard axis, pieces are padded to the largest,
# gathered, trimmed and placed by offset.


def _device_for(group, tensor: torch.Tensor) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device if tensor.device.type == "cpu" else torch.device("cpu")


def gather_along(tensor: torch.Tensor, axis: int, offset: int, group, dst: int | None = None):
    """Concatenate every group rank's ``tensor`` along ``axis`` by its ``offset``.

    ``dst``: global rank that receives the result (others get None); None: every rank does.
    The tensors must agree on every other dimension and on dtype.
    """
    world = group_size(group)
    if world == 1:
        return tensor
    device = _device_for(group, tensor)
    meta = torch.tensor([offset, tensor.shape[axis]], dtype=torch.int64, device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    sizes = [int(m[1]) for m in metas]
    offsets = [int(m[0]) for m in metas]
    width = max(sizes)
    # uint8/float8 travel as uint8 bytes: not every backend reduces or gathers float8.
    carrier = tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor
    padded_shape = list(carrier.shape)
    padded_shape[axis] = width
    padded = torch.zeros(padded_shape, dtype=carrier.dtype, device=device)
    padded.narrow(axis, 0, carrier.shape[axis]).copy_(carrier)
    me = dist.get_rank()
    if dst is None:
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded, group=group)
    else:
        pieces = [torch.empty_like(padded) for _ in range(world)] if me == dst else None
        dist.gather(padded, pieces, dst=dst, group=group)
        if me != dst:
            return None
    order = sorted(range(world), key=lambda r: offsets[r])
    whole = torch.cat([pieces[r].narrow(axis, 0, sizes[r]) for r in order], dim=axis)
    whole = whole.to(tensor.device)
    return whole.view(tensor.dtype) if carrier is not tensor else whole


def gather_slot_tensor(tensor: torch.Tensor, layout: ShardLayout, ctx: ParallelContext,
                       dst: int | None = None, elems_per_col: int = 1):
    """The whole of a per-shard tensor of a slot (weight, codes or block scales), gathered over
    the slot's shard group along its shard axis.

    ``elems_per_col``: weight input channels per column of ``tensor`` along axis 1 (1 for the
    weight, 2 for packed codes, 16 for block scales), to turn the layout's channel offset into a
    column offset.
    """
    if not layout.is_sharded:
        return tensor
    axis = layout.shard_axis
    offset = layout.offset[axis] // (elems_per_col if axis == 1 else 1)
    return gather_along(tensor, axis, offset, ctx.group(layout.shard_group), dst=dst)


def world_objects(obj) -> list:
    """``obj`` from every rank of WORLD in rank order (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank of WORLD (``obj`` itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def group_ranks(group) -> list[int]:
    """Global ranks of ``group`` ([this rank] for None or a single process)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return [dist.get_rank() if dist.is_available() and dist.is_initialized() else 0]
    return dist.get_process_group_ranks(group)


# GPTQ under row parallelism (input channels split over a tensor-parallel group). Observation:
# every rank gathers the layer's whole input, so it accumulates the full Hessian with the cross
# terms between ranks' channels. Sweep: rank r sweeps its columns after the scaled errors of
# every earlier rank's columns have been applied to them, then sends its own to the later ranks
# (point to point, in rank order; see nvfp4_dist.calib.stages).


def gather_input_channels(x: torch.Tensor, group) -> torch.Tensor:
    """``x [..., c]`` of every rank of ``group`` concatenated along the last dimension in
    group-rank order (the whole input of a row-parallel linear); ``x`` itself for one rank."""
    world = group_size(group)
    if world == 1:
        return x
    device = _device_for(group, x)
    part = x.detach().to(device).contiguous()
    pieces = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(pieces, part, group=group)
    return torch.cat(pieces, dim=-1).to(x.device)


class ErrorRelay:
    """Scaled GPTQ errors passed down a group in rank order: :meth:`incoming` receives the
    earlier ranks' shards (rank order), :meth:`send` posts this rank's to every later rank without
    blocking. A rank may run one shard ahead of the ranks it feeds: sends of the previous shard
    are waited for before the next ones are posted, and :meth:`finish` waits for the last (call
    it on every rank once the shards are done). Every rank must relay its group's shards in the
    same order (the search visits slots in inventory order on every rank)."""

    def __init__(self):
        self._pending: list = []

    def incoming(self, shape: tuple[int, int], group, device: torch.device):
        """Yield ``(column start, err [rows, width] fp32)`` from group ranks 0 .. r-1 in order
        (equal widths, ``shape`` = this rank's); every receive is posted at once and waited for
        when its chunk is asked for."""
        me = dist.get_rank(group)
        rows, width = shape
        # a tensor on the group's device (CUDA for NCCL), moved to ``device`` by the consumer
        probe = torch.empty(0, device=device)
        carrier = _device_for(group, probe)
        bufs = [torch.empty(rows, width, dtype=torch.float32, device=carrier) for _ in range(me)]
        works = [dist.irecv(buf, src=dist.get_global_rank(group, r), group=group) for r, buf in enumerate(bufs)]
        for r, (buf, work) in enumerate(zip(bufs, works)):
            work.wait()
            yield r * width, buf

    def send(self, err: torch.Tensor, group) -> None:
        """Post ``err`` to every later rank of ``group`` (non-blocking; see the class docstring)."""
        self.finish()
        me, world = dist.get_rank(group), group_size(group)
        if me + 1 >= world:
            return
        buf = err.to(_device_for(group, err), torch.float32).contiguous()
        self._pending = [(buf, dist.isend(buf, dst=dist.get_global_rank(group, r), group=group))
                         for r in range(me + 1, world)]

    def finish(self) -> None:
        """Wait for the posted sends."""
        for _, work in self._pending:
            work.wait()
        self._pending = []
