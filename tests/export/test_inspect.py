"""inspect_checkpoint: a good export passes; each kind of damage is found, all at once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4_dist.export.inspect import inspect_checkpoint
from nvfp4_dist.export.writer import INDEX_NAME


@pytest.fixture
def copy_of(tiny_exports, tmp_path):
    def get(case, fmt):
        dst = tmp_path / f"{case}-{fmt}"
        shutil.copytree(tiny_exports(case, fmt)[2], dst)
        return dst

    return get


def _index(path):
    return json.loads((path / INDEX_NAME).read_text())


def _rewrite(path, name, change):
    """Apply ``change(tensors)`` to the shard holding ``name`` (header metadata kept)."""
    file = path / _index(path)["weight_map"][name]
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata=metadata)


def _set(name, value):
    def change(tensors):
        tensors[name] = value(tensors[name])
    return change


def _edit_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def test_summary_of_a_good_export(tiny_exports):
    _, result, path = tiny_exports("max", "modelopt")
    report = inspect_checkpoint(path)
    assert report.ok
    assert report.fused_groups == 4  # q/k/v and gate/up in two layers
    text = report.format(verbose=True)
    assert "format:     modelopt, W4A4" in text and "result:     OK" in text
    assert "model.layers.0.self_attn.q_proj" in text and "ignored:    lm_head" in text


def test_every_problem_is_collected(copy_of):
    path = copy_of("max", "modelopt")
    layer = "model.layers.{}.{}"
    _rewrite(path, "model.norm.weight", _set("model.norm.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))))
    k_s2 = layer.format(0, "self_attn.k_proj.weight_scale_2")
    _rewrite(path, k_s2, _set(k_s2, lambda t: t * 2))
    down = layer.format(1, "mlp.down_proj.weight_scale")
    _rewrite(path, down, _set(down, lambda t: t.float()))
    up = layer.format(0, "mlp.up_proj.weight_scale")
    _rewrite(path, up, _set(up, lambda t: t.view(torch.uint8).index_fill(1, torch.tensor([0]), 0).view(torch.float8_e4m3fn)))
    o_in = layer.format(1, "self_attn.o_proj.input_scale")
    _rewrite(path, o_in, lambda tensors: tensors.pop(o_in))
    _edit_json(path / "hf_quant_config.json", lambda c: c["quantization"].pop("kv_cache_quant_algo"))

    report = inspect_checkpoint(path)
    text = report.format()
    expected = ["NaN/Inf values in 1 tensor(s): model.norm.weight (1)",
                "fused group model.layers.0.self_attn.qkv does not share one weight_scale_2",
                f"{down}: dtype torch.float32, expected torch.float8_e4m3fn",
                f"scales that are zero or negative: {up}",
                f"index maps {o_in} to",
                f"{o_in}: missing, but the config declares static input scales (W4A4)",
                "missing key 'kv_cache_quant_algo'"]
    for snippet in expected:
        assert any(snippet in p for p in report.problems), (snippet, text)
    assert len(report.problems) == len(expected)
    assert not report.ok and f"{len(expected)} problem(s)" in text


def test_index_and_file_inconsistencies(copy_of):
    path = copy_of("dss", "compressed-tensors")
    files = sorted(p.name for p in path.glob("*.safetensors"))
    save_file({"x": torch.zeros(1)}, path / "model-extra.safetensors")
    _edit_json(path / INDEX_NAME, lambda c: c["weight_map"].update({"ghost.weight": files[0]}))
    victim = files[-1]
    (path / victim).unlink()
    problems = inspect_checkpoint(path).problems
    assert any(p.startswith(f"index lists {victim}") for p in problems)
    assert any(f"index maps ghost.weight to {files[0]}" in p for p in problems)
    assert any("not referenced by the index: model-extra.safetensors" in p for p in problems)


def test_ignored_but_quantized_and_orphans_and_config(copy_of):
    path = copy_of("dss", "compressed-tensors")
    quantized = "model.layers.0.self_attn.k_proj"
    _edit_json(path / "config.json", lambda c: c["quantization_config"]["ignore"].append(f"re:.*{quantized[-9:]}$"))
    _edit_json(path / "config.json", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
               .update({"strategy": "group"}))
    first = sorted(_index(path)["weight_map"].items())[0]
    _rewrite(path, first[0], lambda t: t.update({"stray.weight_scale": torch.ones(1, 1).to(torch.float8_e4m3fn)}))
    _edit_json(path / INDEX_NAME, lambda c: c["weight_map"].update({"stray.weight_scale": first[1]}))
    problems = inspect_checkpoint(path).problems
    assert any(f"quantized modules that the ignore list excludes: {quantized}" in p for p in problems)
    assert any("strategy='group', expected 'tensor_group'" in p for p in problems)
    assert any("orphans): stray.weight_scale" in p for p in problems)


def test_not_a_checkpoint(tmp_path):
    assert "is not a directory" in inspect_checkpoint(tmp_path / "missing").problems[0]
    (tmp_path / "empty").mkdir()
    problems = inspect_checkpoint(tmp_path / "empty").problems
    assert any("config.json is missing" in p for p in problems)
    assert any("neither model.safetensors.index.json nor model.safetensors" in p for p in problems)


def test_fused_group_mixing_precisions(copy_of):
    path = copy_of("dss", "compressed-tensors")
    q = "model.layers.0.self_attn.q_proj"
    weight_map = _index(path)["weight_map"]
    names = [n for n in weight_map if n.startswith(q + ".")]
    for name in names:
        _rewrite(path, name, lambda tensors, name=name: tensors.pop(name))
    first = names[0]
    _rewrite(path, first, lambda tensors: tensors.update({f"{q}.weight": torch.zeros(256, 256)}))
    _edit_json(path / INDEX_NAME, lambda c: [c["weight_map"].pop(n) for n in names]
               + [c["weight_map"].update({f"{q}.weight": weight_map[first]})])
    problems = inspect_checkpoint(path).problems
    assert problems == ["high-precision members of fused groups whose other members are NVFP4 (engines "
                        f"load a fused layer in one precision): {q}"]
