"""Checks of a whole export, run on every rank over what all ranks hold, before any file is written.

Fused siblings (q/k/v, gate/up, per-expert w1/w3, MLA q_a/kv_a; grouped by name with
``fused_keys``) are merged by inference engines into one weight with one ``weight_scale_2``, and
loaded in one precision. Engines do not requantize: a member whose global scale differs would be
silently corrupted, and a group mixing NVFP4 and high-precision members cannot be loaded.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch

from ..errors import ExportError
from ..layout.fused import fused_keys
from ..numerics import nvfp4


def fused_groups(modules: Iterable[str]) -> dict[str, list[str]]:
    """NVFP4 ``modules`` grouped by the fused group engines merge them into (``fused_keys``)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(modules)):
        groups[fused_keys(name)[0]].append(name)
    return dict(groups)


def mixed_members(groups: dict[str, list[str]], dense: Iterable[str]) -> dict[str, list[str]]:
    """group -> the ``dense`` (high-precision) modules that are fused siblings of NVFP4 ``groups``."""
    mixed: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(dense)):
        group = fused_keys(name)[0]
        if group != name and group in groups:  # a fused sibling of NVFP4 modules
            mixed[group].append(name)
    return dict(mixed)


def unequal_groups(groups: dict[str, list[str]], values: dict) -> dict[str, dict]:
    """group -> {member: value} of the groups whose members' ``values`` are not all equal
    (members without a value are skipped)."""
    bad = {}
    for group, members in sorted(groups.items()):
        got = {m: values[m] for m in members if m in values}
        if len(set(got.values())) > 1:
            bad[group] = got
    return bad


def check_fused_groups(global_amax: dict[str, torch.Tensor], dense: Iterable[str] = ()) -> None:
    """Raise when siblings that engines fuse are not quantized alike.

    ``global_amax``: exported NVFP4 module -> fp32 0-d global amax; every member of a group must
    have the same one. ``dense``: modules exported in high precision; a group may not mix them
    with NVFP4 members (engines load a fused layer in one precision). ``inspect`` applies the
    same rule (:func:`fused_groups`, :func:`mixed_members`, :func:`unequal_groups`) to the
    stored scales of a written checkpoint.
    """
    groups = fused_groups(global_amax)
    values = {m: float(nvfp4.clamp_global_amax(global_amax[m].detach().cpu())) for m in global_amax}
    bad = []
    for group, got in unequal_groups(groups, values).items():
        listing = ", ".join(f"{m} (global amax {v:.9g})" for m, v in got.items())
        bad.append(f"{group}: {listing} differ; engines keep one weight_scale_2 for the merged "
                   "weight. Calibrate them together with quantize(), which shares the global amax")
    for group, names in mixed_members(groups, dense).items():
        bad.append(f"{group}: {', '.join(groups[group])} are NVFP4 but {', '.join(names)} stay in high "
                   "precision; engines load a fused layer in one precision. Include or exclude the "
                   "whole group")
    if bad:
        raise ExportError("fused layers are not quantized alike:\n  " + "\n  ".join(bad))
