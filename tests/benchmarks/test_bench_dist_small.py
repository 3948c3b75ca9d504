"""benchmarks/bench_dist.py on two ranks of the test harness (gloo on the CPU; NCCL with
``--dist-backend nccl``), tiny shapes, one test per layout: the table has a row per phase and
rank, the one-GPU phase moves no byte between ranks while the layout does, and each rank of the
layout holds its share of the weights (the GPU figures in RESULTS.md come from the same code at
full size: scripts/gpu_two_gpu.sh)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

BENCH_DIST = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dist.py"
# Two layers; 4 query heads in 2 groups and a vocabulary of 128 split evenly at TP=2. Method max:
# the test checks the table, the collectives and the bytes held, not the searches (the CPU
# reference's Hessian search would double its time).
SMALL = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
         "--head-dim", "16", "--vocab", "128", "--samples", "4", "--seq", "16", "--batch", "2",
         "--method", "max"]
MOE = ["--moe", "--experts", "4", "--top-k", "2", "--moe-intermediate", "32"]


def _bench_worker(argv: list[str]) -> dict:
    """One rank: bench_dist's run(argv); rank 0 returns its table and rows."""
    from dataclasses import asdict

    spec = importlib.util.spec_from_file_location("nvfp4_bench_dist", BENCH_DIST)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    if "--moe" in argv:
        # megatron-core 0.16.1 without TransformerEngine: the name its router reads (as in
        # tests/moe/test_megatron_moe.py; 0.19 defines it)
        import megatron.core.transformer.moe.moe_utils as moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
    report = bench.run(argv)
    return {} if report is None else {"text": report.text, "rows": [asdict(r) for r in report.rows]}


LAYOUTS = {
    "megatron-tp2": (["--backend", "megatron", "--tp", "2"], "megatron TP=2", "one GPU (megatron TP=1 EP=1)"),
    "fsdp2": (["--backend", "fsdp2", "--split-calib"], "fsdp2", "one GPU (HF model)"),
    "megatron-ep2": (["--backend", "megatron", "--ep", "2", "--split-calib", *MOE], "megatron EP=2",
                     "one GPU (megatron TP=1 EP=1)"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bench_dist_two_ranks(layout, tmp_path):
    options, name, one = LAYOUTS[layout]
    if options[1] == "megatron":
        pytest.importorskip("megatron.core")
    out = tmp_path / "dist.md"
    report = run_ranks(_bench_worker, 2, [*SMALL, *options, "--out", str(out)], timeout_s=600)[0]
    text, rows = out.read_text(), report["rows"]
    assert [(r["phase"], r["rank"]) for r in rows] == [(one, 0), (one, 1), (name, 0), (name, 1)]
    for r in rows:
        assert f"| {r['phase']} | {r['rank']} |" in text
        assert {"discover", "observe", "reduce", "search", "apply"} <= set(r["seconds"])
    base, lay = rows[:2], rows[2:]
    # one GPU: each rank alone, nothing crosses ranks; the layout communicates in quantize()
    assert all(r["calls"] == 0 and r["coll_bytes"] == 0 and r["forward_bytes"] == 0 for r in base)
    assert all(r["calls"] > 0 and r["coll_bytes"] > 0 for r in lay)
    assert f"{name} against one GPU: quantize()" in text and "search" in text
    if layout == "megatron-ep2":
        # per layer: linear_qkv and linear_proj on every rank, 4 experts x (fc1, fc2) split 2 / 2
        assert [r["slots"] for r in rows] == [20, 20, 12, 12]
        assert all(r["weight_bytes"] < base[0]["weight_bytes"] for r in lay)
    else:
        # TP=2 and FSDP2 split every quantized weight in half over the two ranks
        assert all(2 * r["weight_bytes"] == base[0]["weight_bytes"] for r in lay)
        assert all(r["forward_bytes"] > 0 for r in lay)  # TP all-reduces / FSDP2 all-gathers
