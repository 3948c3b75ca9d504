"""Progress bars on long work (tqdm), shown on the first rank only."""

from __future__ import annotations

import sys

import torch.distributed as dist
from tqdm.auto import tqdm


def is_main_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress(iterable, desc: str, enabled: bool = True, total: int | None = None):
    """``iterable`` wrapped in a tqdm bar on rank 0 (plain iterable elsewhere or when disabled)."""
    if not enabled or not is_main_rank():
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
