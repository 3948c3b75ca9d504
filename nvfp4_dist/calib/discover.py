"""Discover: walk a model, match include/exclude patterns, and collect WeightSlots."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import LayoutError
from ..numerics.constants import BLOCK_SIZE
from ..parallel.context import ParallelContext
from ..parallel import hf_experts  # noqa: F401  (registers the transformers fused-experts adapter)
from ..parallel.layouts import LayoutAdapter, find_adapter
from .slots import WeightSlot


@dataclass
class Inventory:
    """Discovery result: slots to quantize, grouped by module, and what was skipped."""

    slots: list[WeightSlot] = field(default_factory=list)
    modules: dict[str, tuple[nn.Module, LayoutAdapter, list[WeightSlot]]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # excluded or unsupported (exported unquantized)
    skipped_reasons: dict[str, str] = field(default_factory=dict)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def discover(model: nn.Module, config: QuantConfig, ctx: ParallelContext) -> Inventory:
    """Every supported module whose name passes include/exclude becomes slots.

    A weight whose input dimension is not a multiple of 16 is skipped with a warning (and listed
    in ``ignored``) unless an ``include`` pattern names it, in which case it is an error.
    """
    inv = Inventory()
    bad_targets = []
    for name, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is None:
            continue
        explicitly = bool(config.include) and _matches(name, config.include)
        if config.include and not explicitly:
            inv.ignored.append(name)
            continue
        if _matches(name, config.exclude):  # exclusion applies after inclusion
            inv.ignored.append(name)
            continue
        slots = adapter.slots(name, module, ctx)
        if not slots:
            continue
        cin = slots[0].layout.global_shape[1]
        if cin % BLOCK_SIZE:
            reason = f"input dimension {cin} is not a multiple of {BLOCK_SIZE}"
            if explicitly:
                bad_targets.append(f"{name}: {reason}")
                continue
            warnings.warn(f"nvfp4_dist: skipping {name}: {reason}; it stays in high precision "
                          "and is listed in the export's ignore list", stacklevel=2)
            inv.ignored.append(name)
            inv.skipped_reasons[name] = reason
            continue
        slots = adapter.with_export_names(model, slots)
        inv.slots.extend(slots)
        inv.modules[name] = (module, adapter, slots)
    if bad_targets:
        raise LayoutError("cannot quantize explicitly targeted layers:\n  " + "\n  ".join(bad_targets)
                          + "\nNVFP4 blocks are 16 input channels: remove these from `include`.")
    return inv


def validate_weights(slots: list[WeightSlot], local_weight) -> None:
    """Raise once, naming every slot whose local weight holds NaN or Inf."""
    bad = []
    for slot in slots:
        w = local_weight(slot)
        if w.numel() and not torch.isfinite(w).all():
            n = int((~torch.isfinite(w)).sum())
            bad.append(f"{slot.name}: {n} non-finite values")
    if bad:
        raise LayoutError("weights hold NaN/Inf, which NVFP4 cannot represent:\n  " + "\n  ".join(bad)
                          + "\nFix the checkpoint (or exclude these layers with `exclude`).")
