"""benchmarks/bench_e2e.py runs end to end on a two-layer Qwen3 (and, with --moe, Qwen3-MoE) on
the CPU (the script's smoke test: the GPU figures in RESULTS.md come from the same code at full
size)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH_E2E = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_e2e.py"
# A two-layer model of tiny shapes, 4 x 16 tokens on the CPU.
SMALL = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--kv-heads", "1",
         "--head-dim", "32", "--vocab", "97", "--samples", "4", "--seq", "16", "--batch", "2", "--device", "cpu"]


def _run_bench(monkeypatch, out: Path, *args: str) -> str:
    """bench_e2e.py's main() with ``SMALL`` and ``args``; returns the markdown it wrote."""
    spec = importlib.util.spec_from_file_location("nvfp4_benchmarks_e2e", BENCH_E2E)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", *SMALL, *args, "--out", str(out)])
    module.main()
    return out.read_text()


def _rows(text: str, first: str) -> list[list[str]]:
    return [line.split(" | ") for line in text.splitlines() if line.startswith(f"| {first}")]


def test_bench_e2e_small_on_cpu(tmp_path, monkeypatch, capsys):
    text = _run_bench(monkeypatch, tmp_path / "e2e.md", "--methods", "max,local_hessian+dss")
    rows = [line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "quantize s" not in line and not line.startswith("|---")]
    assert [r[0] for r in rows] == ["| max", "| local_hessian+dss"]
    assert all(r[7] == "14" for r in rows)  # 2 layers x 7 linears quantized
    assert "observe" in rows[1][4] and "search" in rows[1][4]


MOE = ["--moe", "--experts", "4", "--top-k", "2", "--moe-intermediate", "32"]


def test_bench_e2e_moe_small_on_cpu(tmp_path, monkeypatch):
    """Both experts implementations, the per-kind breakdown, the QAT forward and the ModelOpt
    row (not importable here: the row says so)."""
    text = _run_bench(monkeypatch, tmp_path / "e2e.md", *MOE, "--methods", "local_hessian",
                      "--experts-impl", "eager,grouped_mm", "--breakdown", "--breakdown-method", "local_hessian",
                      "--qat", "--modelopt", "--profile", "--profile-top", "3")
    rows = _rows(text, "local_hessian")
    # per layer q/k/v/o and, per expert, gate_up and down: (4 + 4 * 2) x 2 layers; routers kept
    assert [(r[1], r[7]) for r in rows] == [("eager", "24"), ("grouped_mm", "24")]
    assert "Qwen3-MoE, 4 experts top-2" in text
    kinds = _rows(text, "dense") + _rows(text, "experts") + _rows(text, "both")
    assert [(r[0], r[1]) for r in kinds] == [("| dense", "8"), ("| experts", "16"), ("| both", "24")]
    fq = _rows(text, "one stacked fake-quant 4x64x64")
    assert len(fq) == 1 and "GPU kernels" in fq[0][0]
    assert len(_rows(text, "forward, fake-quant weights")) == 1
    assert len(_rows(text, "modelopt")) == 1
    profiled = _rows(text, "observe") + _rows(text, "search")
    # per stage: the total, then its top 3; the observers' own (observe less a plain forward)
    # include their block Hessians, which a plain forward never computes
    stages = [r[0] for r in profiled]
    assert stages == ["| observe"] * 4 + ["| observe less a plain forward"] * 4 + ["| search"] * 4
    assert all(r[1] == "(all kernels)" for r in profiled[::4])
    assert all(float(r[3]) >= 0 and r[4].endswith("% |") for r in profiled)
    extra_total, extra_top = float(profiled[4][3]), [float(r[3]) for r in profiled[5:8]]
    assert extra_total > 0 and extra_top == sorted(extra_top, reverse=True) and sum(extra_top) <= extra_total + 0.1
    # the W4A4 experts forward: all experts at once (installed), the per-expert loop, unquantized
    assert len(_rows(text, "forward, the same with the W4A4 experts as the per-expert loop")) == 1
    module_rows = _rows(text, "one experts module's forward")
    assert [r[0].split("), ")[1].split(" (")[0] for r in module_rows] == [
        "W4A4, all experts at once", "W4A4, per-expert loop", "inputs' fake-quant only, all experts at once",
        "inputs' fake-quant only, per-expert loop", "unquantized weights, transformers' forward"]
