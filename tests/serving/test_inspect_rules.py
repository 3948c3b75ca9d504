"""inspect fails what an engine would mis-load: an unlisted router, a wrong quant_algo, split
fused input scales."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4_dist.export.inspect import inspect_checkpoint


def _copy(exports, tmp_path, *key):
    dst = tmp_path / "copy"
    shutil.copytree(exports(*key), dst)
    return dst


def _edit(path, change, name="config.json"):
    content = json.loads((path / name).read_text())
    change(content)
    (path / name).write_text(json.dumps(content))


def test_router_missing_from_ignore_list_is_a_failure(exports, tmp_path):
    for fmt in ("modelopt", "compressed-tensors"):
        path = _copy(exports, tmp_path / fmt, "tiny-moe", fmt, "w4a4")
        drop = lambda qc: qc.update(ignore=[x for x in qc["ignore"] if x != "model.layers.1.mlp.gate"])
        _edit(path, lambda c: drop(c["quantization_config"]))
        if fmt == "modelopt":
            _edit(path, lambda c: c["quantization"].update(
                exclude_modules=[x for x in c["quantization"]["exclude_modules"] if x != "model.layers.1.mlp.gate"]),
                "hf_quant_config.json")
        report = inspect_checkpoint(path)
        assert not report.ok
        assert any("not in the ignore list" in p and "model.layers.1.mlp.gate" in p for p in report.problems)
        assert not any("embed_tokens" in p for p in report.problems)


def test_quant_algo_must_match_input_scales(exports, tmp_path):
    path = _copy(exports, tmp_path, "tiny-dense", "modelopt", "w4a4")
    _edit(path, lambda c: c["quantization"].update(quant_algo="W4A16_NVFP4"), "hf_quant_config.json")
    problems = inspect_checkpoint(path).problems
    assert problems and all("hf_quant_config.json" in p and "W4A16_NVFP4" in p for p in problems), problems


def test_fused_input_scales_must_be_equal(exports, tmp_path):
    path = _copy(exports, tmp_path, "tiny-dense", "modelopt", "w4a4")
    name = "model.layers.0.self_attn.k_proj.input_scale"
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    file = path / index[name]
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[name] = tensors[name] * 2
    save_file(tensors, file, metadata=metadata)
    problems = inspect_checkpoint(path).problems
    assert len(problems) == 1 and "does not share one input_scale" in problems[0], problems
