"""export_distributed(): every rank streams what it owns into one HF checkpoint.

Stages (all ranks; collectives through ``parallel.reduce``):
  1. inventory  each rank lists the exported pieces it holds: quantized slots (its shard of the
                packed codes and FP8 scales) and pass-through state tensors (under their HF names,
                with how this rank holds them: whole, or a shard along an axis of a group).
                Ranks exchange the piece keys; writers rotate over the ranks holding each piece.
  2. check      fused siblings share one global scale (every rank checks the gathered amaxes, so
                every rank raises together).
  3. write      each rank writes the pieces it is the writer of into its own shard files
                (``ShardWriter(prefix="rank0000R")`` in one staging directory made by rank 0). A
                piece split over a group is gathered to its writer first: for quantized weights
                the packed codes and scales (4.5 bits per weight), never the weight itself; only
                pass-through tensors that are sharded (embeddings, FSDP2 norms) travel whole.
  4. publish    rank 0 gathers the shard records, numbers the files, writes the index, config.json
                (+ hf_quant_config.json) and source files, and renames the staging directory into
                place. A rank that fails never sends its records: rank 0 times out, discards the
                staging directory, and nothing is published.

The staging directory must be on a filesystem every rank sees (one node, or a shared mount).
"""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..calib.pipeline import QuantResult
from ..calib.slots import WeightSlot
from ..errors import ExportError
from ..kernels.types import KernelBackend
from ..parallel.access import expose_local_shards, local_weight
from ..parallel.context import ParallelContext
from ..parallel.reduce import (broadcast_object, gather_along, gather_slot_tensor, group_ranks,
                               world_objects)
from .formats import FORMAT_VERSION, ExportFormat, build_tensors, hf_quant_config, quantization_config
from .hf import (CONFIG_NAME, HF_QUANT_CONFIG_NAME, SOURCE_FILE_PATTERNS, check_fused_groups,
                 quantize_pack)
from .writer import DEFAULT_MAX_SHARD_SIZE, ShardWriter, discard, finalize_shards, prepare_staging, publish, write_json


@dataclass(frozen=True)
class PassThrough:
    """How one unquantized state tensor is exported and held.

    outputs: ``(exported key, rows)`` pairs; rows (a slice or int64 index tensor) select rows of
        the whole tensor (e.g. Megatron's fused qkv of an unquantized layer -> q/k/v weights).
    axis / offset / group: the tensor is split along ``axis`` over ``group`` and this rank's
        piece starts at ``offset`` (axis None: this rank holds it whole).
    """

    outputs: tuple[tuple[str, object], ...]
    axis: int | None = None
    offset: int = 0
    group: object = field(default=None, repr=False)


Namer = Callable[[str, nn.Module, torch.Tensor], PassThrough]


def _rows(rows, device):
    return rows.to(device) if isinstance(rows, torch.Tensor) else rows


def dtensor_namer(ctx: ParallelContext) -> Namer:
    """State keys are the exported keys (HF and FSDP2 models); DTensors are split as their
    placement says (FSDP2: ``torch.chunk`` along the shard dim, over the mesh dimension that
    shards them: HSDP replicas are other holders of the same pieces), plain tensors are whole."""
    del ctx

    def name(key, module, tensor):
        from torch.distributed.tensor import DTensor

        from ..parallel.fsdp import dtensor_split

        whole = ((key, slice(None)),)
        split = dtensor_split(tensor) if isinstance(tensor, DTensor) else None
        if split is None:
            return PassThrough(whole)
        axis, offset, group = split
        return PassThrough(whole, axis, offset, group)

    return name


def _is_quantizer_buffer(key: str) -> bool:
    return "_nvfp4_" in key.rpartition(".")[2]


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return (to_local() if to_local is not None else t).detach()


@dataclass
class _Piece:
    key: str  # unique across ranks: exported name or slot name
    tensors: dict[str, torch.Tensor]  # what this rank holds (local pieces)
    axis: int | None
    offsets: dict[str, int]  # per tensor: offset of this rank's piece along axis
    group: object
    emit: Callable[[dict[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]


def _slot_piece(fmt: ExportFormat, slot: WeightSlot, state, w4a4: bool, ctx: ParallelContext,
                backend: KernelBackend) -> _Piece:
    packed, scale = quantize_pack(local_weight(slot).detach(), state.block_amax, state.global_amax,
                                  state.dss_beta, backend)
    layout = slot.layout
    axis = layout.shard_axis if layout.is_sharded else None
    offsets = {"packed": layout.offset[1] // 2 if axis == 1 else layout.offset[0],
               "scale": layout.offset[1] // 16 if axis == 1 else layout.offset[0]}
    input_amax = state.input_amax if w4a4 else None

    def emit(whole):
        out = []
        for part in slot.parts():
            rows = _rows(part.rows, whole["packed"].device)
            out += build_tensors(fmt, part.name, whole["packed"][rows], whole["scale"][rows],
                                 state.global_amax, input_amax).items()
        return out

    return _Piece(slot.name, {"packed": packed, "scale": scale}, axis, offsets,
                  ctx.group(layout.shard_group) if axis is not None else None, emit)


def _passthrough_pieces(model: nn.Module, quantized_params: set[str], namer: Namer) -> list[_Piece]:
    pieces = []
    modules = dict(model.named_modules())
    for key, tensor in model.state_dict().items():
        if key in quantized_params or _is_quantizer_buffer(key) or key.endswith("._extra_state"):
            continue
        if not isinstance(tensor, torch.Tensor):
            continue
        module = modules.get(key.rpartition(".")[0], model)
        spec = namer(key, module, tensor)

        def emit(whole, outputs=spec.outputs):
            return [(name, whole["t"][_rows(rows, whole["t"].device)]) for name, rows in outputs]

        pieces.append(_Piece(spec.outputs[0][0], {"t": _local(tensor)}, spec.axis,
                             {"t": spec.offset}, spec.group, emit))
    return pieces


def _param_keys(model: nn.Module, slots: list[WeightSlot]) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(s.module)]}.{s.param_name}".lstrip(".") for s in slots if id(s.module) in names}


def _source_files(source_dir: Path) -> list[Path]:
    return sorted(p for p in source_dir.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in SOURCE_FILE_PATTERNS))


