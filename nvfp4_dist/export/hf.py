"""export_hf(): write a calibrated model as an HF checkpoint in an NVFP4 format.

Stages (one process; the key scheme is in :mod:`nvfp4_dist.export.formats`):
  1. plan     every WeightSlot -> its parameter's state_dict key and exported parts; the other
              state_dict tensors pass through unchanged (dtype kept), minus the quantizer
              buffers (``*_nvfp4_*``) and tied duplicates (kept once, under the first name, as
              ``save_pretrained`` does). Every problem is collected and raised once, before any
              file is written.
  2. check    fused siblings that engines merge (q/k/v, gate/up, per-expert w1/w3) must share
              one global scale (engines take one scale for the merged weight and do not
              requantize, so a mismatch would silently corrupt the other members) and must all
              be NVFP4 or all high precision.
  3. write    tensors streamed in state_dict order into size-bounded shards (export.writer),
              quantized parameters replaced by their packed codes and scales.
  4. configs  config.json with ``quantization_config``, ``hf_quant_config.json`` (ModelOpt),
              tokenizer/generation files copied from ``source_dir``.
All of it happens in a staging directory published at the end (nothing half-written).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..calib.pipeline import QuantResult
from ..calib.slots import WeightSlot
from ..calib.state import SUFFIXES, SlotState
from ..errors import ExportError
from ..kernels.dispatch import quantize_pack_weight
from ..kernels.types import KernelBackend
from ..numerics import nvfp4
from ..parallel.access import local_weight
from ..parallel.layouts import fused_keys
from .formats import FORMAT_VERSION, ExportFormat, build_tensors, hf_quant_config, quantization_config
from .writer import DEFAULT_MAX_SHARD_SIZE, ShardWriter, atomic_output_dir, finalize_shards, write_json

CONFIG_NAME = "config.json"
HF_QUANT_CONFIG_NAME = "hf_quant_config.json"
# Files carried over from the source model directory: tokenizer, chat template, generation and
# processor settings. Weights and config.json are written anew; remote code is never copied.
SOURCE_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                        "merges.txt", "*.tiktoken", "spiece.model", "generation_config.json",
                        "chat_template*", "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_hf` wrote: the directory, its files, the quantized (exported) module
    names, the ignore list and whether static input scales were stored (W4A4)."""

    path: Path
    fmt: ExportFormat
    files: tuple[str, ...]
    quantized: tuple[str, ...]
    ignore: tuple[str, ...]
    w4a4: bool


