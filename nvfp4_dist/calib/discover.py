"""Stage 1, discover: walk a model, match include/exclude patterns, and collect WeightSlots.

Every module is offered to the adapters of :mod:`nvfp4_dist.parallel.registry` (first match
wins). Nothing is passed over in silence: a module that holds a 2-D weight, matches no adapter,
is not an embedding and is not excluded by the user's patterns is an error naming it; one that
is excluded is listed in ``Inventory.ignored`` (the export's ignore list), as is every adapted
module the patterns leave out. A run that finds no weight to quantize is an error too.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import LayoutError
from ..layout.slots import WeightSlot, expert_stacks
from ..numerics.constants import BLOCK_SIZE
from ..parallel.adapters import LayoutAdapter
from ..parallel.context import ParallelContext
from ..parallel.registry import adapters, find_adapter


class ModuleSlots(NamedTuple):
    """One discovered module: the module, the adapter that handles it and its slots."""

    module: nn.Module
    adapter: LayoutAdapter
    slots: tuple[WeightSlot, ...]


@dataclass(frozen=True)
class Inventory:
    """Discovery result: slots to quantize, grouped by module, and what stays in high precision.

    ignored: modules left in high precision on purpose (excluded, not included, or skipped with
        a reason), in model order; the export lists them in its ignore list.
    """

    slots: tuple[WeightSlot, ...] = ()
    modules: dict[str, ModuleSlots] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    skipped_reasons: dict[str, str] = field(default_factory=dict)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _holds_2d_weight(module: nn.Module) -> bool:
    return any(p.dim() == 2 for p in module.parameters(recurse=False))


def _is_embedding(module: nn.Module) -> bool:
    # Embedding tables are 2-D but are lookups, not GEMMs: engines keep them in high precision.
    return isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__


def discover(model: nn.Module, config: QuantConfig, ctx: ParallelContext) -> Inventory:
    """Every supported module whose name passes include/exclude becomes slots.

    A weight whose input dimension is not a multiple of 16 is skipped with a warning (and listed
    in ``ignored``) unless an ``include`` pattern names it, in which case it is an error.
    """
    candidates = adapters()
    slots: list[WeightSlot] = []
    modules: dict[str, ModuleSlots] = {}
    ignored: list[str] = []
    reasons: dict[str, str] = {}
    bad_targets, unadapted = [], []
    for name, module in model.named_modules():
        adapter = find_adapter(module, candidates)
        explicitly = bool(config.include) and _matches(name, config.include)
        left_out = (config.include and not explicitly) or _matches(name, config.exclude)
        if adapter is None:
            if _holds_2d_weight(module) and not _is_embedding(module):
                if left_out:
                    ignored.append(name)
                else:
                    unadapted.append(f"{name} ({type(module).__name__})")
            continue
        if left_out:  # exclusion applies after inclusion
            ignored.append(name)
            continue
        found = adapter.slots(name, module, ctx)
        if not found:
            continue
        cin = found[0].layout.global_shape[1]
        if cin % BLOCK_SIZE:
            reason = f"input dimension {cin} is not a multiple of {BLOCK_SIZE}"
            if explicitly:
                bad_targets.append(f"{name}: {reason}")
                continue
            warnings.warn(f"nvfp4_dist: skipping {name}: {reason}; it stays in high precision "
                          "and is listed in the export's ignore list", stacklevel=2)
            ignored.append(name)
            reasons[name] = reason
            continue
        found = adapter.with_export_names(model, found)
        slots.extend(found)
        modules[name] = ModuleSlots(module, adapter, tuple(found))
    if bad_targets:
        raise LayoutError("cannot quantize explicitly targeted layers:\n  " + "\n  ".join(bad_targets)
                          + "\nNVFP4 blocks are 16 input channels: remove these from `include`.")
    if unadapted:
        listed = "\n  ".join(unadapted[:20]) + (f"\n  ... ({len(unadapted)} in all)" if len(unadapted) > 20 else "")
        raise LayoutError("these modules hold 2-D weights that no nvfp4_dist layout adapter handles:\n  "
                          f"{listed}\nExclude them to keep them in high precision (exclude=[...] / "
                          "--exclude; the defaults exclude lm_head, embeddings and MoE routers), or "
                          "build the model from layers nvfp4_dist supports (torch.nn.Linear, "
                          "Megatron Column/RowParallelLinear, transformers fused experts).")
    if not slots:
        raise LayoutError(
            f"no weight of {type(model).__name__} is quantized: "
            + (f"the include patterns {list(config.include)} match no supported module"
               if config.include else f"the exclude patterns {list(config.exclude)} leave out every supported module"
               if ignored else "it holds no supported linear layer")
            + ". Check include/exclude against the model's module names (model.named_modules()).")
    return Inventory(tuple(slots), modules, tuple(ignored), reasons)


def expert_finite(param: torch.Tensor) -> torch.Tensor:
    """bool ``[E]``: whether each expert of a 3-D ``param`` is free of NaN/Inf, from one min/max
    reduction over the whole parameter (NaN propagates through both, Inf reaches one of them;
    no temporary the size of the weight)."""
    low, high = torch.aminmax(param.detach().reshape(param.shape[0], -1), dim=1)
    return torch.isfinite(low) & torch.isfinite(high)


def validate_weights(slots, local_weight) -> None:
    """Raise once, naming every slot whose local weight holds NaN or Inf.

    Fused experts are checked a 3-D parameter at a time, every other weight on its own; the
    verdicts reach the host together (one wait for the device), the counts only for the named."""
    stacks, rest = expert_stacks(slots)
    # device -> (the slot whose weight each verdict judges, or None for an expert of no slot;
    # the verdict tensors): one ``tolist`` per device
    by_device: dict[torch.device, tuple[list, list]] = {}
    for param, members in stacks:
        if param.numel():
            judged, verdicts = by_device.setdefault(param.device, ([], []))
            of_expert = {s.expert: s for s in members}
            judged += [of_expert.get(e) for e in range(param.shape[0])]
            verdicts.append(expert_finite(param))
    for slot in rest:
        w = local_weight(slot)
        if w.numel():
            judged, verdicts = by_device.setdefault(w.device, ([], []))
            judged.append(slot)
            verdicts.append(torch.isfinite(w).all().reshape(1))
    failed = set()
    for judged, verdicts in by_device.values():
        failed.update(s.name for s, ok in zip(judged, torch.cat(verdicts).tolist()) if s is not None and not ok)
    bad = []
    for slot in slots:  # in slot order, as the message always listed them
        if slot.name in failed:
            n = int((~torch.isfinite(local_weight(slot))).sum())
            bad.append(f"{slot.name}: {n} non-finite values")
    if bad:
        raise LayoutError("weights hold NaN/Inf, which NVFP4 cannot represent:\n  " + "\n  ".join(bad)
                          + "\nFix the checkpoint (or exclude these layers with `exclude`).")