def _publish(staging: Path, target: Path, records, result, ignore, fmt, w4a4, config, source_dir):
    finalize_shards(staging, [r for rank_records in records for r in rank_records])
    ignore = sorted(set(result.ignored if ignore is None else ignore))
    cfg = dict(config)
    cfg["quantization_config"] = quantization_config(fmt, ignore, w4a4)
    write_json(staging / CONFIG_NAME, cfg)
    if fmt is ExportFormat.MODELOPT:
        write_json(staging / HF_QUANT_CONFIG_NAME, hf_quant_config(ignore))
    for path in _source_files(Path(source_dir)) if source_dir is not None else []:
        shutil.copy2(path, staging / path.name)
    publish(staging, target)


def export_distributed(model: nn.Module, result: QuantResult, out_dir, ctx: ParallelContext,
                       config: dict, fmt: ExportFormat | str = ExportFormat.MODELOPT,
                       namer: Namer | None = None, ignore: list[str] | None = None,
                       source_dir=None, overwrite: bool = False,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       backend: KernelBackend = KernelBackend.AUTO) -> Path:
    """Write a model calibrated on several ranks as one HF checkpoint (see module docstring).

    Call on every rank with the same arguments. ``config``: the HF config.json content (the
    model's ``config.to_dict()``; for Megatron the source HF config). ``namer``: exported names
    and layouts of unquantized state tensors (default: state keys, DTensors split by
    placement; Megatron: :func:`nvfp4_dist.parallel.megatron.megatron_namer`). ``ignore``:
    exported module names kept in high precision (default: ``result.ignored``).
    """
    fmt = ExportFormat.parse(fmt)
    w4a4 = bool(result.config.quantize_inputs)
    namer = namer or dtensor_namer(ctx)
    expose_local_shards(model)
    rank = dist.get_rank() if dist.is_initialized() else 0

    pieces = [_slot_piece(fmt, s, result.states[s.name], w4a4, ctx, backend) for s in result.slots]
    pieces += _passthrough_pieces(model, _param_keys(model, result.slots), namer)
    holders: dict[str, list[int]] = {}
    for r, keys in enumerate(world_objects(sorted(p.key for p in pieces))):
        for key in keys:
            holders.setdefault(key, []).append(r)
    # Writers rotate over each piece's holders, so every rank writes its share of the files.
    writers = {key: ranks[i % len(ranks)] for i, (key, ranks) in enumerate(sorted(holders.items()))}

    amax = {part.name: result.states[s.name].global_amax.detach().cpu()
            for s in result.slots for part in s.parts()}
    merged = {}
    for d in world_objects(amax):
        merged.update(d)
    check_fused_groups(merged)

    staging = None
    if rank == 0:
        try:
            staging = str(prepare_staging(out_dir, overwrite))
        except ExportError as exc:  # every rank raises it, none waits for a staging directory
            staging = exc
    staging = broadcast_object(staging)
    if isinstance(staging, Exception):
        raise ExportError(str(staging))
    metadata = {"format": "pt", "nvfp4_dist_format": fmt.value, "format_version": FORMAT_VERSION}
    writer = ShardWriter(staging, max_shard_size, metadata, prefix=f"rank{rank:05d}")
    published = False
    try:
        for piece in sorted(pieces, key=lambda p: p.key):
            writer_rank = writers[piece.key]
            if piece.axis is None:
                if writer_rank == rank:
                    for name, tensor in piece.emit(piece.tensors):
                        writer.add(name, tensor)
                continue
            if writer_rank not in group_ranks(piece.group):
                continue  # another replica of this shard group writes it
            whole = {k: gather_along(t, piece.axis, piece.offsets[k], piece.group, dst=writer_rank)
                     for k, t in piece.tensors.items()}
            if writer_rank == rank:
                for name, tensor in piece.emit(whole):
                    writer.add(name, tensor)
        records = world_objects(writer.close())
        error = None
        if rank == 0:
            try:
                _publish(Path(staging), Path(out_dir).absolute(), records, result, ignore, fmt, w4a4,
                         config, source_dir)
                published = True
            except Exception as exc:  # tell the other ranks before raising
                error = exc
        published = broadcast_object(published)
        if error is not None:
            raise error
    finally:
        if rank == 0 and not published:
            discard(staging)
    if not published:
        raise ExportError(f"the export to {out_dir} was not published; see rank 0's error")
    return Path(out_dir).absolute()