def quantize_pack(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                  dss_beta: torch.Tensor | None = None,
                  backend: KernelBackend = KernelBackend.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes (uint8 ``[rows, cin // 2]``) and FP8 block scales (float8_e4m3fn
    ``[rows, cin // 16]``) of ``w [rows, cin]``: exactly the codes the fake-quant forward uses
    (DSS: codes from the quant scale fl(beta * d), the stored scale unchanged).

    The one place the export turns weights into codes: the kernels' cast/pack (Triton on CUDA,
    the torch reference elsewhere; both bit-identical to the fake-quant numerics).
    """
    return quantize_pack_weight(w, block_amax, global_amax, dss_beta, backend=backend)


@dataclass(frozen=True)
class _Plan:
    quantized: dict[str, list[WeightSlot]]  # state_dict key -> its slots, in slot order
    order: list[str]  # state_dict keys to emit (pass-through and quantized), in order
    tensors: dict[str, torch.Tensor]  # pass-through key -> tensor
    parts: dict[str, tuple[WeightSlot, object]]  # exported module -> (slot, rows)


def _module_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


def _is_quantizer_buffer(key: str) -> bool:
    leaf = key.rpartition(".")[2]
    return "_nvfp4_" in leaf and leaf.rsplit("_nvfp4_", 1)[1] in SUFFIXES


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's memory: tied parameters (one storage, same view) share it."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _plan(model: nn.Module, result: QuantResult, w4a4: bool) -> _Plan:
    problems: list[str] = []
    names = _module_names(model)
    quantized: dict[str, list[WeightSlot]] = defaultdict(list)
    parts: dict[str, tuple[WeightSlot, object]] = {}
    for slot in result.slots:
        module_name = names.get(id(slot.module))
        if module_name is None:
            problems.append(f"{slot.name}: its module is not part of the exported model")
            continue
        if slot.layout.is_sharded:
            problems.append(f"{slot.name}: this rank holds only a {slot.layout.shard_group} shard "
                            f"{slot.layout.local_shape} of {slot.layout.global_shape}; export it with "
                            "the distributed export, which gathers shards per rank")
        state = result.states.get(slot.name)
        if state is None:
            problems.append(f"{slot.name}: no calibration state in the QuantResult; run quantize() first")
        elif w4a4 and state.input_amax is None:
            problems.append(f"{slot.name}: W4A4 export needs an input amax; calibrate with a forward_loop")
        key = f"{module_name}.{slot.param_name}" if module_name else slot.param_name
        quantized[key].append(slot)
        for part in slot.parts():
            if part.name in parts:
                problems.append(f"{part.name}: exported by two slots ({parts[part.name][0].name}, {slot.name})")
            parts[part.name] = (slot, part.rows)
    for key, slots in quantized.items():
        param = slots[0].parameter()
        if param.dim() == 3 and len({s.expert for s in slots}) != param.shape[0]:
            problems.append(f"{key}: only {len(slots)} of {param.shape[0]} experts are quantized; a "
                            "fused-experts parameter is exported whole or not at all (adjust include/exclude)")

    order, tensors, seen = [], {}, {}
    for key, tensor in model.state_dict().items():
        if key in quantized:
            order.append(key)
            continue
        if _is_quantizer_buffer(key):
            continue
        if hasattr(tensor, "to_local"):
            problems.append(f"{key}: a distributed (DTensor) tensor; use the distributed export")
            continue
        if tensor.device.type == "meta":
            problems.append(f"{key}: a meta tensor (no data); materialise the model before exporting")
            continue
        storage = _storage_key(tensor)
        if storage in seen:
            continue  # tied to `seen[storage]` (e.g. lm_head tied to the embeddings): written once
        seen[storage] = key
        order.append(key)
        tensors[key] = tensor
    emitted = set(order)
    order += [key for key in quantized if key not in emitted]
    if problems:
        raise ExportError("cannot export:\n  " + "\n  ".join(problems))
    return _Plan(dict(quantized), order, tensors, parts)


def check_fused_groups(global_amax: dict[str, torch.Tensor], dense: Iterable[str] = ()) -> None:
    """Raise when siblings that engines fuse (q/k/v, gate/up, w1/w3, MLA q_a/kv_a under one
    parent, grouped by name with ``fused_keys``) are not quantized alike.

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
    for name in dense:
        group = fused_keys(name)[0]
        if group != name and group in groups:  # a fused sibling of NVFP4 modules
            mixed[group].append(name)
    for group, names in sorted(mixed.items()):
        bad.append(f"{group}: {', '.join(groups[group])} are NVFP4 but {', '.join(names)} stay in high "
                   "precision; engines load a fused layer in one precision. Include or exclude the "
                   "whole group")
    if bad:
        raise ExportError("fused layers are not quantized alike:\n  " + "\n  ".join(bad))


def _base_config(model: nn.Module, config: dict | None, source_dir: Path | None) -> dict:
    if config is not None:
        return copy.deepcopy(dict(config))
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        cfg = model.config.to_dict()
        cfg["architectures"] = [type(model).__name__]  # as save_pretrained records it
        return cfg
    if source_dir is not None and (source_dir / CONFIG_NAME).is_file():
        return json.loads((source_dir / CONFIG_NAME).read_text())
    return {}


def _source_files(source_dir: Path) -> list[Path]:
    return sorted(p for p in source_dir.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in SOURCE_FILE_PATTERNS))


def _quantized_tensors(fmt: ExportFormat, slot: WeightSlot, state: SlotState, w4a4: bool,
                       backend: KernelBackend):
    """(key, tensor) of every exported part of one slot."""
    w = local_weight(slot).detach()
    packed, scale = quantize_pack(w, state.block_amax, state.global_amax, state.dss_beta, backend)
    input_amax = state.input_amax if w4a4 else None
    for part in slot.parts():
        rows = part.rows.to(packed.device) if isinstance(part.rows, torch.Tensor) else part.rows
        yield from build_tensors(fmt, part.name, packed[rows], scale[rows], state.global_amax,
                                 input_amax).items()


def export_hf(model: nn.Module, result: QuantResult, out_dir, fmt: ExportFormat | str = ExportFormat.MODELOPT,
              source_dir=None, overwrite: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
              config: dict | None = None, backend: KernelBackend = KernelBackend.AUTO) -> ExportSummary:
    """Write ``model``, calibrated by ``quantize()`` into ``result``, to ``out_dir``.

    fmt: ``"modelopt"`` or ``"compressed-tensors"``. source_dir: the original HF model directory;
    its tokenizer/generation files are copied. overwrite: replace an existing ``out_dir`` (only
    once the new export is complete). max_shard_size: bytes or an HF size string. config: the
    model's config.json content, for models that are not transformers ``PreTrainedModel``s
    (default: ``model.config``, else ``source_dir/config.json``, else only the quantization
    config). Static input scales are written when the run calibrated them (W4A4).
    """
    fmt = ExportFormat.parse(fmt)
    w4a4 = bool(result.config.quantize_inputs)
    source = None if source_dir is None else Path(source_dir)
    if source is not None and not source.is_dir():
        raise ExportError(f"source_dir {source} is not a directory; pass the HF model directory "
                          "the model was loaded from, or None")
    plan = _plan(model, result, w4a4)
    dense = [key[: -len(".weight")] for key in plan.tensors if key.endswith(".weight")]
    check_fused_groups({name: result.states[slot.name].global_amax for name, (slot, _) in plan.parts.items()},
                       dense)
    ignore = sorted(set(result.ignored))
    cfg = _base_config(model, config, source)
    cfg["quantization_config"] = quantization_config(fmt, ignore, w4a4)
    metadata = {"format": "pt", "nvfp4_dist_format": fmt.value, "format_version": FORMAT_VERSION}

    target = Path(out_dir).absolute()
    with atomic_output_dir(target, overwrite) as staging:
        writer = ShardWriter(staging, max_shard_size, metadata)
        for key in plan.order:
            if key in plan.tensors:
                writer.add(key, plan.tensors[key])
                continue
            for slot in plan.quantized[key]:
                for name, tensor in _quantized_tensors(fmt, slot, result.states[slot.name], w4a4, backend):
                    writer.add(name, tensor)
        finalize_shards(staging, writer.close())
        write_json(staging / CONFIG_NAME, cfg)
        if fmt is ExportFormat.MODELOPT:
            write_json(staging / HF_QUANT_CONFIG_NAME, hf_quant_config(ignore))
        for path in _source_files(source) if source is not None else []:
            shutil.copy2(path, staging / path.name)
        files = tuple(sorted(p.name for p in staging.iterdir()))
    return ExportSummary(path=target, fmt=fmt, files=files, quantized=tuple(plan.parts),
                         ignore=tuple(ignore), w4a4=w4a4)
