"""The calibration observers' own GPU cost: the dense and the fused-experts statistics updates,
the former implementation beside the current one (a scratch benchmark for issue 18's "observer
overhead <= 30% of a plain forward").

Run on a CUDA machine: ``python benchmarks/bench_observers.py [--device cuda] [--out FILE.md]``.
Times are CUDA-event medians (after a warm-up) of one call, in microseconds, printed as markdown
tables:

* dense: ``InputStats.update`` of x ``[4096, 2048]`` and ``[4096, 4096]`` bf16 (fp32 block
  Hessians + amax), two former implementations (session 8: one batched product over all tokens,
  ``.float()`` of the batch, ``abs().amax()``; session 10: interleaved sub-sums, six launches)
  against the current one (one Triton launch), the kernel at the tiles of ``--dense-tiles``, the
  parts of the torch path and its formulation at other sub-sum lengths (``--subsums``);
* experts: ``ExpertStats.update`` with 128 experts, 32768 routed rows (top-8 of 4096 tokens) of
  2048 and 768 channels, with Hessian: the former (separate abs/amax/nan_to_num/scatter_reduce
  amax) against the current (amax fused into the block-Hessian kernel), plus the kernel alone
  at the tile choices of ``--tiles`` (block columns x warps: the same bits, only the speed
  differs), the grouping of the routing choices by expert (torch sort against the kernel at the
  tiles of ``--grouping-tiles``), and the observer's former gather of the routed rows against reading them through
  the row index.

``--host``: instead, the host (CPU) time per call of each observer step on 16 tokens, the former
beside the current: with a GPU running ahead, a forward with observers waits for their launches.

The former implementations live only here (copies), never as a library switch. ``--device cpu
--tokens 256 --experts 8`` makes a smoke test (the kernel variants need CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch

from nvfp4_dist.kernels import dispatch
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.layout import stats as S
from nvfp4_dist.layout.stats import ExpertStats, InputStats


# ----------------------------------------------------------------------------- former versions
def old_dense_update(self: InputStats, x: torch.Tensor) -> None:
    """InputStats.update before the sub-sums (fp32 per-block path; a copy, for timing)."""
    x = x.detach().reshape(-1, x.shape[-1])
    amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
    self.tokens += x.shape[0]
    if not self.with_hessian or x.shape[0] == 0:
        return
    if self.hessian_sum is None:
        self.hessian_sum = self._zeros(x.device)
    for start in range(0, x.shape[0], S._TOKEN_CHUNK):
        xb = x[start:start + S._TOKEN_CHUNK].float().to(self.accum_dtype)
        xb = xb.reshape(-1, self.cin // 16, 16).transpose(0, 1)
        self.hessian_sum += torch.bmm(xb.transpose(1, 2), xb)


def session10_dense_update(self: InputStats, x: torch.Tensor) -> None:
    """InputStats.update of session 10 (six launches: running amax by vector_norm + maximum, an
    fp32 copy, the sub-sums' batched product, their sum, the addition; a copy, for timing)."""
    x = x.detach().reshape(-1, x.shape[-1])
    amax = torch.linalg.vector_norm(x, float("inf"))
    self.amax = amax.float() if self.amax is None else torch.maximum(self.amax, amax)
    self.tokens += x.shape[0]
    if self.hessian_sum is None:
        self.hessian_sum = self._zeros(x.device)
    for start in range(0, x.shape[0], R.DENSE_TOKEN_CHUNK):
        self.hessian_sum += R.block_grams(x[start:start + R.DENSE_TOKEN_CHUNK].float())


def old_expert_update(self: ExpertStats, x: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor) -> None:
    """ExpertStats.update before the fused amax (a copy, for timing)."""
    n_experts, cin = len(self.members), self.members[0].cin
    if self.amax is None:
        self.tokens = torch.zeros(n_experts, dtype=torch.int64, device=x.device)
        self.amax = torch.zeros(n_experts, dtype=torch.float32, device=x.device)
    self.tokens += (offsets[1:] - offsets[:-1]).to(self.tokens.device)
    if x.shape[0]:
        row_amax = torch.nan_to_num(x.abs().amax(dim=-1).float(), nan=float("inf"))
        amax = torch.zeros(n_experts + 1, dtype=torch.float32, device=x.device)
        amax.scatter_reduce_(0, row_expert.long(), row_amax, reduce="amax")
        self.amax = torch.maximum(self.amax, amax[:n_experts])
    if self.members[0].with_hessian and x.shape[0]:
        if self.hessian_sum is None:
            self.hessian_sum = torch.zeros(n_experts, cin // 16, 16, 16, dtype=torch.float64, device=x.device)
        dispatch.expert_block_hessians(x, offsets, self.hessian_sum, kernels=self.kernels)


# ----------------------------------------------------------------------------- candidates
def grams_packed(x: torch.Tensor, subsum_tokens: int) -> torch.Tensor:
    """Alternative: cast bf16 -> fp32 straight into a [c * nb, k, 16] contiguous layout (each
    product's operand in one piece), then the same batched product and sum."""
    n, cin = x.shape
    nb, c = cin // 16, max(1, n // subsum_tokens)
    k = n // c
    v = torch.empty(c * nb, k, 16, dtype=torch.float32, device=x.device)
    v.view(c, nb, k, 16).copy_(x[:c * k].view(k, c, nb, 16).permute(1, 2, 0, 3))
    out = torch.bmm(v.transpose(1, 2), v).view(c, nb, 16, 16).sum(0)
    if c * k < n:
        tail = x[c * k:].float().reshape(-1, nb, 16).transpose(0, 1)
        out += torch.bmm(tail.transpose(1, 2), tail)
    return out


def grams_paired(xf: torch.Tensor, subsum_tokens: int) -> torch.Tensor:
    """Alternative: products of 32-channel pairs of blocks (a 32x32 tile fully used, half its
    entries wasted), their two diagonal 16x16 blocks kept; fp32 x, no tail (n % c == 0 here)."""
    n, cin = xf.shape
    npair, c = cin // 32, max(1, n // subsum_tokens)
    k = n // c
    v = xf[:c * k].reshape(k, c * npair, 32).transpose(0, 1)
    g = torch.bmm(v.transpose(1, 2), v).view(c, npair, 2, 16, 2, 16).sum(0)
    return torch.stack([g[:, 0, :, 0], g[:, 1, :, 1]], dim=1).reshape(cin // 16, 16, 16)


def grams_bf16_tensor_cores(x: torch.Tensor, subsum_tokens: int) -> torch.Tensor:
    """Alternative (CUDA): bf16 operands, fp32 output (products of two bf16 values are exact in
    fp32; the tensor cores' accumulation is fp32 but not IEEE round-to-nearest per step)."""
    n, cin = x.shape
    nb, c = cin // 16, max(1, n // subsum_tokens)
    k = n // c
    v = x[:c * k].reshape(k, c * nb, 16).transpose(0, 1)
    out = torch.bmm(v.transpose(1, 2), v, out_dtype=torch.float32).view(c, nb, 16, 16).sum(0)
    if c * k < n:
        tail = x[c * k:].float().reshape(-1, nb, 16).transpose(0, 1)
        out += torch.bmm(tail.transpose(1, 2), tail)
    return out


def _dense_kernel_grams(x: torch.Tensor) -> torch.Tensor:
    h = torch.zeros(x.shape[-1] // 16, 16, 16, device=x.device)
    dispatch.dense_input_stats(x, torch.zeros((), device=x.device), h)
    return h


# ----------------------------------------------------------------------------- timing
def time_us(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median of ``reps`` timings of one call (CUDA events; wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
    else:
        import time
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def dense_rows(args, device) -> list[tuple[str, str, float]]:
    rows = []
    for cin in args.dense_cin:
        x = torch.randn(args.tokens, cin, device=device).to(torch.bfloat16)
        shape = f"[{args.tokens}, {cin}] bf16"

        def timed(label, fn):
            try:
                rows.append((shape, label, time_us(fn, device, args.warmup, args.reps)))
            except Exception as exc:  # a candidate this torch build lacks: say so, time the rest
                rows.append((shape, f"{label} (failed: {type(exc).__name__}: {str(exc)[:60]})", float("nan")))

        old, s10, new = (InputStats(cin=cin, with_hessian=True) for _ in range(3))
        timed("former InputStats.update (session 8)", lambda: old_dense_update(old, x))
        timed("InputStats.update of session 10 (block_grams, six launches)", lambda: session10_dense_update(s10, x))
        timed("InputStats.update (now)", lambda: new.update(x))
        ref = old.hessian_sum.double()
        rel = ((new.hessian_sum.double() - ref).abs().max() / ref.abs().max()).item()
        rows.append((shape, "  max |now - former| / max |H| (fp32 rounding)", rel))
        if device.type == "cuda":
            from nvfp4_dist.kernels import dense_stats_kernel as K
            h, amax = torch.zeros(cin // 16, 16, 16, device=device), torch.zeros((), device=device)
            for tile in args.dense_tiles:
                chunk, warps = (int(v) for v in tile.split("x"))
                timed(f"  dense kernel, {chunk} tokens per step x {warps} warps",
                      lambda c=chunk, w=warps: K.launch_dense_stats(x, amax, h, chunk=c, num_warps=w))
        timed("  part: x.float()", lambda: x.float())
        timed("  part: abs().amax() (former amax)", lambda: x.abs().amax().float())
        timed("  part: aminmax (session 9's amax)", lambda: torch.aminmax(x))
        xf = x.float()
        blocks = xf.reshape(-1, cin // 16, 16).transpose(0, 1)
        timed("  part: former bmm (fp32)", lambda: torch.bmm(blocks.transpose(1, 2), blocks))
        exact = xf.double().reshape(-1, cin // 16, 16).transpose(0, 1)
        exact = torch.bmm(exact.transpose(1, 2), exact)
        scale = exact.abs().amax()
        candidates = [("block_grams fp32 (now)", lambda: R.block_grams(xf)),
                      ("former bmm fp32", lambda: torch.bmm(blocks.transpose(1, 2), blocks))]
        if device.type == "cuda":
            candidates.append(("bf16 tensor-core grams", lambda: grams_bf16_tensor_cores(x, R.SUBSUM_TOKENS)))
            candidates.append(("dense kernel (now)", lambda: _dense_kernel_grams(x)))
        for label, fn in candidates:
            try:
                err = ((fn().double() - exact).abs().amax() / scale).item()
            except Exception:
                err = float("nan")
            rows.append((shape, f"  max |{label} - exact| / max |H|", err))
        del exact
        for k in args.subsums:
            timed(f"  block_grams fp32, {k} tokens per sub-sum", lambda k=k: R.block_grams(xf, k))
            timed(f"  cast-packed grams, {k} tokens per sub-sum", lambda k=k: grams_packed(x, k))
            timed(f"  paired-block grams fp32, {k} tokens per sub-sum", lambda k=k: grams_paired(xf, k))
            if device.type == "cuda":
                timed(f"  bf16 tensor-core grams, {k} tokens per sub-sum",
                      lambda k=k: grams_bf16_tensor_cores(x, k))
    return rows


def top_k_index(args, device, tokens: int | None = None) -> torch.Tensor:
    """``[tokens, top_k]`` expert indices (default ``args.tokens`` tokens) of random scores over
    ``args.experts`` experts (seed 0): the routing every experts row times."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    scores = torch.rand(tokens or args.tokens, args.experts, generator=gen)
    return scores.topk(args.top_k, dim=-1).indices.to(device)


def routed(args, device):
    """:func:`top_k_index` grouped as the stacked observer groups it: (rows, offsets, row_expert)."""
    from nvfp4_dist.parallel.hf_experts import grouped_rows
    return grouped_rows(top_k_index(args, device), args.experts)


def grouping_rows(args, device) -> list[tuple[str, str, float]]:
    """The grouping of the routing choices by expert: the torch sort (the reference) against the
    kernel at the tiles of ``--grouping-tiles`` (CUDA; the same integers at every tile)."""
    from nvfp4_dist.kernels import grouping_kernel, reference
    top = top_k_index(args, device)
    shape = f"top-{args.top_k} of {args.experts} experts, {args.tokens} tokens"
    rows = [(shape, "routing: torch stable sort + search (reference)",
             time_us(lambda: reference.grouped_choices(top, args.experts, args.top_k), device, args.warmup, args.reps))]
    if device.type == "cuda":
        want = reference.grouped_choices(top, args.experts, args.top_k)
        for tile in args.grouping_tiles:
            size, warps = (int(v) for v in tile.split("x"))
            got = grouping_kernel.launch_grouped_choices(top, args.experts, args.top_k, tile=size, num_warps=warps)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            rows.append((shape, f"routing kernel, tile {size} x {warps} warps{'' if same else ' (DIFFERS)'}",
                         time_us(lambda size=size, w=warps: grouping_kernel.launch_grouped_choices(
                             top, args.experts, args.top_k, tile=size, num_warps=w), device, args.warmup, args.reps)))
    return rows


def expert_rows(args, device) -> list[tuple[str, str, float]]:
    rows = grouping_rows(args, device)
    rows_idx, offsets, row_expert = routed(args, device)
    for cin in args.expert_cin:
        hidden = torch.randn(args.tokens, cin, device=device).to(torch.bfloat16)
        x = hidden[rows_idx]
        shape = f"{args.experts} experts, [{x.shape[0]}, {cin}] bf16"

        def timed(label, fn):
            rows.append((shape, label, time_us(fn, device, args.warmup, args.reps)))

        def fresh():
            return ExpertStats([InputStats(cin=cin, with_hessian=True, accum_dtype=torch.float64)
                                for _ in range(args.experts)])

        old, new, gathered, indexed = fresh(), fresh(), fresh(), fresh()
        timed("former ExpertStats.update", lambda: old_expert_update(old, x, offsets, row_expert))
        timed("ExpertStats.update (now)", lambda: new.update(x, offsets, row_expert))
        timed("gather + ExpertStats.update (the former observer: x = hidden[rows] first)",
              lambda: gathered.update(hidden[rows_idx], offsets, row_expert))
        timed("ExpertStats.update through the row index (the observer now)",
              lambda: indexed.update(hidden, offsets, row_expert, rows=rows_idx))
        assert torch.equal(old.amax, new.amax), "amax differs from the former computation"
        assert torch.equal(indexed.hessian_sum, new.hessian_sum), "the row index changes the sums"
        rows.append((shape, "  amax now == former, sums through the index == gathered (bits)", 1.0))
        h = torch.zeros(args.experts, cin // 16, 16, 16, dtype=torch.float64, device=device)
        amax = torch.zeros(args.experts, dtype=torch.float32, device=device)
        timed("  part: Hessian kernel alone", lambda: dispatch.expert_block_hessians(x, offsets, h))
        timed("  part: Hessian kernel + amax", lambda: dispatch.expert_block_hessians(x, offsets, h, amax=amax))
        timed("  part: the gather hidden[rows]", lambda: hidden[rows_idx])
        timed("  part: former amax (abs/amax/nan_to_num/scatter)",
              lambda: torch.zeros(args.experts + 1, device=device).scatter_reduce_(
                  0, row_expert, torch.nan_to_num(x.abs().amax(dim=-1).float(), nan=float("inf")), reduce="amax"))
        if device.type == "cuda":
            from nvfp4_dist.kernels import block_hessian_kernel as K
            off = offsets.to(torch.int64).contiguous()
            ref = torch.zeros_like(h)
            K.launch_block_hessians(x, off, ref, amax)
            for tile in args.tiles:
                bb, warps = (int(v) for v in tile.split("x"))
                got = torch.zeros_like(h)
                K.launch_block_hessians(x, off, got, amax, bb=bb, num_warps=warps)
                same = torch.equal(got, ref)
                timed(f"  kernel+amax, tile {bb} blocks x {warps} warps{'' if same else ' (BITS DIFFER)'}",
                      lambda bb=bb, w=warps: K.launch_block_hessians(x, off, h, amax, bb=bb, num_warps=w))
    return rows


def host_us(fn, device: torch.device, calls: int = 200) -> float:
    """Host microseconds per call: ``calls`` back-to-back calls, one synchronize at the end. On
    inputs this small the GPU finishes each call's kernels before the next is launched, so the
    figure is the CPU's cost of issuing the call (what a forward waits for once it has no slack)."""
    import time
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def former_amax(stats: InputStats, x: torch.Tensor) -> None:
    """The dense input amax of session 9 (aminmax, two abs, max, cast, running max; a copy)."""
    low, high = torch.aminmax(x)
    amax = torch.maximum(low.abs(), high.abs()).float()
    stats.amax = amax if stats.amax is None else torch.maximum(stats.amax, amax)


def host_rows(args, device) -> list[tuple[str, str, float]]:
    """Host time per call of each observer step on 16 tokens (see :func:`host_us`)."""
    from nvfp4_dist.kernels import reference
    from nvfp4_dist.parallel.hf_experts import grouped_rows
    tokens, rows = 16, []
    top = top_k_index(args, device, tokens)
    shape = f"{tokens} tokens, top-{args.top_k} of {args.experts} experts"
    rows.append((shape, "former routing: stable sort + search (the torch reference)",
                 host_us(lambda: reference.grouped_choices(top, args.experts, args.top_k), device)))
    rows.append((shape, "routing now (grouped_rows: one launch on the GPU)",
                 host_us(lambda: grouped_rows(top, args.experts), device)))
    idx, offsets, row_expert = grouped_rows(top, args.experts)
    for cin in args.expert_cin:
        hidden = torch.randn(tokens, cin, device=device).to(torch.bfloat16)
        x = hidden[idx]
        stats = [ExpertStats([InputStats(cin=cin, with_hessian=True, accum_dtype=torch.float64)
                              for _ in range(args.experts)]) for _ in range(2)]
        label = f"{args.experts} experts, {cin} ch, {x.shape[0]} rows"
        rows.append((label, "former ExpertStats.update",
                     host_us(lambda: old_expert_update(stats[0], x, offsets, row_expert), device)))
        rows.append((label, "ExpertStats.update through the row index (now)",
                     host_us(lambda: stats[1].update(hidden, offsets, row_expert, rows=idx), device)))
    for cin in args.dense_cin:
        x = torch.randn(tokens, cin, device=device).to(torch.bfloat16)
        stats, amax = InputStats(cin=cin, with_hessian=True), InputStats(cin=cin, with_hessian=False)
        label = f"[{tokens}, {cin}] bf16"
        s10 = InputStats(cin=cin, with_hessian=True)
        rows.append((label, "InputStats.update of session 10 (six launches)",
                     host_us(lambda: session10_dense_update(s10, x), device)))
        rows.append((label, "InputStats.update (now)", host_us(lambda: stats.update(x), device)))
        rows.append((label, "  part: amax alone now", host_us(lambda: amax.update(x), device)))
        rows.append((label, "  part: former amax (aminmax, abs, abs, max, cast, running max)",
                     host_us(lambda: former_amax(amax, x), device)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per observed batch (8 x 512)")
    p.add_argument("--dense-cin", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--expert-cin", type=int, nargs="+", default=[2048, 768])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--subsums", type=int, nargs="+", default=[64, 128, 256, 512, 1024],
                   help="tokens per sub-sum of the dense fp32 block Hessians to time")
    p.add_argument("--dense-tiles", nargs="+", default=["128x4", "64x4", "256x4", "128x8", "64x2", "256x8"],
                   help="dense statistics kernel tiles CHUNKxWARPS (tokens per step, warps per program) to time (CUDA)")
    p.add_argument("--tiles", nargs="+", default=["4x2", "4x4", "2x2", "1x1", "8x4", "2x1"],
                   help="block-Hessian kernel tiles BBxWARPS (block columns, warps per program) to time (CUDA)")
    p.add_argument("--grouping-tiles", nargs="+", default=["8192x8", "4096x4", "16384x16", "32768x16", "2048x4"],
                   help="routing-grouping kernel tiles CHOICESxWARPS to time (CUDA)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--host", action="store_true",
                   help="instead: the host time per call of each observer step (16 tokens)")
    p.add_argument("--out", help="also write the tables to this markdown file")
    args = p.parse_args()
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"observers, {name}, {datetime.date.today()}, torch {torch.__version__}", "",
             "| input | what | us (median) |", "|---|---|---:|"]
    found = host_rows(args, device) if args.host else dense_rows(args, device) + expert_rows(args, device)
    if args.host:
        lines[2] = "| input | what | host us per call |"
    for shape, label, value in found:
        lines.append(f"| {shape} | {label} | {value:.4g} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
