"""The reader's own unpacking, left-to-right dequantization and format-version handling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nvfp4_dist.errors import ExportError
from nvfp4_dist.export.formats import ExportFormat, StoredNVFP4, quantization_config
from nvfp4_dist.export.reader import CheckpointReader, dequantize, e2m1_values

# Golden: code -> value, bit 3 the sign (code 8 is -0).
GOLDEN = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_every_code_unpacks_low_nibble_first():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 8)
    values = e2m1_values(packed)
    assert values.tolist() == [GOLDEN]
    assert torch.signbit(values[0, 8])  # -0 keeps its sign
    swapped = torch.tensor([[0x71]], dtype=torch.uint8)  # low nibble 1 (0.5), high nibble 7 (6)
    assert e2m1_values(swapped).tolist() == [[0.5, 6.0]]


def test_dequantize_is_e2m1_times_scale_times_global_left_to_right():
    packed = torch.tensor([[0x77] * 8, [0xF3] * 8], dtype=torch.uint8)  # row 0: 6.0s; row 1: 1.5, -6
    scale = torch.tensor([[448.0], [0.001953125]]).to(torch.float8_e4m3fn)  # 448 and 2^-9
    s2 = torch.tensor(3.0e-7)
    stored = StoredNVFP4(packed=packed, scale=scale, weight_scale_2=s2)
    got = dequantize(stored)
    f = torch.float32
    assert got[0, 0].item() == ((torch.tensor(6.0, dtype=f) * 448.0) * s2).item()
    assert got[1, 0].item() == ((torch.tensor(1.5, dtype=f) * 2.0**-9) * s2).item()
    assert got[1, 1].item() == -((torch.tensor(6.0, dtype=f) * 2.0**-9) * s2).item()
    with pytest.raises(ExportError, match="do not match"):
        dequantize(StoredNVFP4(packed=packed, scale=scale[:1], weight_scale_2=s2))


def _write_checkpoint(path, metadata, quant_method="compressed-tensors"):
    path.mkdir()
    qc = quantization_config(ExportFormat.COMPRESSED_TENSORS, [], False)
    qc["quant_method"] = quant_method
    (path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    tensors = {"m.weight_packed": torch.full((2, 8), 0x21, dtype=torch.uint8),
               "m.weight_scale": torch.ones(2, 1).to(torch.float8_e4m3fn),
               "m.weight_global_scale": torch.tensor([4.0])}
    save_file(tensors, path / "model.safetensors", metadata=metadata)


def test_reader_ignores_unknown_metadata_and_reads_a_single_file(tmp_path):
    _write_checkpoint(tmp_path / "ok", {"format": "pt", "format_version": "1.7", "future_key": "x"})
    reader = CheckpointReader(tmp_path / "ok")
    assert reader.format is ExportFormat.COMPRESSED_TENSORS
    assert reader.quantized_modules() == ["m"]
    # codes 1 (0.5) and 2 (1.0), scale 1, weight_scale_2 = 1/4
    assert reader.dequantized("m")[0, :2].tolist() == [0.125, 0.25]


def test_reader_refuses_an_unknown_major_version(tmp_path):
    _write_checkpoint(tmp_path / "new", {"format": "pt", "format_version": "2"})
    with pytest.raises(ExportError, match="format_version 2"):
        CheckpointReader(tmp_path / "new")


def test_reader_refuses_other_quantization_methods(tmp_path):
    _write_checkpoint(tmp_path / "gptq", {"format": "pt"}, quant_method="gptq")
    with pytest.raises(ExportError, match="'gptq'"):
        CheckpointReader(tmp_path / "gptq")
    with pytest.raises(ExportError, match="is not a directory"):
        CheckpointReader(tmp_path / "nowhere")
