"""Read an exported NVFP4 checkpoint back: tensors, configs, and dequantized weights.

The dequantization here is written independently of the quantizer's numerics (its own nibble
split and E2M1 table), so that comparing it with the fake-quant forward checks both:
``w = e2m1(code) * float(weight_scale) * weight_scale_2``, evaluated left to right in fp32, with
``weight_scale_2 = fl(1 / weight_global_scale)`` for compressed-tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ExportError
from ..numerics.constants import BLOCK_SIZE, E2M1_VALUES
from .formats import FORMAT_VERSION, SCHEMES, ExportFormat, StoredNVFP4, detect_format, merge_tensors
from .writer import INDEX_NAME

SINGLE_FILE_NAME = "model.safetensors"
_SIGN_BIT = 0x8


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path.parent}: {what} {path.name} is missing; is this an exported checkpoint?") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None


def weight_map(path: Path) -> dict[str, str]:
    """tensor name -> file, from the index (or the single ``model.safetensors``)."""
    index = path / INDEX_NAME
    if index.is_file():
        content = read_json(index, "index")
        if not isinstance(content.get("weight_map"), dict):
            raise ExportError(f"{index}: no 'weight_map' object")
        return dict(content["weight_map"])
    single = path / SINGLE_FILE_NAME
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE_NAME for name in f.keys()}
    raise ExportError(f"{path}: neither {INDEX_NAME} nor {SINGLE_FILE_NAME} found")


def check_format_version(metadata: dict | None, where: str) -> None:
    """Refuse a file written by a newer, incompatible nvfp4_dist layout (unknown keys are fine)."""
    version = (metadata or {}).get("format_version")
    if version is not None and version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise ExportError(f"{where}: format_version {version} is not supported by this nvfp4_dist "
                          f"(it reads major version {FORMAT_VERSION}); upgrade nvfp4_dist")


def e2m1_values(packed: torch.Tensor) -> torch.Tensor:
    """Signed E2M1 values (fp32 ``[rows, 2 * cols]``) of packed codes (uint8 ``[rows, cols]``)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ExportError(f"packed codes must be 2-D uint8, got {packed.dtype} {list(packed.shape)}")
    # Element 2j sits in the low nibble, 2j+1 in the high nibble; bit 3 of a code is the sign.
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    # the table on the codes' device: the exporter validates codes still on the GPU
    magnitude = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[(codes & 0x7).long()]
    return torch.where((codes & _SIGN_BIT) != 0, -magnitude, magnitude)


def dequantize(stored: StoredNVFP4) -> torch.Tensor:
    """fp32 ``[out, in]`` weight of one stored linear (see the module docstring)."""
    values = e2m1_values(stored.packed)
    rows, cin = values.shape
    scale = stored.scale.float()
    if tuple(scale.shape) != (rows, cin // BLOCK_SIZE):
        raise ExportError(f"block scales {list(scale.shape)} do not match codes [{rows}, {cin}]")
    value = values.reshape(rows, cin // BLOCK_SIZE, BLOCK_SIZE) * scale.unsqueeze(-1)  # exact: <= 7 bits
    return (value * stored.weight_scale_2.float()).reshape(rows, cin)


class CheckpointReader:
    """An exported checkpoint directory: ``config.json``, its format, and lazy tensor access."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ExportError(f"{self.path} is not a directory")
        self.config = read_json(self.path / "config.json", "config")
        self.quantization_config = self.config.get("quantization_config")
        if not isinstance(self.quantization_config, dict):
            raise ExportError(f"{self.path}/config.json has no quantization_config; not an NVFP4 export")
        fmt = detect_format(self.quantization_config)
        if fmt is None:
            raise ExportError(f"{self.path}: quant_method {self.quantization_config.get('quant_method')!r} "
                              "is neither 'modelopt' nor 'compressed-tensors'")
        self.format: ExportFormat = fmt
        self.scheme = SCHEMES[fmt]
        self.weight_map = weight_map(self.path)
        for file in sorted(set(self.weight_map.values())):
            with safe_open(self.path / file, framework="pt") as f:
                check_format_version(f.metadata(), str(self.path / file))

    def tensor(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise ExportError(f"{self.path}: no tensor {name!r} in the checkpoint")
        with safe_open(self.path / file, framework="pt") as f:
            return f.get_tensor(name)

    def quantized_modules(self) -> list[str]:
        """Names of the modules stored as NVFP4 (they carry the format's weight global scale)."""
        suffix = "." + self.scheme.weight_global
        return sorted(name[: -len(suffix)] for name in self.weight_map if name.endswith(suffix))

    def stored(self, module: str) -> StoredNVFP4:
        names = [f"{module}.{s}" for s in self.scheme.suffixes if f"{module}.{s}" in self.weight_map]
        return merge_tensors(self.format, module, {n: self.tensor(n) for n in names})

    def dequantized(self, module: str) -> torch.Tensor:
        return dequantize(self.stored(module))


def read_dequantized(path) -> dict[str, torch.Tensor]:
    """Every NVFP4 module of an exported checkpoint, dequantized to fp32 ``[out, in]``."""
    reader = CheckpointReader(path)
    return {name: reader.dequantized(name) for name in reader.quantized_modules()}
