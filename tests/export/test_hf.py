"""export_checkpoint in one process: both formats, read back by our reader, configs, ignore lists
and error paths."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import nvfp4_dist.export.pieces as pieces
from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.layout.slots import ExportPart
from nvfp4_dist.errors import ExportError
from nvfp4_dist.export.formats import ExportFormat, quantization_config
from nvfp4_dist.export import export_checkpoint
from nvfp4_dist.export.inspect import inspect_checkpoint
from nvfp4_dist.export.outdir import MARKER_NAME, marker_content
from nvfp4_dist.export.reader import CheckpointReader
from nvfp4_dist.models.tiny import build_embedded
from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.parallel.access import local_weight

# compressed-tensors stores the reciprocal global scale fl(2688 / g); reading it back as
# fl(1 / that) differs from our fl(g / 2688) by at most two roundings, and the final product by
# one more on each side: |read - fake_quant| <= 5 u |fake_quant| (u = 2^-24) to first order.
# 2^-21 = 8 u leaves room for the second-order terms.
CT_REL_BOUND = 2.0**-21


def _all_tensors(path):
    reader = CheckpointReader(path)
    return {name: reader.tensor(name) for name in reader.weight_map}


def expected_parts(result):
    """exported module -> (fake-quant fp32 rows, global amax, input amax)."""
    out = {}
    for slot in result.slots:
        state = result.states[slot.name]
        fq = nvfp4.fake_quant(local_weight(slot).detach(), state.block_amax(), state.global_amax,
                              state.dss_beta(), out_dtype=torch.float32)
        for part in slot.parts():
            out[part.name] = (fq[part.rows], state.global_amax, state.input_amax)
    return out


def test_reader_dequant_equals_fake_quant(tiny_exports, case, fmt):
    model, result, path = tiny_exports(case, fmt)
    reader = CheckpointReader(path)
    expected = expected_parts(result)
    assert reader.quantized_modules() == sorted(expected)
    if case == "dss":
        assert any(result.states[s.name].dss_beta() is not None and bool((result.states[s.name].dss_beta() != 1).any())
                   for s in result.slots), "DSS chose no decoupled scale: the case tests nothing"
    for name, (fq, g, _) in expected.items():
        stored = reader.stored(name)
        got = reader.dequantized(name)
        assert got.dtype == torch.float32 and got.shape == fq.shape
        if fmt == "modelopt" or torch.equal(stored.weight_scale_2, nvfp4.global_scale(g)):
            assert torch.equal(got, fq), name
        else:
            assert ((got - fq).abs() <= CT_REL_BOUND * fq.abs()).all(), name


def test_both_formats_store_identical_codes_and_scales(tiny_exports, case):
    modelopt = CheckpointReader(tiny_exports(case, "modelopt")[2])
    ct = CheckpointReader(tiny_exports(case, "compressed-tensors")[2])
    for name in modelopt.quantized_modules():
        a, b = modelopt.stored(name), ct.stored(name)
        assert torch.equal(a.packed, b.packed), name
        assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8)), name


def test_inputs_and_globals_follow_the_calibration(tiny_exports, case, fmt):
    _, result, path = tiny_exports(case, fmt)
    reader = CheckpointReader(path)
    w4a4 = result.config.quantize_inputs
    for name, (_, g, a) in expected_parts(result).items():
        stored = reader.stored(name)
        if fmt == "modelopt":
            assert torch.equal(stored.weight_scale_2, nvfp4.global_scale(g))
        else:
            gs = reader.tensor(f"{name}.weight_global_scale")
            assert torch.equal(gs, torch.tensor([2688.0]) / nvfp4.clamp_global_amax(g))
        assert (stored.input_scale is not None) == w4a4
        if w4a4 and fmt == "modelopt":
            assert torch.equal(stored.input_scale, nvfp4.input_scale(a))


@pytest.mark.parametrize("case", ["max", "dss"])
def test_other_tensors_pass_through_unchanged(tiny_exports, case, fmt):
    model, result, path = tiny_exports(case, fmt)
    tensors = _all_tensors(path)
    assert not [k for k in tensors if "_nvfp4_" in k]
    quantized_keys = {f"{part.name}.weight" for s in result.slots for part in s.parts()}
    for key, value in model.state_dict().items():
        if "_nvfp4_" in key:
            continue
        if key in quantized_keys:
            if fmt == "compressed-tensors":
                assert key not in tensors
            else:
                assert tensors[key].dtype == torch.uint8
            continue
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key


def test_config_carries_model_and_quantization_config(tiny_exports, case, fmt):
    model, result, path = tiny_exports(case, fmt)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["hidden_size"] == model.config.hidden_size
    ignore = sorted(result.ignored)
    assert "lm_head" in ignore
    if case != "max":  # only a few layers were targeted: every other linear is listed
        assert "model.layers.0.mlp.down_proj" in ignore
    assert config["quantization_config"] == quantization_config(ExportFormat(fmt), ignore,
                                                                result.config.quantize_inputs)
    if fmt == "modelopt":
        hf_quant = json.loads((path / "hf_quant_config.json").read_text())
        assert hf_quant["quantization"]["exclude_modules"] == ignore
    else:
        assert not (path / "hf_quant_config.json").exists()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            assert f.metadata() == {"format": "pt", "nvfp4_dist_format": fmt, "format_version": "1"}


def test_exports_pass_inspection(tiny_exports, case, fmt):
    _, result, path = tiny_exports(case, fmt)
    report = inspect_checkpoint(path)
    assert report.ok, report.format()
    assert len(report.files) > 1  # 1MB shards
    assert sorted(m.name for m in report.modules) == sorted(expected_parts(result))
    assert report.w4a4 == result.config.quantize_inputs


def test_existing_output_dir_is_refused(plain_run, tmp_path):
    model, result = plain_run
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(model, result, out)
    assert list(out.iterdir()) == []
    export_checkpoint(model, result, out, overwrite=True)
    assert inspect_checkpoint(out).ok


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_export_writes_nothing(plain_run, tmp_path, monkeypatch, overwrite):
    model, result = plain_run
    out = tmp_path / "out"
    if overwrite:  # an earlier export (its marker lists config.json), not just any directory
        out.mkdir()
        (out / "config.json").write_text("old")
        (out / MARKER_NAME).write_text(json.dumps(marker_content(["config.json"])))
    calls = []
    real = pieces.build_tensors

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # after the first quantized module was queued
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(pieces, "build_tensors", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_checkpoint(model, result, out, overwrite=overwrite, max_shard_size=256)
    assert len(calls) == 2
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    if overwrite:
        assert leftovers == ["out"] and (out / "config.json").read_text() == "old"
        assert sorted(p.name for p in out.iterdir()) == ["config.json", MARKER_NAME]
    else:
        assert leftovers == []


def test_fused_siblings_with_different_global_scales_are_refused(plain_run, tmp_path):
    model, result = plain_run
    state = result.states["k_proj"]
    result.states["k_proj"] = dataclasses.replace(state, global_amax=state.global_amax * 2)
    with pytest.raises(ExportError, match=r"(?s)qkv: k_proj .*q_proj .*v_proj"):
        export_checkpoint(model, result, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_partly_quantized_fused_groups_are_refused(make_block, tmp_path):
    model = make_block()
    config = QuantConfig(method="max", quantize_inputs=False, include=("[qk]_proj",))
    result = quantize(model, config, show_progress=False)
    with pytest.raises(ExportError, match=r"qkv: k_proj, q_proj are NVFP4 but v_proj stay in high precision"):
        export_checkpoint(model, result, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plain_module_export_skipped_layer_and_zero_weight(plain_run, tmp_path, fmt):
    model, result = plain_run
    config = {"model_type": "block", "hidden_size": 32}
    summary = export_checkpoint(model, result, tmp_path / "out", fmt=fmt, config=config)
    report = inspect_checkpoint(summary.path)
    assert report.ok, report.format()
    written = json.loads((summary.path / "config.json").read_text())
    assert written["hidden_size"] == 32 and written["quantization_config"]["ignore"] == ["odd"]
    assert summary.ignore == ("odd",) and "odd" not in summary.quantized
    reader = CheckpointReader(summary.path)
    assert torch.equal(reader.tensor("odd.weight"), model.odd.weight.detach())  # kept in high precision
    zero = reader.stored("zero")
    assert torch.isfinite(zero.weight_scale_2) and zero.weight_scale_2 > 0
    assert (zero.scale.float() > 0).all() and torch.isfinite(zero.scale.float()).all()
    assert torch.equal(reader.dequantized("zero"), torch.zeros(16, 32))
    assert torch.equal(reader.tensor("zero.bias"), model.zero.bias.detach())


def test_source_files_are_copied_and_weights_are_not(plain_run, tmp_path):
    model, result = plain_run
    source = tmp_path / "src"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json", "model.safetensors", "modeling_block.py"):
        (source / name).write_text(name)
    (source / "config.json").write_text(json.dumps({"model_type": "block", "vocab_size": 7}))
    summary = export_checkpoint(model, result, tmp_path / "out", source_dir=source)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        assert (summary.path / name).read_text() == name
    assert not (summary.path / "modeling_block.py").exists()
    assert (summary.path / "model.safetensors").exists() is False
    config = json.loads((summary.path / "config.json").read_text())
    assert config["vocab_size"] == 7 and "quantization_config" in config  # source config as the base
    with pytest.raises(ExportError, match="source_dir"):
        export_checkpoint(model, result, tmp_path / "other", source_dir=tmp_path / "missing")


def test_interleaved_export_parts_split_one_slot_into_modules(tmp_path):
    """A fused slot whose rows interleave q/k/v (Megatron's linear_qkv layout) exports three
    modules that take their rows by index and share the slot's global scale."""
    model = nn.Sequential()
    model.add_module("qkv", nn.Linear(32, 48, bias=False))
    result = quantize(model, QuantConfig(method="mse", quantize_inputs=False), show_progress=False)
    rows = {leaf: torch.arange(i, 48, 3) for i, leaf in enumerate(("q_proj", "k_proj", "v_proj"))}
    slot = dataclasses.replace(result.slots[0], export_parts=tuple(
        ExportPart(f"attn.{leaf}", index) for leaf, index in rows.items()))
    result.inventory = dataclasses.replace(result.inventory, slots=(slot,))
    summary = export_checkpoint(model, result, tmp_path / "out", fmt="compressed-tensors")
    assert sorted(summary.quantized) == ["attn.k_proj", "attn.q_proj", "attn.v_proj"]
    report = inspect_checkpoint(summary.path)
    assert report.ok and report.fused_groups == 1, report.format()
    state = result.states["qkv"]
    fq = nvfp4.fake_quant(model.qkv.weight.detach(), state.block_amax(), state.global_amax)
    reader = CheckpointReader(summary.path)
    for leaf, index in rows.items():
        stored = reader.stored(f"attn.{leaf}")
        assert stored.shape == (16, 32)
        scale = nvfp4.scale_fp8(state.block_amax(), state.global_amax)[index]
        assert torch.equal(stored.scale.view(torch.uint8), scale.view(torch.uint8))
        assert ((reader.dequantized(f"attn.{leaf}") - fq[index]).abs() <= CT_REL_BOUND * fq[index].abs()).all()


def test_tied_weights_are_written_once_under_the_first_name(tmp_path):
    model = nn.Module()
    model.embed_tokens = nn.Embedding(64, 32)
    model.proj = nn.Linear(32, 32)
    model.lm_head = nn.Linear(32, 64, bias=False)
    model.lm_head.weight = model.embed_tokens.weight  # tied, as with tie_word_embeddings
    result = quantize(model, QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    summary = export_checkpoint(model, result, tmp_path / "out")
    reader = CheckpointReader(summary.path)
    assert "lm_head.weight" not in reader.weight_map and summary.ignore == ("lm_head",)
    assert torch.equal(reader.tensor("embed_tokens.weight"), model.embed_tokens.weight.detach())
    assert reader.quantized_modules() == ["proj"]


def test_export_arguments_after_out_dir_are_keyword_only(plain_run, tmp_path):
    model, result = plain_run
    with pytest.raises(TypeError):
        export_checkpoint(model, result, tmp_path / "out", "modelopt")
    assert not (tmp_path / "out").exists()


def test_every_problem_is_raised_at_once_before_any_file(plain_run, tmp_path):
    model, result = plain_run
    model.register_buffer("pending", torch.empty(4, device="meta"))
    del result.states["zero"]
    with pytest.raises(ExportError, match=r"(?s)zero: no calibration state.*pending: a meta tensor"):
        export_checkpoint(model, result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


class _WithExtraState(nn.Linear):
    """A module with Megatron/TransformerEngine-style ``_extra_state`` (a tensor here)."""

    def get_extra_state(self):
        return torch.zeros(2)

    def set_extra_state(self, state):
        pass


def test_extra_state_is_not_exported(tmp_path):
    model = nn.Sequential()
    model.add_module("proj", _WithExtraState(32, 32))
    assert "proj._extra_state" in model.state_dict()
    result = quantize(model, QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    summary = export_checkpoint(model, result, tmp_path / "out")
    assert sorted(CheckpointReader(summary.path).weight_map) == [
        "proj.bias", "proj.weight", "proj.weight_scale", "proj.weight_scale_2"]


def test_fused_experts_are_exported_whole_or_not_at_all(tmp_path):
    model = build_embedded("tiny-moe", seed=0)
    config = QuantConfig(method="max", quantize_inputs=False, include=("model.layers.0.mlp.experts",))
    result = quantize(model, config, show_progress=False)
    result.inventory = dataclasses.replace(result.inventory, slots=tuple(
        s for s in result.slots if s.name != "model.layers.0.mlp.experts.3.down_proj"))
    with pytest.raises(ExportError, match=r"experts\.down_proj: only 7 of 8 experts are quantized"):
        export_checkpoint(model, result, tmp_path / "out")
    assert not (tmp_path / "out").exists()
