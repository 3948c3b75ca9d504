"""benchmarks/bench_gptq.py runs end to end on a one-layer Qwen3 of tiny shapes on the CPU,
without ModelOpt (the script's smoke test: the GPU figures come from the same code at full size)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gptq.py"
SMALL = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--kv-heads", "1",
         "--head-dim", "32", "--vocab", "97", "--samples", "4", "--seq", "16", "--batch", "2", "--heldout", "2",
         "--device", "cpu"]


def test_bench_gptq_small_on_cpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("nvfp4_benchmarks_gptq", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "gptq.md"
    monkeypatch.setattr(sys, "argv", ["bench_gptq.py", *SMALL, "--runs", "gptq,modelopt", "--no-modelopt",
                                      "--inner", "--out", str(out)])
    module.main()
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| gptq")]
    assert len(rows) == 1
    err = float(rows[0].split(" | ")[4])
    assert 0.0 < err < 1.0  # quantized: some error, far from garbage
    assert "ModelOpt: skipped" in text
    inner = [line for line in text.splitlines() if line.startswith(("| q/k/v", "| gate/up", "| down"))]
    assert len(inner) == 3
