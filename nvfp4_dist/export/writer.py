"""Streaming, sharded safetensors writing into an atomically published directory.

Tensors are added one at a time; a shard file is flushed whenever the next tensor would push it
past ``max_shard_size`` (a tensor larger than the bound gets a file of its own), so at most one
shard's worth of tensors is held in memory. Shards are written under provisional names and only
numbered ``model-0000K-of-0000N.safetensors`` once N is known, when the index
``model.safetensors.index.json`` is written.

Everything goes into a staging directory next to the target, renamed into place at the end: a
failure leaves no target directory (or leaves the old one untouched). What may be replaced, the
lock, the crash-safe publish and the clean-up of interrupted runs are :mod:`.outdir`'s.

One rank::

    with atomic_output_dir(target, overwrite) as staging:
        writer = ShardWriter(staging, max_shard_size, metadata)
        for name, tensor in tensors:
            writer.add(name, tensor)
        finalize_shards(staging, writer.close())

Several ranks (the pieces are separable for that; the collectives live elsewhere): rank 0 calls
:func:`prepare_staging` and shares the path; every rank writes its own files with
``ShardWriter(staging, ..., prefix=f"rank{rank:05d}")``; the ranks' :class:`ShardRecord` lists are
gathered to rank 0 in rank order, which calls :func:`finalize_shards` on their concatenation and
then :func:`publish` (or :func:`discard` when any rank failed).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ExportError
from .outdir import MARKER_NAME, discard_dir, marker_content, open_target, publish_dir

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_PARTIAL_SUFFIX = ".safetensors.partial"


def shard_file_name(index: int, total: int) -> str:
    """HF shard naming, 1-based: ``model-00002-of-00005.safetensors``."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF size string (``"5GB"`` = 5e9, ``"500MiB"`` = 500 * 2^20)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        raise ExportError(f"max_shard_size={size!r} is not a size: use bytes or a string like '5GB'") from None
    if value <= 0:
        raise ExportError(f"max_shard_size={size!r} must be positive")
    return value


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class ShardRecord:
    """One flushed shard: provisional file name (relative to the staging dir), its tensors in
    write order and their total size in bytes."""

    file: str
    tensors: tuple[str, ...]
    nbytes: int


class ShardWriter:
    """Accumulates tensors and flushes them into size-bounded safetensors files.

    ``metadata`` (str -> str) goes into every file's header. ``prefix`` names this writer's
    provisional files; writers sharing a staging dir need distinct prefixes.
    """

    def __init__(self, staging: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, prefix: str = "part"):
        self.staging = Path(staging)
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.prefix = prefix
        self.records: list[ShardRecord] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._names: set[str] = set()
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name`` (copied to a contiguous CPU tensor, so the caller may
        reuse or free its own)."""
        if self._closed:
            raise ExportError(f"cannot add {name!r}: the shard writer is already closed")
        if name in self._names:
            raise ExportError(f"tensor {name!r} was written twice; every exported key must be unique")
        nbytes = tensor_nbytes(tensor)
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self.flush()
        # A private contiguous copy: safetensors refuses tensors that share storage within a file.
        self._pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self._pending_bytes += nbytes
        self._names.add(name)

    def flush(self) -> None:
        """Write the queued tensors into the next provisional file (no-op when nothing is queued)."""
        if not self._pending:
            return
        file = f"{self.prefix}-{len(self.records):05d}{_PARTIAL_SUFFIX}"
        save_file(self._pending, self.staging / file, metadata=self.metadata)
        self.records.append(ShardRecord(file, tuple(self._pending), self._pending_bytes))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[ShardRecord]:
        """Flush what is left; returns this writer's records in write order."""
        self.flush()
        self._closed = True
        return list(self.records)


def build_index(weight_map: dict[str, str], total_size: int, metadata: dict[str, str] | None = None) -> dict:
    """Content of ``model.safetensors.index.json``."""
    return {"metadata": {"total_size": int(total_size), **(metadata or {})},
            "weight_map": dict(sorted(weight_map.items()))}


def finalize_shards(staging: str | os.PathLike, records: list[ShardRecord],
                    index_metadata: dict[str, str] | None = None) -> dict:
    """Number the provisional files in ``records`` order, rename them to their final names and
    write the index; returns the index. Run once, after every writer closed."""
    staging = Path(staging)
    if not records:
        raise ExportError("nothing to export: no tensor was written")
    weight_map: dict[str, str] = {}
    total = 0
    for k, record in enumerate(records, start=1):
        final = shard_file_name(k, len(records))
        for name in record.tensors:
            if name in weight_map:
                raise ExportError(f"tensor {name!r} was written by two writers ({weight_map[name]} and {final})")
            weight_map[name] = final
        total += record.nbytes
    for k, record in enumerate(records, start=1):
        os.replace(staging / record.file, staging / shard_file_name(k, len(records)))
    index = build_index(weight_map, total, index_metadata)
    write_json(staging / INDEX_NAME, index)
    return index


def write_json(path: str | os.PathLike, content: dict) -> None:
    Path(path).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def prepare_staging(target: str | os.PathLike, overwrite: bool = False, protected=()) -> Path:
    """Check the target (:func:`~nvfp4_dist.export.outdir.check_output_dir`: ``overwrite``
    replaces only an empty directory or an earlier export), take its lock, clean up what
    interrupted runs left, and create an empty staging directory next to it.

    A refusal raises ExportError before anything is touched.
    """
    return open_target(target, overwrite=overwrite, protected=protected)


def write_marker(staging: str | os.PathLike, **fields) -> tuple[str, ...]:
    """Write the export marker listing every file in ``staging``; returns all file names
    (the marker included)."""
    staging = Path(staging)
    write_json(staging / MARKER_NAME, marker_content((p.name for p in staging.iterdir()), **fields))
    return tuple(sorted(p.name for p in staging.iterdir()))


def publish(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished staging directory to ``target``, replacing an existing one only now, in
    one atomic exchange where the system allows it, else journaled (see
    :mod:`nvfp4_dist.export.outdir`). Writes the marker first unless the caller did."""
    if not (Path(staging) / MARKER_NAME).exists():
        write_marker(staging)
    publish_dir(staging, target)


def discard(staging: str | os.PathLike) -> None:
    discard_dir(staging)


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a staging directory; publish it as ``target`` on success, delete it on any error."""
    staging = prepare_staging(target, overwrite)
    try:
        yield staging
        publish(staging, target)
    except BaseException:
        discard(staging)
        raise
