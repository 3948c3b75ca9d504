"""The two HF NVFP4 checkpoint formats: tensor key schemes and quantization configs.

One quantized linear ``<m>`` is stored as four tensors (three for weight-only W4A16). Worked
example, the tiny model's ``q_proj`` (weight [256, 256], global amax g, input amax a), W4A4:

ModelOpt (``modelopt``; vLLM ``modelopt_fp4``, TensorRT-LLM)::

    model.layers.0.self_attn.q_proj.weight          U8       [256, 128]  packed E2M1 codes
    model.layers.0.self_attn.q_proj.weight_scale    F8_E4M3  [256, 16]   block scales
    model.layers.0.self_attn.q_proj.weight_scale_2  F32      []          fl(g / 2688)
    model.layers.0.self_attn.q_proj.input_scale     F32      []          fl(a / 2688)

compressed-tensors (``nvfp4-pack-quantized``; vLLM, transformers)::

    model.layers.0.self_attn.q_proj.weight_packed        U8       [256, 128]  same bytes
    model.layers.0.self_attn.q_proj.weight_scale         F8_E4M3  [256, 16]   same bytes
    model.layers.0.self_attn.q_proj.weight_global_scale  F32      [1]         fl(2688 / g)
    model.layers.0.self_attn.q_proj.input_global_scale   F32      [1]         fl(2688 / a)

The compressed-tensors global scales are computed as ``fl(2688 / amax)``, not as ``fl(1 /
weight_scale_2)``: that is the format's definition (6 * 448 / amax) rounded once, the value
llm-compressor writes for the same amax, and it does not inherit the rounding of
``weight_scale_2``. Either way the format stores a reciprocal, so a reader's ``fl(1 /
weight_global_scale)`` equals our ``weight_scale_2`` only up to one or two fp32 ulps (exact in about
two thirds of cases); codes and block scales are bit-identical in both formats.

:func:`build_tensors` (one weight -> stored tensors) and :func:`merge_tensors` (stored tensors ->
:class:`StoredNVFP4`) are the inverse pair every writer and reader goes through.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .._version import __version__
from ..errors import ConfigError, ExportError
from ..numerics import nvfp4
from ..numerics.constants import BLOCK_SIZE, GLOBAL_SCALE_DENOM

FORMAT_VERSION = "1"  # major version of the on-disk layout written here (safetensors metadata)
PRODUCER_NAME = "nvfp4_dist"
LINEAR_TARGETS = ["Linear"]


class ExportFormat(str, enum.Enum):
    """HF checkpoint layouts :func:`~nvfp4_dist.export.hf.export_checkpoint` writes."""

    MODELOPT = "modelopt"  # ModelOpt NVFP4: uint8 `weight`, 0-d `weight_scale_2`, hf_quant_config.json
    COMPRESSED_TENSORS = "compressed-tensors"  # `nvfp4-pack-quantized`: reciprocal [1] global scales

    @classmethod
    def parse(cls, value) -> "ExportFormat":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"export format {value!r} is not one of: "
                              + ", ".join(m.value for m in cls)) from None


@dataclass(frozen=True)
class TensorScheme:
    """Names (suffixes after ``<m>.``) and global-scale shape of one format's tensors."""

    packed: str
    scale: str
    weight_global: str
    input_global: str
    global_shape: tuple[int, ...]
    reciprocal: bool  # globals stored as 2688 / amax (True) or amax / 2688 (False)

    @property
    def suffixes(self) -> tuple[str, ...]:
        return (self.packed, self.scale, self.weight_global, self.input_global)


SCHEMES = {
    ExportFormat.MODELOPT: TensorScheme("weight", "weight_scale", "weight_scale_2", "input_scale",
                                        global_shape=(), reciprocal=False),
    ExportFormat.COMPRESSED_TENSORS: TensorScheme("weight_packed", "weight_scale", "weight_global_scale",
                                                  "input_global_scale", global_shape=(1,), reciprocal=True),
}


@dataclass(frozen=True)
class StoredNVFP4:
    """One quantized linear as read back, in dequantization terms.

    packed: uint8 ``[out, in // 2]``; scale: float8_e4m3fn ``[out, in // 16]``;
    weight_scale_2: fp32 0-d, the multiplier of ``e2m1 * scale`` (ModelOpt's value; for
    compressed-tensors ``fl(1 / weight_global_scale)``); input_scale: fp32 0-d activation scale
    ``amax / 2688`` (None for weight-only).
    """

    packed: torch.Tensor = field(repr=False)
    scale: torch.Tensor = field(repr=False)
    weight_scale_2: torch.Tensor = field(repr=False)
    input_scale: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.packed.shape[0]), int(self.packed.shape[1]) * 2)


