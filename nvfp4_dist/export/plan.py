"""The plan of an export: which pieces exist, in which order, who writes each, and whether the
whole may be written at all. Every rank builds the same plan from every rank's inventory.

* order: piece keys in order of first appearance over the ranks' lists, taken in rank order:
  one process keeps its state_dict order (``save_pretrained``'s), and every rank walks the same
  list, so the gathers of a shard group happen in the same order on all its members (no
  deadlock, whatever groups overlap).
* tied duplicates: dropped on every rank when any rank saw the tie (a rank holding an empty
  shard cannot see it, and must not write the duplicate either).
* writers: rotate over each piece's holders, so every rank writes its share of the files; a
  replica (HSDP, data parallel) that is not the writer's shard group writes nothing.
* problems: every rank's, raised together on every rank, then the fused-group checks over the
  global amaxes and dense modules of all ranks; all of it before a staging directory exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ExportError
from ..parallel.reduce import world_objects
from .checks import check_fused_groups
from .pieces import RankInventory


@dataclass(frozen=True)
class Plan:
    """The agreed plan (the same on every rank).

    order: piece keys to write. writers: piece key -> global rank that writes it. quantized:
    exported NVFP4 modules (slot order, then rank order). ignore: exported names of the modules
    kept in high precision, sorted.
    """

    order: tuple[str, ...]
    writers: dict[str, int]
    quantized: tuple[str, ...]
    ignore: tuple[str, ...]


def _first_appearance(lists) -> list:
    out: dict = {}
    for items in lists:
        for item in items:
            out.setdefault(item, None)
    return list(out)


def _global_amax(inventories: list[RankInventory], problems: list[str]) -> dict[str, torch.Tensor]:
    """Exported NVFP4 module -> global amax over every rank; a module two slots export is a problem."""
    owner: dict[str, str] = {}
    amax: dict[str, torch.Tensor] = {}
    for inventory in inventories:
        for part, slot, value in inventory.parts:
            if part in owner and owner[part] != slot:
                problems.append(f"{part}: exported by two slots ({owner[part]}, {slot})")
                continue
            owner.setdefault(part, slot)
            amax.setdefault(part, value)
    return amax


def agree(inventory: RankInventory) -> Plan:
    """Exchange inventories (one all-gather; nothing in one process) and build the plan; raise
    ExportError on every rank when any rank found a problem or a fused group is not alike."""
    inventories = world_objects(inventory)
    problems = _first_appearance(inv.problems for inv in inventories)
    amax = _global_amax(inventories, problems)
    if problems:
        raise ExportError("cannot export:\n  " + "\n  ".join(_first_appearance([problems])))
    check_fused_groups(amax, {name for inv in inventories for name in inv.dense})

    tied = frozenset().union(*(inv.tied for inv in inventories))
    order = [key for key in _first_appearance(inv.keys for inv in inventories) if key not in tied]
    holders: dict[str, list[int]] = {}
    for rank, inv in enumerate(inventories):
        for key in inv.keys:
            holders.setdefault(key, []).append(rank)
    writers = {key: holders[key][i % len(holders[key])] for i, key in enumerate(order)}
    ignore = sorted({name for inv in inventories for name in inv.ignore})
    return Plan(tuple(order), writers, tuple(amax), tuple(ignore))
