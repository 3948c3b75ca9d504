"""export_checkpoint(): write a calibrated model as one HF checkpoint in an NVFP4 format.

One pipeline for one process and for torchrun (every rank calls it with the same arguments;
one process is the case of one rank holding everything). The key scheme is in
:mod:`nvfp4_dist.export.formats`; names come from the layout's ExportNaming recorded in the
QuantResult, process groups from its ParallelContext.

  1. pieces   each rank lists what it holds (:mod:`.pieces`): quantized slots and the other
              state tensors under their exported names, minus quantizer buffers, ``._extra_state``
              and tied duplicates; problems are collected.
  2. plan     ranks exchange their inventories and agree on the order, the writer of each piece
              and the ignore list; every problem and the fused-group checks (:mod:`.checks`) are
              raised on every rank, before any file exists (:mod:`.plan`).
  3. write    each rank streams its share into size-bounded shard files in one staging
              directory, gathering only packed codes and FP8 scales of split weights (:mod:`.output`).
  4. publish  rank 0 writes the index, config.json (+ hf_quant_config.json), the source files,
              checks them, writes the export marker and swaps the staging directory into place
              (:mod:`.outdir`); a failure or a validation problem (:mod:`.validate`, every rank
              checks what it writes) on any rank publishes nothing and the staging directory is
              discarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..calib.pipeline import QuantResult
from ..errors import ExportError
from ..kernels.types import KernelImpl
from ..parallel.access import expose_local_shards
from ..parallel.reduce import broadcast_object, world_objects
from .formats import FORMAT_VERSION, ExportFormat
from .outdir import check_output_dir, target_path
from .output import base_config, open_staging, publish_checkpoint, source_path, write_pieces
from .pieces import local_pieces
from .plan import agree
from .validate import invalid_export_error
from .writer import DEFAULT_MAX_SHARD_SIZE, discard


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_checkpoint` published (the same on every rank): the directory, its
    files, the exported NVFP4 module names, the ignore list and whether static input scales
    were stored (W4A4)."""

    path: Path
    fmt: ExportFormat
    files: tuple[str, ...]
    quantized: tuple[str, ...]
    ignore: tuple[str, ...]
    w4a4: bool


def export_checkpoint(model: nn.Module, result: QuantResult, out_dir, *,
                      fmt: ExportFormat | str = ExportFormat.MODELOPT, source_dir=None,
                      overwrite: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      config: dict | None = None, kernels: KernelImpl = KernelImpl.AUTO) -> ExportSummary:
    """Write ``model``, calibrated by ``quantize()`` into ``result``, to ``out_dir``.

    Under torchrun, call it on every rank with the same arguments (collective). fmt:
    ``"modelopt"`` or ``"compressed-tensors"``. source_dir: the original HF model directory; its
    tokenizer/generation files are copied (and it is never replaced). overwrite: replace an
    existing ``out_dir`` that is empty or an earlier nvfp4_dist export holding nothing else (its
    marker ``nvfp4_dist_export.json`` lists its files), only once the new export is complete and
    validated; anything else is refused up front (:func:`.outdir.check_output_dir`).
    max_shard_size: bytes or an HF size string (per rank's files). config: the model's
    config.json content (default: a transformers model's ``config``, else
    ``source_dir/config.json``, else only the quantization config; Megatron: pass the HF
    config). Static input scales are written when the run calibrated them (W4A4).
    """
    fmt = ExportFormat.parse(fmt)
    w4a4 = bool(result.config.quantize_inputs)
    source = source_path(source_dir)
    cfg = base_config(model, config, source)
    rank = result.ctx.rank
    if result.ctx.world_size == 1:  # refuse before any work (under torchrun: rank 0, below, for all)
        check_output_dir(out_dir, overwrite=overwrite, protected=(source,))
    expose_local_shards(model)  # FSDP2: read the DTensor shards, not the root's unsharded weights
    pieces, inventory = local_pieces(model, result, fmt, w4a4, kernels)
    plan = agree(inventory)

    target = target_path(out_dir)
    staging = open_staging(target, overwrite, rank, protected=(source,))
    metadata = {"format": "pt", "nvfp4_dist_format": fmt.value, "format_version": FORMAT_VERSION}
    files = None
    try:
        # A rank that fails here never sends its records: the others' collectives time out and
        # rank 0 discards the staging directory (below). Validation problems are no failure
        # here: every rank's travel with its records, and rank 0 refuses to publish.
        written = world_objects(write_pieces(staging, plan, pieces, rank, max_shard_size, metadata, fmt))
        error = None
        if rank == 0:
            try:
                problems = [p for _, rank_problems in written for p in rank_problems]
                if problems:
                    raise invalid_export_error(target, problems)
                files = publish_checkpoint(staging, target, [r for records, _ in written for r in records],
                                           fmt=fmt, config=cfg, ignore=list(plan.ignore), w4a4=w4a4,
                                           source=source)
            except Exception as exc:  # tell the other ranks before raising
                error = exc
        files, message = broadcast_object((files, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:  # rank 0's error, on the other ranks
            raise ExportError(message)
    finally:
        if rank == 0 and files is None:
            discard(staging)
    if files is None:
        raise ExportError(f"the export to {target} was not published; see rank 0's error")
    return ExportSummary(path=target, fmt=fmt, files=files, quantized=plan.quantized,
                         ignore=plan.ignore, w4a4=w4a4)
