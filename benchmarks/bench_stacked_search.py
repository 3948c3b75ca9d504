"""The search stage of fused experts alone: seconds, torch operations, host syncs and memory of
:func:`nvfp4_dist.calib.stages.search` over the experts of a Qwen3-MoE model (the stacked search of
:mod:`nvfp4_dist.calib.batched`).

Run on a CUDA machine (Qwen3-30B-A3B shapes, 48 layers x 128 experts: 12,288 expert slots):
``python benchmarks/bench_stacked_search.py [--layers 8] [--methods local_hessian,local_hessian+dss]``.
The model and calibration are those of ``benchmarks/bench_e2e.py --moe`` (random bf16 weights,
128 x 512 random tokens in batches of 8, W4A4); only the experts are observed and searched. Per
method the table gives, from one plain search after a warm-up search (Triton's compilation):
its wall time, the bytes its results keep (memory allocated after it, less before) and its
temporaries (peak during it, less the results); from a second search under counters: the torch
operations it dispatches (a ``TorchDispatchMode``; the operations inside the stacked kernel
entries are counted apart, as calls of those entries) and its host syncs (CUDA's sync debug
mode; on the CPU the scalar reads ``item``/``tolist``/``bool``). Tiny shapes with ``--device cpu
--stub-kernels`` (``--hidden 64 --moe-intermediate 32 ...``; the stacked entries then return
zeros and no plain search runs) give the operation counts at the real slot counts.
"""

from __future__ import annotations

import argparse
import collections
import gc
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_e2e import METHODS, MOE_SHAPES, _kind_inventory, build_model, calibration_loop, sync
from nvfp4_dist import QuantConfig
from nvfp4_dist.calib import batched, stages
from nvfp4_dist.calib.discover import discover
from nvfp4_dist.kernels.types import ScaleChoice
from nvfp4_dist.parallel.access import local_shards
from nvfp4_dist.parallel.context import SINGLE_PROCESS


class OpCounter(TorchDispatchMode):
    """Counts the torch operations dispatched (by name) and the CPU scalar reads."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def counted_search(part, stats, config, device, stub: bool = False):
    """``(seconds, states, ops Counter, stacked-entry calls, syncs)`` of one search."""
    counter = OpCounter()
    calls = collections.Counter()
    inner = batched.search_block_scales_stacked

    def entry(*args, **kwargs):  # the kernels' own operations: one count per call
        calls[f"stacked {args[2].value}{'+dss' if kwargs.get('dss_betas') is not None else ''}"] += 1
        counter.paused += 1
        try:
            if stub:  # results of the right shapes (the counts around the search, not its values)
                w = args[0]
                amax = torch.zeros(*w.shape[:-1], w.shape[-1] // 16, device=w.device)
                return ScaleChoice(block_amax=amax, candidate=amax.long(), loss=amax,
                                   dss_beta=torch.ones_like(amax) if kwargs.get("dss_betas") is not None else None)
            return inner(*args, **kwargs)
        finally:
            counter.paused -= 1

    tolist = torch.Tensor.tolist
    reads = collections.Counter()

    def counted_tolist(self):
        reads["tolist"] += 1
        return tolist(self)

    batched.search_block_scales_stacked = entry
    torch.Tensor.tolist = counted_tolist
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            with counter:
                sync(device)
                t0 = time.perf_counter()
                states = stages.search(part, stats, config, show_progress=False)
                sync(device)
                seconds = time.perf_counter() - t0
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        batched.search_block_scales_stacked = inner
        torch.Tensor.tolist = tolist
    if device.type == "cuda":
        syncs = sum(1 for w in caught if "synchroniz" in str(w.message))
    else:  # scalar reads: what waits for the device on a GPU
        syncs = counter.ops["_local_scalar_dense"] + reads["tolist"]
    return seconds, states, counter.ops, calls, syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("head-dim", 128), ("vocab", 151936), ("samples", 128), ("seq", 512), ("batch", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in MOE_SHAPES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--methods", default="local_hessian,local_hessian+dss")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stub-kernels", action="store_true",
                        help="the stacked entries return zeros (CPU: the torch reference searches would take hours)")
    parser.add_argument("--top-ops", type=int, default=8, help="the most frequent operations listed")
    args = parser.parse_args()
    args.moe = True
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    device = torch.device(args.device)
    model = build_model(args, device)
    forward_loop = calibration_loop(args, device)

    print(f"| method | expert slots | search s | torch ops | stacked-entry calls | syncs | results GiB | "
          f"temporaries GiB | top ops |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        config = QuantConfig(**METHODS[name])
        part = _kind_inventory(discover(model, config, SINGLE_PROCESS), True)
        store = stages.observe(model, part, config, forward_loop)
        with local_shards(model):
            stats = stages.reduce(part, store, True, SINGLE_PROCESS, device)
            kept = temp = seconds = 0.0
            if not args.stub_kernels:
                stages.search(part, stats, config, show_progress=False)  # warm-up: Triton's compilation
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                states = stages.search(part, stats, config, show_progress=False)
                sync(device)
                seconds = time.perf_counter() - t0
                if device.type == "cuda":
                    kept = (torch.cuda.memory_allocated(device) - base) / 2**30
                    temp = (torch.cuda.max_memory_allocated(device) - base) / 2**30 - kept
                del states
            # the counts: a second search under the counters (which slow it down)
            _, states, ops, calls, syncs = counted_search(part, stats, config, device, args.stub_kernels)
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top_ops))
        entry = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
        print(f"| {name} | {len(part.slots)} | {seconds:.2f} | {sum(ops.values())} | {entry} | {syncs} | "
              f"{kept:.2f} | {temp:.2f} | {top} |", flush=True)
        del states, stats, store
        gc.collect()


if __name__ == "__main__":
    main()