def _global(amax: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    amax = nvfp4.clamp_global_amax(amax.detach().cpu())
    if scheme.reciprocal:
        # One rounding of 2688 / amax (module docstring says why not 1 / S). Tensor by tensor:
        # torch evaluates `python_scalar / tensor` as reciprocal(tensor) * scalar, two roundings.
        value = torch.full_like(amax, GLOBAL_SCALE_DENOM) / amax
    else:
        value = nvfp4.global_scale(amax)
    return value.reshape(scheme.global_shape).to(torch.float32)


def build_tensors(fmt: ExportFormat, module: str, packed: torch.Tensor, scale: torch.Tensor,
                  global_amax: torch.Tensor, input_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Stored tensors of one quantized linear ``module``.

    packed: uint8 ``[out, in // 2]``; scale: float8_e4m3fn ``[out, in // 16]``; global_amax:
    fp32 0-d (shared by the module's fused group); input_amax: fp32 0-d for W4A4, else None.
    """
    scheme = SCHEMES[ExportFormat(fmt)]
    out = {f"{module}.{scheme.packed}": packed, f"{module}.{scheme.scale}": scale,
           f"{module}.{scheme.weight_global}": _global(global_amax, scheme)}
    if input_amax is not None:
        out[f"{module}.{scheme.input_global}"] = _global(input_amax, scheme)
    return out


def _decode_global(value: torch.Tensor, scheme: TensorScheme) -> torch.Tensor:
    value = value.float().reshape(())
    return torch.reciprocal(value) if scheme.reciprocal else value


def merge_tensors(fmt: ExportFormat, module: str, tensors: Mapping[str, torch.Tensor]) -> StoredNVFP4:
    """Inverse of :func:`build_tensors`: the stored tensors of ``module`` (full key names)."""
    scheme = SCHEMES[ExportFormat(fmt)]
    missing = [f"{module}.{s}" for s in (scheme.packed, scheme.scale, scheme.weight_global)
               if f"{module}.{s}" not in tensors]
    if missing:
        raise ExportError(f"{module}: quantized tensors missing from the checkpoint: {', '.join(missing)}")
    input_value = tensors.get(f"{module}.{scheme.input_global}")
    return StoredNVFP4(
        packed=tensors[f"{module}.{scheme.packed}"],
        scale=tensors[f"{module}.{scheme.scale}"],
        weight_scale_2=_decode_global(tensors[f"{module}.{scheme.weight_global}"], scheme),
        input_scale=None if input_value is None else _decode_global(input_value, scheme))


def _producer() -> dict:
    return {"name": PRODUCER_NAME, "version": __version__}


def _fp4_args(dynamic) -> dict:
    return {"num_bits": 4, "type": "float", "group_size": BLOCK_SIZE, "dynamic": dynamic}


MODELOPT_W4A4_ALGO = "NVFP4"  # weights and static-scale input activations in NVFP4
MODELOPT_W4A16_ALGO = "W4A16_NVFP4"  # weight-only: activations stay in high precision
# compressed-tensors QuantizationArgs.scale_dtype of the NVFP4 presets (block scales in FP8 E4M3),
# as `PRESET_SCHEMES["NVFP4"].model_dump(mode="json")` writes it (compressed-tensors >= 0.13).
CT_SCALE_DTYPE = "torch.float8_e4m3fn"


def modelopt_quant_algo(w4a4: bool) -> str:
    """ModelOpt ``quant_algo`` of an export: ``NVFP4`` (W4A4) or ``W4A16_NVFP4`` (weight-only)."""
    return MODELOPT_W4A4_ALGO if w4a4 else MODELOPT_W4A16_ALGO


def quantization_config(fmt: ExportFormat, ignore: list[str], w4a4: bool) -> dict:
    """``config.json["quantization_config"]`` of ``fmt`` (the key scheme is in this module's docstring).

    ModelOpt: ``quant_algo`` names what was quantized (``NVFP4`` / ``W4A16_NVFP4``) and
    ``kv_cache_quant_algo: null`` says the KV cache is not. compressed-tensors: the scheme of the
    ``NVFP4`` / ``NVFP4A16`` presets (with their FP8 ``scale_dtype``) and ``kv_cache_scheme: null``.
    """
    fmt = ExportFormat(fmt)
    if fmt is ExportFormat.MODELOPT:
        group = {"weights": _fp4_args(False), "targets": list(LINEAR_TARGETS)}
        if w4a4:
            group["input_activations"] = _fp4_args(False)
        return {"quant_method": "modelopt", "quant_algo": modelopt_quant_algo(w4a4), "group_size": BLOCK_SIZE,
                "kv_cache_quant_algo": None, "ignore": list(ignore),
                "kv_cache_scheme": None, "producer": _producer(), "config_groups": {"group_0": group}}
    tensor_group = {"strategy": "tensor_group", "symmetric": True, "scale_dtype": CT_SCALE_DTYPE}
    group = {"targets": list(LINEAR_TARGETS), "weights": {**_fp4_args(False), **tensor_group}}
    if w4a4:
        # Per-block activation scales are computed at run time ("local"); only the global one is stored.
        group["input_activations"] = {**_fp4_args("local"), **tensor_group}
    return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed", "ignore": list(ignore), "kv_cache_scheme": None,
            "config_groups": {"group_0": group}}


def hf_quant_config(ignore: list[str], w4a4: bool = True) -> dict:
    """ModelOpt's ``hf_quant_config.json`` (vLLM needs group_size, kv_cache_quant_algo and
    exclude_modules to be present). ``w4a4=False`` (weight-only) writes ``W4A16_NVFP4``."""
    return {"producer": _producer(),
            "quantization": {"quant_algo": modelopt_quant_algo(w4a4), "kv_cache_quant_algo": None,
                             "group_size": BLOCK_SIZE, "exclude_modules": list(ignore)}}


def detect_format(qc: dict) -> ExportFormat | None:
    """The format a ``quantization_config`` describes, or None when it is neither."""
    method = qc.get("quant_method")
    if method == "modelopt":
        return ExportFormat.MODELOPT
    if method == "compressed-tensors":
        return ExportFormat.COMPRESSED_TENSORS
    return None


def config_w4a4(qc: dict) -> bool:
    """Whether a well-formed ``quantization_config`` declares static-scale W4A4."""
    group = (qc.get("config_groups") or {}).get("group_0") or {}
    return group.get("input_activations") is not None
