"""Reduce: the only module that talks to torch.distributed during calibration.

* Input statistics (unnormalised Hessians, token counts) are SUMMED over the data-parallel group,
  and also over the slot's shard group when its inputs are sequence-parallel; input amax is a MAX
  over the same groups.
* Global weight amax is a MAX over the local shards of one logical weight (its shard group) and
  over the members of its fused group (q/k/v, gate/up).
Collectives are issued in sorted key order so every rank of a group makes the same calls. In a
single process every function here is a pure local computation.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from ..calib.observers import StatsStore
from ..calib.slots import WeightSlot
from .context import ParallelContext, group_size


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _stats_groups(slot: WeightSlot, ctx: ParallelContext) -> list:
    groups = [ctx.dp]
    if slot.sequence_parallel:
        groups.append(ctx.group(slot.layout.shard_group))
    if slot.stats_group is not None:
        groups.append(ctx.group(slot.stats_group))
    return groups


def reduce_stats(store: StatsStore, slots: list[WeightSlot], ctx: ParallelContext,
                 device: torch.device) -> None:
    """Sum Hessians/token counts and MAX input amax over the right groups, in place."""
    slot_of_key = {}
    for slot in slots:
        slot_of_key.setdefault(slot.stats_key, slot)
    for key in sorted(store):
        stats = store[key]
        stats.ensure_allocated(device)
        for group in _stats_groups(slot_of_key[key], ctx):
            if group_size(group) == 1:
                continue
            tokens = torch.tensor([stats.tokens], dtype=torch.float64, device=stats.amax.device)
            _all_reduce(tokens, dist.ReduceOp.SUM, group)
            stats.tokens = int(tokens.item())
            _all_reduce(stats.amax, dist.ReduceOp.MAX, group)
            if stats.hessian_sum is not None:
                _all_reduce(stats.hessian_sum, dist.ReduceOp.SUM, group)


def reduce_global_amax(slots: list[WeightSlot], local_amax: dict[str, torch.Tensor],
                       ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """fused_group -> fp32 0-d global amax (MAX over members and their shards).

    ``local_amax``: slot name -> max |w| of this rank's shard (fp32 0-d).
    """
    members = defaultdict(list)
    for slot in slots:
        members[slot.fused_group].append(slot)
    result = {}
    for group_key in sorted(members):
        group_slots = members[group_key]
        amax = torch.stack([local_amax[s.name] for s in group_slots]).amax()
        shard_groups = {s.layout.shard_group for s in group_slots if s.layout.shard_axis is not None}
        for name in sorted(shard_groups):
            _all_reduce(amax, dist.ReduceOp.MAX, ctx.group(name))
        result[group_key] = amax
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
