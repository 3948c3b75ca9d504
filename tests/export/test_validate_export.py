"""Nothing invalid is published: each piece is validated while written (reader's merge +
dequantize), the staged configs/index are checked; on failure ExportError (one line) names the
modules, the staging directory is discarded and an old export stays byte-identical."""

from __future__ import annotations

import json

import pytest
import torch

import nvfp4_dist.export.pieces as pieces
from nvfp4_dist.errors import ExportError
from nvfp4_dist.export import export_checkpoint
from nvfp4_dist.export.formats import ExportFormat, build_tensors
from nvfp4_dist.export.validate import piece_problems, staged_problems

from test_outdir import snapshot


def _poison(monkeypatch, module: str, what: str):
    real = pieces.build_tensors

    def poisoned(fmt, name, packed, scale, global_amax, input_amax=None):
        out = real(fmt, name, packed, scale, global_amax, input_amax)
        if name == module:
            key = next(k for k in out if k.endswith(what))
            bad = torch.full_like(out[key].float(), float("nan") if "scale" == what else float("inf"))
            out[key] = bad.to(out[key].dtype)
        return out

    monkeypatch.setattr(pieces, "build_tensors", poisoned)


# (format, suffix of the poisoned tensor): ModelOpt's block and global scales, compressed-tensors'
# global scale
@pytest.mark.parametrize("fmt, what", [("modelopt", "scale"), ("modelopt", "_2"),
                                       ("compressed-tensors", "global_scale")])
def test_invalid_scales_publish_nothing(plain_run, tmp_path, monkeypatch, fmt, what):
    model, result = plain_run
    _poison(monkeypatch, "k_proj", what)
    with pytest.raises(ExportError, match="failed validation, nothing was published.*k_proj") as info:
        export_checkpoint(model, result, tmp_path / "out", fmt=fmt, max_shard_size=256)
    assert "\n" not in str(info.value) and "q_proj" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no target, no staging, no lock


def test_invalid_export_keeps_the_old_one(plain_run, tmp_path, monkeypatch):
    model, result = plain_run
    out = tmp_path / "out"
    export_checkpoint(model, result, out)
    before = snapshot(tmp_path)
    _poison(monkeypatch, "zero", "scale")
    with pytest.raises(ExportError, match="zero .non-finite FP8 block scales"):
        export_checkpoint(model, result, out, overwrite=True)
    assert snapshot(tmp_path) == before


def test_piece_problems_by_the_reader(fmt):
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (32, 16), dtype=torch.uint8, generator=gen)
    scale = torch.full((32, 2), 1.0).to(torch.float8_e4m3fn)
    good = build_tensors(ExportFormat(fmt), "m", packed, scale, torch.tensor(3.0), torch.tensor(2.0))
    assert piece_problems(ExportFormat(fmt), good.items()) == []
    zero = dict(good)
    zero["m.weight_scale"] = torch.zeros(32, 2).to(torch.float8_e4m3fn)
    assert piece_problems(ExportFormat(fmt), zero.items()) == ["m (zero or negative FP8 block scales)"]
    missing = {k: v for k, v in good.items() if not k.endswith("weight_scale")}
    assert "quantized tensors missing" in piece_problems(ExportFormat(fmt), missing.items())[0]
    assert piece_problems(ExportFormat(fmt), [("dense.weight", torch.full((2, 2), float("nan")))]) == []


def test_staged_check_finds_a_broken_index(plain_run, tmp_path):
    model, result = plain_run
    export_checkpoint(model, result, tmp_path / "out", max_shard_size=256)
    staged = tmp_path / "out"
    assert staged_problems(staged, ExportFormat.MODELOPT) == []
    assert "compressed-tensors" in staged_problems(staged, ExportFormat.COMPRESSED_TENSORS)[0]
    index = json.loads((staged / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name + ".extra"] = index["weight_map"][name]
    (staged / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any("differ from the index" in p for p in staged_problems(staged, ExportFormat.MODELOPT))
