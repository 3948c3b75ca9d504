"""Helpers of the export tests that compare checkpoints written by different layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``path`` (all its shard files)."""
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (float8 has no equality kernel everywhere: bytes compared)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def differing_tensors(got: Path, ref: Path) -> list[str]:
    """Names of the tensors whose bytes differ between two checkpoints (which must hold the same
    names)."""
    a, b = checkpoint_tensors(got), checkpoint_tensors(ref)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    return [k for k in b if not same_bytes(a[k], b[k])]
