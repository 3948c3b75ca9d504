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


def export_contents(path: Path) -> dict:
    """What an export holds, comparable across layouts and processes: every tensor (dtype,
    shape, bytes), every shard header's metadata (as a dict: safetensors writes its keys in a
    per-process hash order) and the config files. The split of tensors into shard files follows
    the ranks that wrote them, so the index and the marker (which list files) are left out."""
    from safetensors import safe_open

    path = Path(path)
    out = {p.name: p.read_bytes() for p in sorted(path.glob("*.json"))
           if p.name not in ("model.safetensors.index.json", "nvfp4_dist_export.json")}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.setdefault("shard metadata", set()).add(tuple(sorted(f.metadata().items())))
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out
