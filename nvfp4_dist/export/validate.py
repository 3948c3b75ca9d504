"""Validation of an export before it is published, by the reader's own decoding.

* :func:`piece_problems`: every rank, for each piece it writes, while the tensors are in memory:
  every NVFP4 module among them is merged and dequantized the way the reader does
  (:func:`~nvfp4_dist.export.formats.merge_tensors`, :func:`~nvfp4_dist.export.reader.dequantize`);
  global and input scales must be finite and positive, FP8 block scales finite and positive, the
  dequantized weight finite. No re-read of the written files is needed.
* :func:`staged_problems`: rank 0, on the staging directory, through the reader: config.json's
  quantization config and format, hf_quant_config.json, the index vs the shard headers (names
  only). The full rule set of ``inspect`` is not re-run here.

A problem is a short string naming the module or file; the exporter raises them all together
(:func:`invalid_export_error`) and publishes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ..errors import ExportError
from .formats import SCHEMES, ExportFormat, merge_tensors
from .reader import CheckpointReader, dequantize, read_json

_MAX_LISTED = 8


def _scale_problem(what: str, t: torch.Tensor) -> str | None:
    values = t.float()
    if not bool(torch.isfinite(values).all()):
        return f"non-finite {what}"
    if bool((values <= 0).any()):
        return f"zero or negative {what}"
    return None


def piece_problems(fmt: ExportFormat, emitted: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Problems of the NVFP4 modules among one piece's emitted ``(key, tensor)`` pairs."""
    scheme = SCHEMES[ExportFormat(fmt)]
    tensors = dict(emitted)
    suffix = "." + scheme.weight_global
    problems: list[str] = []
    for module in sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix)):
        try:
            stored = merge_tensors(fmt, module, {k: v for k, v in tensors.items()
                                                 if k.rpartition(".")[0] == module})
            found = [p for p in (
                _scale_problem(scheme.weight_global, tensors[f"{module}.{scheme.weight_global}"]),
                _scale_problem("decoded weight_scale_2", stored.weight_scale_2),
                None if stored.input_scale is None else _scale_problem(scheme.input_global, stored.input_scale),
                _scale_problem("FP8 block scales", stored.scale)) if p is not None]
            if not found and not bool(torch.isfinite(dequantize(stored)).all()):
                found.append("non-finite dequantized weight")
        except ExportError as exc:
            found = [str(exc)]
        problems += [f"{module} ({p})" for p in dict.fromkeys(found)]
    return problems


def staged_problems(staging: Path, fmt: ExportFormat) -> list[str]:
    """Cheap checks of a staged export, through the project's reader (:class:`CheckpointReader`:
    config.json and its quantization config, the index, every shard's format version): the
    format is ``fmt``, ModelOpt's hf_quant_config.json parses, and every shard header holds
    exactly the tensors the index assigns to it (headers only, no tensor is loaded)."""
    problems: list[str] = []
    try:
        reader = CheckpointReader(staging)
        if reader.format is not ExportFormat(fmt):
            problems.append(f"config.json declares {reader.format.value}, the export wrote {ExportFormat(fmt).value}")
        if reader.format is ExportFormat.MODELOPT:
            read_json(staging / "hf_quant_config.json", "ModelOpt config")
        by_file: dict[str, set[str]] = {}
        for name, file in reader.weight_map.items():
            by_file.setdefault(file, set()).add(name)
        for file, names in sorted(by_file.items()):
            with safe_open(staging / file, framework="pt") as f:
                keys = set(f.keys())
            if keys != names:
                problems.append(f"{file}: tensors differ from the index ({len(keys ^ names)} names)")
        stray = sorted(p.name for p in staging.iterdir()
                       if p.name.endswith((".safetensors", ".partial")) and p.name not in by_file)
        if stray:
            problems.append(f"shard files the index does not list: {', '.join(stray)}")
    except ExportError as exc:
        problems.append(str(exc))
    except (OSError, ValueError) as exc:
        problems.append(f"unreadable staged file: {exc}")
    return problems


def invalid_export_error(target: Path, problems: list[str]) -> ExportError:
    """One-line ExportError naming the invalid modules/files (the first few, and how many)."""
    more = f" ... (+{len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    listing = "; ".join(" ".join(p.split()) for p in problems[:_MAX_LISTED]) + more
    return ExportError(f"the export to {target} failed validation, nothing was published: "
                       f"{len(problems)} problem(s): {listing}")
