"""Key schemes (build/merge round trip) and quantization configs of both formats."""

from __future__ import annotations

import pytest
import torch

from nvfp4_dist.errors import ConfigError, ExportError
from nvfp4_dist.export.formats import (ExportFormat, build_tensors, hf_quant_config, merge_tensors,
                                       quantization_config)
from nvfp4_dist.export.inspect import config_problems, hf_quant_config_problems
from nvfp4_dist.numerics import nvfp4


def _weight(seed=0):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    g = w.abs().amax()
    scale = nvfp4.scale_fp8(nvfp4.block_amax(w), g)
    packed = nvfp4.pack(nvfp4.encode(w, scale, nvfp4.global_scale(g)))
    return packed, scale, g


def test_format_names_parse_and_unknown_is_refused():
    assert ExportFormat.parse("compressed-tensors") is ExportFormat.COMPRESSED_TENSORS
    with pytest.raises(ConfigError, match="modelopt, compressed-tensors"):
        ExportFormat.parse("gguf")


@pytest.mark.parametrize("w4a4", [True, False])
def test_modelopt_round_trip(w4a4):
    packed, scale, g = _weight()
    a = torch.tensor(7.25)
    tensors = build_tensors(ExportFormat.MODELOPT, "m", packed, scale, g, a if w4a4 else None)
    expected = {"m.weight", "m.weight_scale", "m.weight_scale_2"} | ({"m.input_scale"} if w4a4 else set())
    assert set(tensors) == expected
    assert tensors["m.weight_scale_2"].dtype == torch.float32 and tensors["m.weight_scale_2"].shape == ()
    stored = merge_tensors(ExportFormat.MODELOPT, "m", tensors)
    assert torch.equal(stored.packed, packed) and torch.equal(stored.scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(stored.weight_scale_2, nvfp4.global_scale(g))  # g / 2688, bit for bit
    assert stored.shape == (8, 64)
    if w4a4:
        assert torch.equal(stored.input_scale, nvfp4.input_scale(a))
    else:
        assert stored.input_scale is None


@pytest.mark.parametrize("w4a4", [True, False])
def test_compressed_tensors_round_trip(w4a4):
    packed, scale, g = _weight(1)
    a = torch.tensor(3.0)
    tensors = build_tensors(ExportFormat.COMPRESSED_TENSORS, "m", packed, scale, g, a if w4a4 else None)
    expected = {"m.weight_packed", "m.weight_scale", "m.weight_global_scale"}
    assert set(tensors) == expected | ({"m.input_global_scale"} if w4a4 else set())
    gs = tensors["m.weight_global_scale"]
    assert gs.dtype == torch.float32 and gs.shape == (1,)
    assert gs.item() == torch.tensor(2688.0, dtype=torch.float32).div(g.float()).item()  # one rounding
    stored = merge_tensors(ExportFormat.COMPRESSED_TENSORS, "m", tensors)
    assert torch.equal(stored.packed, packed)
    assert stored.weight_scale_2.item() == (1.0 / gs).item()
    if w4a4:
        assert tensors["m.input_global_scale"].item() == 896.0  # 2688 / 3, exact


def test_zero_amax_gives_finite_positive_globals():
    packed, scale, _ = _weight()
    for fmt in ExportFormat:
        tensors = build_tensors(fmt, "m", packed, scale, torch.tensor(0.0), torch.tensor(0.0))
        for name, t in tensors.items():
            if t.dtype == torch.float32:
                assert torch.isfinite(t).all() and (t > 0).all(), name


def test_merge_names_what_is_missing():
    with pytest.raises(ExportError, match="m.weight_global_scale"):
        merge_tensors(ExportFormat.COMPRESSED_TENSORS, "m", {"m.weight_packed": torch.zeros(1, 1, dtype=torch.uint8)})


@pytest.mark.parametrize("w4a4", [True, False])
@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_quantization_config_is_well_formed(fmt, w4a4):
    qc = quantization_config(fmt, ["lm_head", "model.layers.0.mlp.down_proj"], w4a4)
    assert config_problems(fmt, qc) == []
    group = qc["config_groups"]["group_0"]
    assert ("input_activations" in group) == w4a4
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("w4a4", [True, False])
def test_compressed_tensors_package_accepts_the_config(w4a4):
    ct = pytest.importorskip("compressed_tensors.quantization", reason="needs compressed-tensors")
    qc = quantization_config(ExportFormat.COMPRESSED_TENSORS, ["lm_head"], w4a4)
    parsed = ct.QuantizationConfig.model_validate(qc)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.type, weights.group_size, weights.strategy) == (4, "float", 16, "tensor_group")
    assert parsed.format == "nvfp4-pack-quantized" and parsed.ignore == ["lm_head"]
    inputs = parsed.config_groups["group_0"].input_activations
    assert (inputs is not None) == w4a4
    if w4a4:
        assert inputs.dynamic == "local"


def test_config_problems_name_the_bad_fields():
    qc = quantization_config(ExportFormat.COMPRESSED_TENSORS, [], True)
    qc["config_groups"]["group_0"]["weights"]["group_size"] = 32
    del qc["quantization_status"]
    problems = config_problems(ExportFormat.COMPRESSED_TENSORS, qc)
    assert any("group_size=32" in p for p in problems)
    assert any("'quantization_status'" in p for p in problems)


def test_hf_quant_config_has_the_keys_vllm_requires():
    content = hf_quant_config(["lm_head"])
    assert hf_quant_config_problems(content) == []
    quant = content["quantization"]
    assert quant == {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                     "exclude_modules": ["lm_head"]}
    assert set(content["producer"]) == {"name", "version"}
    for key in ("kv_cache_quant_algo", "exclude_modules", "group_size"):
        broken = {**content, "quantization": {k: v for k, v in quant.items() if k != key}}
        assert any(key in p for p in hf_quant_config_problems(broken)), key
