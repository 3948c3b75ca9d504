"""The output directory of an export: staging, each rank's shard files, rank 0's publish.

* staging: rank 0 checks the target and creates the staging directory next to it; every rank
  learns its path (or rank 0's error, raised on every rank, so none waits for a directory).
* shards: every rank walks the plan's order, writes the pieces it is the writer of into its own
  files (``ShardWriter(prefix="rank0000R")``) and takes part in the gathers of its shard groups:
  a piece split over a group is gathered to its writer first (for quantized weights the packed
  codes and FP8 scales, 4.5 bits per weight, never the weight itself).
* publish (rank 0): the ranks' shard records in rank order are numbered and indexed, then
  config.json (with ``quantization_config``), hf_quant_config.json (ModelOpt) and the source
  model's tokenizer/generation files are written, the staged configs and index are checked, the
  export marker is written and the staging directory is published (:mod:`.outdir`).
* validation: every rank checks the NVFP4 modules it writes while it holds them
  (:mod:`.validate`); the problems travel to rank 0 with the shard records, and any problem on
  any rank means nothing is published.

The staging directory must be on a filesystem every rank sees (one node, or a shared mount).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil
from pathlib import Path

from torch import nn

from ..errors import ExportError
from ..parallel.reduce import broadcast_object, gather_along, group_ranks
from .formats import FORMAT_VERSION, ExportFormat, hf_quant_config, quantization_config
from .outdir import step
from .pieces import Piece
from .plan import Plan
from .validate import invalid_export_error, piece_problems, staged_problems
from .writer import (ShardRecord, ShardWriter, finalize_shards, prepare_staging, publish, write_json,
                     write_marker)

CONFIG_NAME = "config.json"
HF_QUANT_CONFIG_NAME = "hf_quant_config.json"
# Files carried over from the source model directory: tokenizer, chat template, generation and
# processor settings. Weights and config.json are written anew; remote code is never copied.
SOURCE_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                        "merges.txt", "*.tiktoken", "spiece.model", "generation_config.json",
                        "chat_template*", "preprocessor_config.json", "processor_config.json")


def source_path(source_dir) -> Path | None:
    """``source_dir`` as a Path, checked to be a directory (None stays None)."""
    if source_dir is None:
        return None
    source = Path(source_dir)
    if not source.is_dir():
        raise ExportError(f"source_dir {source} is not a directory; pass the HF model directory "
                          "the model was loaded from, or None")
    return source


def _architecture(model: nn.Module) -> str:
    """The model's class name as save_pretrained records it. FSDP2's ``fully_shard`` swaps the
    class for a subclass ``FSDP<name>`` of (FSDPModule, the class): the wrapped class is named."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def base_config(model: nn.Module, config: dict | None, source: Path | None) -> dict:
    """config.json content before the quantization config: ``config`` when given, else a
    transformers model's own config (with ``architectures``, as save_pretrained records it),
    else ``source/config.json``, else empty."""
    if config is not None:
        return copy.deepcopy(dict(config))
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        cfg = model.config.to_dict()
        cfg["architectures"] = [_architecture(model)]
        return cfg
    if source is not None and (source / CONFIG_NAME).is_file():
        return json.loads((source / CONFIG_NAME).read_text())
    return {}


def open_staging(target: Path, overwrite: bool, rank: int, protected=()) -> Path:
    """The staging directory rank 0 made for ``target``, on every rank (see module docstring)."""
    staging: object = None
    if rank == 0:
        try:
            staging = str(prepare_staging(target, overwrite, protected))
        except ExportError as exc:  # every rank raises it, none waits for a staging directory
            staging = exc
    staging = broadcast_object(staging)
    if isinstance(staging, Exception):
        raise ExportError(str(staging))
    return Path(staging)


def write_pieces(staging: Path, plan: Plan, pieces: list[Piece], rank: int, max_shard_size,
                 metadata: dict[str, str], fmt: ExportFormat) -> tuple[list[ShardRecord], list[str]]:
    """Write this rank's share of the plan into its own shard files, validating each piece's
    NVFP4 modules while it is in memory (:func:`.validate.piece_problems`); returns its records
    and the problems found (the exporter refuses to publish when any rank has one)."""
    problems: list[str] = []
    writer = ShardWriter(staging, max_shard_size, metadata, prefix=f"rank{rank:05d}")
    held = {piece.key: piece for piece in pieces}
    for key in plan.order:
        piece = held.get(key)
        if piece is None:
            continue
        dst = plan.writers[key]
        if piece.axis is None:
            whole = piece.local() if dst == rank else None
        elif dst in group_ranks(piece.group):
            whole = {name: gather_along(t, piece.axis, piece.offsets[name], piece.group, dst=dst)
                     for name, t in piece.local().items()}
        else:
            continue  # another replica of this shard group writes it
        if dst == rank:
            emitted = list(piece.emit(whole))
            problems += piece_problems(fmt, emitted)
            for name, tensor in emitted:
                writer.add(name, tensor)
            step("piece-written")
    return writer.close(), problems


def _source_files(source: Path) -> list[Path]:
    return sorted(p for p in source.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in SOURCE_FILE_PATTERNS))


def publish_checkpoint(staging: Path, target: Path, records: list[ShardRecord], *, fmt: ExportFormat,
                       config: dict, ignore: list[str], w4a4: bool, source: Path | None) -> tuple[str, ...]:
    """Rank 0: index the shards, write the configs, copy the source files, check the staged
    configs and index (:func:`.validate.staged_problems`), write the export marker and publish
    the staging directory as ``target``; returns the published file names."""
    finalize_shards(staging, records)
    cfg = dict(config)
    cfg["quantization_config"] = quantization_config(fmt, ignore, w4a4)
    write_json(staging / CONFIG_NAME, cfg)
    if fmt is ExportFormat.MODELOPT:
        write_json(staging / HF_QUANT_CONFIG_NAME, hf_quant_config(ignore, w4a4))
    for path in _source_files(source) if source is not None else []:
        shutil.copy2(path, staging / path.name)
    problems = staged_problems(staging, fmt)
    if problems:
        raise invalid_export_error(target, problems)
    files = write_marker(staging, format=fmt.value, format_version=FORMAT_VERSION)
    publish(staging, target)
    return files
