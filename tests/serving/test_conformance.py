"""Per engine: the exports the CLI makes are what its NVFP4 loader expects (see engines.py).

Cases: {tiny-dense (Qwen3), tiny-moe (Qwen3-MoE: per-expert linears, routers)} x {W4A4, W4A16}
x {ModelOpt, compressed-tensors} in one process, checked against every engine of the format
(vLLM modelopt_fp4 / compressed-tensors, SGLang, TensorRT-LLM), and by ``inspect``.
"""

from __future__ import annotations

import json

import pytest

from conftest import FORMATS, MODELS, MODES
from engines import ENGINES, check, engines_for

from nvfp4_dist.export.inspect import inspect_checkpoint

# Every engine that serves the export's format and mode (TensorRT-LLM has no NVFP4 weight-only
# path: W4A16 exports are served by vLLM or SGLang, whose cases cover them).
CASES = [(model, fmt, mode, engine) for model in MODELS for fmt in FORMATS for mode in MODES
         for engine in engines_for(fmt) if mode == "w4a4" or ENGINES[engine].weight_only]


@pytest.mark.parametrize("model,fmt,mode,engine", CASES, ids=["-".join(c) for c in CASES])
def test_engine_loads_export(exports, model, fmt, mode, engine):
    path = exports(model, fmt, mode)
    assert check(engine, path, w4a4=mode == "w4a4") == []


@pytest.mark.parametrize("model,fmt,mode", [(m, f, w) for m in MODELS for f in FORMATS for w in MODES])
def test_inspect_passes_and_reports_the_mode(exports, model, fmt, mode):
    report = inspect_checkpoint(exports(model, fmt, mode))
    assert report.ok, report.format()
    assert report.w4a4 is (mode == "w4a4")
    if model == "tiny-moe":
        assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"} <= set(report.ignore)


@pytest.mark.parametrize("mode", MODES)
def test_modelopt_quant_algo_in_both_configs(exports, mode):
    path = exports("tiny-dense", "modelopt", mode)
    algo = {"w4a4": "NVFP4", "w4a16": "W4A16_NVFP4"}[mode]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    hf = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert (qc["quant_algo"], hf["quant_algo"]) == (algo, algo)
    assert qc["kv_cache_quant_algo"] is None and hf["kv_cache_quant_algo"] is None


@pytest.mark.distributed
@pytest.mark.parametrize("fmt", FORMATS)
def test_torchrun_fsdp2_export_conforms(exports, fmt):
    """One 2-rank FSDP2 run per format (fused experts sharded by FSDP2 are refused by design, so
    the MoE model is covered by the one-process path)."""
    path = exports("tiny-dense", fmt, "w4a4", ranks=2)
    for engine in engines_for(fmt):
        assert check(engine, path, w4a4=True) == [], engine
    assert inspect_checkpoint(path).ok
