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


def check_fused_groups(global_amax: dict[str, torch.Tensor], dense: Iterable[str] = ()) -> None:
    """Raise when siblings that engines fuse are not quantized alike.

    ``global_amax``: exported NVFP4 module -> fp32 0-d global amax; every member of a group must
    have the same one. ``dense``: modules exported in high precision; a group may not mix them
    with NVFP4 members (engines load a fused layer in one precision).
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(global_amax):
        groups[fused_keys(name)[0]].append(name)
    bad = []
    for group, members in sorted(groups.items()):
        values = {m: float(nvfp4.clamp_global_amax(global_amax[m].detach().cpu())) for m in members}
        if len(set(values.values())) > 1:
            listing = ", ".join(f"{m} (global amax {v:.9g})" for m, v in values.items())
            bad.append(f"{group}: {listing} differ; engines keep one weight_scale_2 for the merged "
                       "weight. Calibrate them together with quantize(), which shares the global amax")
    mixed = defaultdict(list)
    for name in sorted(set(dense)):
        group = fused_keys(name)[0]
        if group != name and group in groups:  # a fused sibling of NVFP4 modules
            mixed[group].append(name)
    for group, names in sorted(mixed.items()):
        bad.append(f"{group}: {', '.join(groups[group])} are NVFP4 but {', '.join(names)} stay in high "
                   "precision; engines load a fused layer in one precision. Include or exclude the "
                   "whole group")
    if bad:
        raise ExportError("fused layers are not quantized alike:\n  " + "\n  ".join(bad))
