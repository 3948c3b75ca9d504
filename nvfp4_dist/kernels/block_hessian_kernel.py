"""Triton accumulation of per-expert block Hessians: the statistics of all experts of a layer in
one launch (the spec is :func:`.reference.expert_block_hessians`).

Input: the rows ``x [N, cin]`` of one MoE projection's inputs grouped by expert (expert e owns
rows ``offsets[e]:offsets[e + 1]``) and the running float64 sums ``H [E, cin/16, 16, 16]``,
updated in place: ``H[e, b] += sum_t x_tb x_tb^T`` over the expert's rows.

Order and exactness. Each element is rounded to fp32 first (the observers' rule), then each
product ``x_ti * x_tj`` of two fp32 values is exact in float64 (48 significant bits <= 53); a
program adds the products of its expert's rows one token after the other, in row order, onto the
running sum. So every entry is a left-to-right float64 sum of exact terms in a defined order:
the kernel and the torch reference give the same bits (whether a compiler contracts the multiply
and add into an FMA does not matter: the product is exact), and the sum continues across calls
exactly as if all of an expert's tokens had come in one call. No tensor cores, no tree reduction of products.

Layout. A program takes one expert and ``BB`` block columns: an accumulator ``[BB, 16, 16]``
(float64, ``BB * 256 / (32 * num_warps)`` registers' worth per thread). Per token it loads the
token's ``[BB, 16]`` values once and adds their outer product: 2.4x faster on an H200 than
loading the two inputs of every entry separately (128 experts, 32768 rows: 301 vs 734 us at 2048
channels, 121 vs 313 us at 768). Tokens go ``T`` per loop step, unrolled, so that their loads
are issued ahead of the additions.

Staged loads (``staged=True``, ``T`` a power of two; a variant timed against the default, kept
for ``benchmarks/bench_observers.py``: on an H200 it was 2.3-2.6x SLOWER at every tile tried,
2026-12-03, so the default stays the per-token loads).
Per token, each thread loads and converts to float64 every value its entries read, and a
conversion to float64 issues at a quarter of the FP64 FMA rate on Hopper: the default tile's
SASS (sm_90, bf16 inputs) has 96 ``F2F.F64.BF16`` and 96 scalar loads per 64 ``DFMA`` (8
tokens), 255 registers and spills, i.e. ~6x the FMA-bound time. The staged step loads and
converts a step's ``[T, BB, 16]`` values once (each value by one thread: 16 conversions per 256
``DFMA`` at 2 x 16 x 1 warp), hands them to the threads through shared memory (one broadcast
``LDS.128`` per two ``DFMA``), and takes token u out of the tile as a sum over T of that
token's values and -0.0s: ``x + (-0.0) == x`` for every x (signed zeros and NaN included), so
the products and their order, hence the bits, are those of the default.

Input amax. The kernel loads every value of every routed row, so it also gives each expert's
``max |x|`` (of the fp32-rounded values; a NaN counts as +inf, as the observers' amax does):
each program reduces its tile's maximum and merges it into ``amax[e]`` (fp32 ``[E]``, values
>= 0) with one atomic max. A maximum does not depend on the order, so the bits are those of
the reference whatever the programs' schedule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CUDA_BB = 4  # block columns per program on the GPU
CUDA_T = 8  # tokens per unrolled step
NUM_WARPS = 4
CUDA_STAGED = False  # staged loads (see the module docstring)
INTERPRETER_BB = 16  # the interpreter pays per program: few, large tiles


@triton.jit
def _block_hessians(x_ptr, off_ptr, h_ptr, amax_ptr, stride_row, nb, BB: tl.constexpr, T: tl.constexpr,
                    WITH_AMAX: tl.constexpr, STAGED: tl.constexpr):
    e = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0) * BB + tl.arange(0, BB)
    i = tl.arange(0, 16)
    bmask = blk < nb
    cols = (blk * 16)[:, None] + i[None, :]  # [BB, 16]: a token's values in these block columns
    # entry (b, i, j): column b*16+i times column b*16+j
    h_off = ((e * nb + blk) * 256)[:, None, None] + (i * 16)[None, :, None] + i[None, None, :]
    hmask = bmask[:, None, None] & (h_off >= 0)
    acc = tl.load(h_ptr + h_off, mask=hmask, other=0.0)
    start = tl.load(off_ptr + e)
    end = tl.load(off_ptr + e + 1)
    top = tl.zeros([BB, 16], dtype=tl.float32)  # running max |x| of this tile (masked: +0.0)
    for t0 in range(start, end, T):
        if STAGED:
            # T tokens' [BB, 16] values loaded and converted once as one [T, BB, 16] tile, each
            # token then picked out by a sum over T of itself and -0.0s (x + -0.0 == x exactly,
            # signed zeros and NaN included), so the conversions are not repeated per thread
            tt = t0 + tl.arange(0, T)
            ok3 = bmask[None, :, None] & (tt < end)[:, None, None] & (cols >= 0)[None, :, :]
            w = tl.load(x_ptr + tt.to(tl.int64)[:, None, None] * stride_row + cols[None, :, :], mask=ok3, other=0.0)
            w = w.to(tl.float32)
            if WITH_AMAX:
                a = tl.abs(w)
                top = tl.maximum(top, tl.max(tl.where(a != a, float("inf"), a), axis=0))
            w = w.to(tl.float64)
            for u in tl.static_range(T):
                v = tl.sum(tl.where((tl.arange(0, T) == u)[:, None, None], w, -0.0), axis=0)
                acc += v[:, :, None] * v[:, None, :]  # exact product; a masked token adds +0.0
        else:
            for u in tl.static_range(T):
                t = t0 + u
                ok = bmask[:, None] & ((cols * 0 + t) < end)
                # the token's [BB, 16] values loaded once, then broadcast into the outer product
                # (loaded straight into the layouts the broadcasts need: a thread reads the one
                # value of its row i and a vector of its columns j, not one pair per entry)
                v = tl.load(x_ptr + t.to(tl.int64) * stride_row + cols, mask=ok, other=0.0)
                v = v.to(tl.float32)
                if WITH_AMAX:
                    a = tl.abs(v)
                    top = tl.maximum(top, tl.where(a != a, float("inf"), a))  # NaN counts as +inf
                v = v.to(tl.float64)
                acc += v[:, :, None] * v[:, None, :]  # exact product; a masked token adds +0.0
    tl.store(h_ptr + h_off, acc, mask=hmask)
    if WITH_AMAX:
        tl.atomic_max(amax_ptr + e, tl.max(tl.max(top, axis=1), axis=0))  # order-independent


def launch_block_hessians(x: torch.Tensor, offsets: torch.Tensor, hessian_sum: torch.Tensor,
                          amax: torch.Tensor | None = None, bb: int | None = None, t: int = CUDA_T,
                          num_warps: int = NUM_WARPS, staged: bool = CUDA_STAGED) -> None:
    """``hessian_sum [E, cin/16, 16, 16]`` (float64, contiguous) += each expert's block Hessians,
    and, when given, ``amax [E]`` (fp32, contiguous, values >= 0) = max(amax, each expert's max |x|).

    ``x [N, cin]`` (fp32/bf16/fp16, unit stride along cin) holds the experts' rows in expert
    order; ``offsets`` int64 ``[E + 1]`` on x's device (``offsets[0] = 0``, ascending).
    ``bb``, ``t``, ``num_warps``: the tile (block columns per program), the tokens per unrolled
    step and the warps per program; ``staged``: load and convert a step's tokens as one tile
    (see the kernel). Any choice gives the same bits.
    """
    n_experts, nb = hessian_sum.shape[:2]
    if n_experts == 0 or nb == 0 or x.shape[0] == 0:
        return
    if bb is None:
        bb = CUDA_BB if x.is_cuda else min(INTERPRETER_BB, triton.next_power_of_2(nb))
    _block_hessians[(triton.cdiv(nb, bb), n_experts)](
        x_ptr=x, off_ptr=offsets, h_ptr=hessian_sum, amax_ptr=hessian_sum if amax is None else amax,
        stride_row=x.stride(0), nb=nb, BB=bb, T=t, WITH_AMAX=amax is not None, STAGED=staged,
        num_warps=num_warps)
