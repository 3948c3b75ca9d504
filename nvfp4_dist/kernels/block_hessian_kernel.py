"""Triton accumulation of per-expert block Hessians: the statistics of all experts of a layer in
one launch (the spec is :func:`.reference.expert_block_hessians`).

Input: the rows of one MoE projection's inputs grouped by expert (expert e owns positions
``offsets[e]:offsets[e + 1]``), either stored in that order (``x [N, cin]``) or named by an index
into the token rows (``rows [N]`` into ``x [T, cin]``: the gather ``x[rows]`` is never written),
and the running float64 sums ``H [E, cin/16, 16, 16]``, updated in place:
``H[e, b] += sum_t x_tb x_tb^T`` over the expert's rows.

Order and exactness. Each element is rounded to fp32 first (the observers' rule), then each
product ``x_ti * x_tj`` of two fp32 values is exact in float64 (48 significant bits <= 53); a
program adds the products of its expert's rows one token after the other, in row order, onto the
running sum. So every entry is a left-to-right float64 sum of exact terms in a defined order:
the kernel and the torch reference give the same bits (whether a compiler contracts the multiply
and add into an FMA does not matter: the product is exact), and the sum continues across calls
exactly as if all of an expert's tokens had come in one call. No tensor cores, no tree reduction.

Layout. A program takes one expert and ``BB`` block columns: an accumulator ``[BB, 16, 16]``
(float64). Per step it loads 8 tokens' values as one ``[BB, 16, 8]`` tile (token last), converts
each to float64 once and takes the tokens out of the tile one by one with ``tl.split`` (a
reshape to ``[BB, 16, 2, 2, 2]``, token ``4p + 2q + r``; a split moves values between registers,
no arithmetic), adding each token's outer product in row order. On Hopper the float64 FMAs are
not the limit: a conversion to float64 issues at a quarter of their rate, and each thread still
converts the values its accumulator entries read (Triton moves the conversion past the exchange
of values between threads): in the sm_90 SASS of the GPU tile (4 block columns, 2 warps, bf16)
80 ``F2F.F64`` per 128 ``DFMA``, against 72 per 64 in the former form. Measured on an H200
(128 experts, 32768 bf16 rows, with the amax, 2026-12-03, four runs): 265-298 us at 2048
channels and 117-139 us at 768, against 374-402 and 160-177 us for the former form, which
loaded each token's ``[BB, 16]`` values separately (the row order, hence the bits, are the same).
Also measured there and not taken: float64 ``tl.dot`` (the GPU's fp64 MMA gave the same bits on
data with a 2^-30..2^30 spread, 137-160 us at 2048 channels from fp32 rows, but 275-330 us
from bf16 rows, whose 16-bit operands Triton 3.6 cannot feed an fp64 MMA without an
inline-assembly detour; and its order of additions is the hardware's, not a documented one).

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
CUDA_WARPS = 2
INTERPRETER_BB = 16  # the interpreter pays per program: few, large tiles


@triton.jit
def _add_outer(acc, v):
    """acc [BB, 16, 16] += v v^T per block column (v [BB, 16] float64: exact products)."""
    return acc + v[:, :, None] * v[:, None, :]


@triton.jit
def _block_hessians(x_ptr, rows_ptr, off_ptr, h_ptr, amax_ptr, stride_row, nb, BB: tl.constexpr,
                    WITH_AMAX: tl.constexpr, GATHER: tl.constexpr):
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
    # running max |x| of this tile (masked: +0.0), per position of the step's tile: reduced once
    # after the loop (a reduction over the token axis inside the loop cost the H200 ~25%)
    top = tl.zeros([BB, 16, 8], dtype=tl.float32)
    for t0 in range(start, end, 8):  # 8 tokens per step: the splits below take exactly 8 apart
        pos = t0 + tl.arange(0, 8)
        live = pos < end
        row = tl.load(rows_ptr + pos, mask=live, other=0) if GATHER else pos
        ok = bmask[:, None, None] & (cols >= 0)[:, :, None] & live[None, None, :]
        w = tl.load(x_ptr + row.to(tl.int64)[None, None, :] * stride_row + cols[:, :, None], mask=ok, other=0.0)
        w = w.to(tl.float32)  # [BB, 16, 8]: 8 tokens, token last
        if WITH_AMAX:
            a = tl.abs(w)
            top = tl.maximum(top, tl.where(a != a, float("inf"), a))  # NaN counts as +inf
        w = w.to(tl.float64)
        # token 4p + 2q + r of the step at [..., p, q, r]: split off r, then q, then p
        r0, r1 = tl.split(tl.reshape(w, [BB, 16, 2, 2, 2]))
        q00, q01 = tl.split(r0)  # tokens 4p, 4p + 2
        q10, q11 = tl.split(r1)  # tokens 4p + 1, 4p + 3
        v0, v4 = tl.split(q00)
        v2, v6 = tl.split(q01)
        v1, v5 = tl.split(q10)
        v3, v7 = tl.split(q11)
        # in row order (a masked token adds +0.0)
        acc = _add_outer(_add_outer(_add_outer(_add_outer(acc, v0), v1), v2), v3)
        acc = _add_outer(_add_outer(_add_outer(_add_outer(acc, v4), v5), v6), v7)
    tl.store(h_ptr + h_off, acc, mask=hmask)
    if WITH_AMAX:
        tl.atomic_max(amax_ptr + e, tl.max(tl.max(tl.max(top, axis=2), axis=1), axis=0))  # order-independent


def launch_block_hessians(x: torch.Tensor, offsets: torch.Tensor, hessian_sum: torch.Tensor,
                          amax: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                          bb: int | None = None, num_warps: int | None = None) -> None:
    """``hessian_sum [E, cin/16, 16, 16]`` (float64, contiguous) += each expert's block Hessians,
    and, when given, ``amax [E]`` (fp32, contiguous, values >= 0) = max(amax, each expert's max |x|).

    ``x`` (fp32/bf16/fp16, unit stride along cin): the experts' rows in expert order ``[N, cin]``,
    or, with ``rows`` (int64 ``[N]``, contiguous), the token rows ``[T, cin]`` that position p
    reads as ``x[rows[p]]``; ``offsets`` int64 ``[E + 1]`` on x's device (``offsets[0] = 0``,
    ascending) delimit the experts' positions. ``bb``, ``num_warps``: the tile (block columns
    per program, warps per program); any choice gives the same bits.
    """
    n_experts, nb = hessian_sum.shape[:2]
    if n_experts == 0 or nb == 0 or x.shape[0] == 0:
        return
    if bb is None:
        bb = CUDA_BB if x.is_cuda else min(INTERPRETER_BB, triton.next_power_of_2(nb))
    num_warps = num_warps or CUDA_WARPS
    _block_hessians[(triton.cdiv(nb, bb), n_experts)](
        x_ptr=x, rows_ptr=offsets if rows is None else rows, off_ptr=offsets, h_ptr=hessian_sum,
        amax_ptr=hessian_sum if amax is None else amax, stride_row=x.stride(0), nb=nb, BB=bb,
        WITH_AMAX=amax is not None, GATHER=rows is not None, num_warps=num_warps)
