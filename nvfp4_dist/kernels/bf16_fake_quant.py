"""Fake-quant of bf16 weights on pairs of elements: the forward's hot path in QAT.

Bit-exact with :func:`nvfp4_dist.numerics.nvfp4.fake_quant` (as the element-wise kernel in
:mod:`.cast_kernels`), with half its per-element instructions and no fp32 conversions (840 SASS
instructions per thread for 32 elements against 1080): 1.3x a copy on an H200 where the
element-wise kernel takes 1.7x.

Why pairs. A bf16 weight element is an exact bf16 value ``a``; the spec compares it with fp32
thresholds ``fl(t * d_q)`` and writes ``fl(fl(e2m1 * v) * S)`` rounded to bf16. For bf16 ``a`` and
fp32 ``t > 0``, ``a > t`` iff ``a > RD(t)`` and ``a >= t`` iff ``a >= RU(t)`` (RD/RU: rounded down/up
to bf16; there is no bf16 strictly between RD(t) and t, nor between t and RU(t)). Rounding each
code's value to bf16 before the selection equals rounding the selected value. So the whole
per-element work is bf16 against bf16, and two elements share one 32-bit register: one
``set.{gt,ge}.u32.bf16x2`` gives both lanes' masks, one ``lop3`` selects both lanes' values, seven
times (the spec's thresholds), plus the sign. Per 16-element block the thresholds and values
are computed once, with the spec's fp32 operations, then rounded as above and doubled into
both halves of a register.

Layout. Each program takes ``ROWS x COLS`` elements as blocks of 8 int32 pairs; Triton
gives each thread half a block (two 16-byte accesses, coalesced across the warp) and computes the
per-block operands one block per thread, handing them over through shared memory. The launch
(tiles, grid) is :func:`.cast_kernels.launch_fake_quant`'s, shared with the element-wise kernel.

The PTX chain runs only on the GPU; under the Triton interpreter the same selection is done
with integer comparisons of the 15-bit magnitudes (non-negative bf16 order like their bit
patterns; NaN, above 0x7F80, fails every comparison as the hardware's does), so the CPU tests
check everything but the asm block itself, which the GPU tests check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_nvfp4 import bf16_round, code_values, global_scale, scale_value, thresholds

# mask = a > t (strict thresholds) or a >= t (inclusive), per bf16 lane as 0xFFFF / 0; then
# q = (mask & q_i) | (~mask & q) (lop3 table 0xCA); finally the sign of w where w < 0 (a > 0 and
# not NaN: -0.0 gives +0.0, as in the reference). $1: w pair; $2..$8: thresholds t0..t6 (bf16 in
# both halves); $9..$15: code values q1..q7 (likewise).
_PAIR_CHAIN = tl.constexpr("""{
.reg .b32 a, m, z;
mov.b32 z, 0;
and.b32 a, $1, 0x7FFF7FFF;
set.gt.u32.bf16x2 m, a, $2;
and.b32 $0, m, $9;
set.ge.u32.bf16x2 m, a, $3;
lop3.b32 $0, m, $10, $0, 0xCA;
set.gt.u32.bf16x2 m, a, $4;
lop3.b32 $0, m, $11, $0, 0xCA;
set.ge.u32.bf16x2 m, a, $5;
lop3.b32 $0, m, $12, $0, 0xCA;
set.gt.u32.bf16x2 m, a, $6;
lop3.b32 $0, m, $13, $0, 0xCA;
set.ge.u32.bf16x2 m, a, $7;
lop3.b32 $0, m, $14, $0, 0xCA;
set.gt.u32.bf16x2 m, a, $8;
lop3.b32 $0, m, $15, $0, 0xCA;
set.gt.u32.bf16x2 m, a, z;
and.b32 a, $1, 0x80008000;
and.b32 a, a, m;
or.b32 $0, $0, a;
}""")

BF16_NAN_BITS = tl.constexpr(0x7F80)  # magnitudes above this are NaN


@triton.jit
def _both_halves(x, UP: tl.constexpr):
    """int32 holding fp32 ``x >= 0`` rounded to bf16 (down, or up if ``UP``) in both halves.

    Rounding down keeps the top 16 bits; rounding up adds 0xFFFF first, so any dropped bit
    carries into them (into the exponent when the mantissa is full: the next bf16 value).
    """
    bits = x.to(tl.uint32, bitcast=True)
    if UP:
        bits = bits + 65535
    top = bits & 0xFFFF0000
    return (top | (top >> 16)).to(tl.int32, bitcast=True)


@triton.jit
def _select_half(a, sign, t0, t1, t2, t3, t4, t5, t6, q1, q2, q3, q4, q5, q6, q7):
    """One 16-bit lane of the chain in integers (the interpreter's twin of the PTX)."""
    ok = a <= BF16_NAN_BITS
    q = tl.where(ok & (a > t0), q1, 0)
    q = tl.where(ok & (a >= t1), q2, q)
    q = tl.where(ok & (a > t2), q3, q)
    q = tl.where(ok & (a >= t3), q4, q)
    q = tl.where(ok & (a > t4), q5, q)
    q = tl.where(ok & (a >= t5), q6, q)
    q = tl.where(ok & (a > t6), q7, q)
    return q | tl.where(ok & (a > 0), sign, 0)


@triton.jit
def _pair_chain(w, t0, t1, t2, t3, t4, t5, t6, q1, q2, q3, q4, q5, q6, q7, PTX: tl.constexpr):
    """Fake-quant values of the bf16 pairs ``w`` (int32) from per-block operands (int32)."""
    if PTX:
        out = tl.inline_asm_elementwise(
            _PAIR_CHAIN, "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [w, t0, t1, t2, t3, t4, t5, t6, q1, q2, q3, q4, q5, q6, q7], dtype=tl.int32, is_pure=True, pack=1)
    else:
        m = 65535
        lo = _select_half(w & 32767, w & 32768, t0 & m, t1 & m, t2 & m, t3 & m, t4 & m, t5 & m, t6 & m,
                          q1 & m, q2 & m, q3 & m, q4 & m, q5 & m, q6 & m, q7 & m)
        hi = _select_half((w >> 16) & 32767, (w >> 16) & 32768, t0 & m, t1 & m, t2 & m, t3 & m, t4 & m, t5 & m,
                          t6 & m, q1 & m, q2 & m, q3 & m, q4 & m, q5 & m, q6 & m, q7 & m)
        out = lo | (hi << 16)
    return out


@triton.jit
def fake_quant_pairs(w_ptr, stride_row, rows, cin, bamax_ptr, beta_ptr, g_ptr, g_rows, out_ptr,
                     HAS_BETA: tl.constexpr, GROUP_G: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                     EVEN: tl.constexpr, PTX: tl.constexpr):
    """``ROWS x COLS`` elements as blocks; block indices from the program ids and constexpr
    shifts (no integer division per block). ``EVEN``: no access needs a mask. ``GROUP_G``: one
    global amax per ``g_rows`` rows (stacked experts), else one for the whole weight."""
    PER_ROW: tl.constexpr = COLS // 16
    i = tl.arange(0, ROWS * PER_ROW)
    row = tl.program_id(0) * ROWS + i // PER_ROW
    col = tl.program_id(1) * PER_ROW + i % PER_ROW
    nb = cin // 16
    block = row.to(tl.int64) * nb + col
    pair = tl.arange(0, 8)[None, :]
    src = w_ptr.to(tl.pointer_type(tl.int32)) + (row.to(tl.int64) * (stride_row // 2) + col * 8)[:, None] + pair
    dst = out_ptr.to(tl.pointer_type(tl.int32)) + (row.to(tl.int64) * (cin // 2) + col * 8)[:, None] + pair
    if EVEN:
        w = tl.load(src)
        bamax = tl.load(bamax_ptr + block)
    else:
        mask = (row < rows) & (col < nb)
        w = tl.load(src, mask=mask[:, None], other=0)
        bamax = tl.load(bamax_ptr + block, mask=mask, other=0.0)
    if GROUP_G:
        S = global_scale(g_ptr + tl.minimum(row, rows - 1) // g_rows)
    else:
        S = global_scale(g_ptr)
    v = scale_value(bamax, S)
    d = v * S  # decode scale
    if HAS_BETA:
        if EVEN:
            d = tl.load(beta_ptr + block) * d  # quant scale fl(beta * d)
        else:
            d = tl.load(beta_ptr + block, mask=mask, other=1.0) * d
    t0, t1, t2, t3, t4, t5, t6 = thresholds(d)
    q1, q2, q3, q4, q5, q6, q7 = code_values(v, S)
    q = _pair_chain(w, _both_halves(t0, False)[:, None], _both_halves(t1, True)[:, None],
                    _both_halves(t2, False)[:, None], _both_halves(t3, True)[:, None],
                    _both_halves(t4, False)[:, None], _both_halves(t5, True)[:, None],
                    _both_halves(t6, False)[:, None],
                    _both_halves(bf16_round(q1), False)[:, None], _both_halves(bf16_round(q2), False)[:, None],
                    _both_halves(bf16_round(q3), False)[:, None], _both_halves(bf16_round(q4), False)[:, None],
                    _both_halves(bf16_round(q5), False)[:, None], _both_halves(bf16_round(q6), False)[:, None],
                    _both_halves(bf16_round(q7), False)[:, None], PTX)
    if EVEN:
        tl.store(dst, q)
    else:
        tl.store(dst, q, mask=mask[:, None])


def supports(w: torch.Tensor) -> bool:
    """True for bf16 ``w [rows, cin]`` whose pairs are 4-byte aligned (even row stride and offset)."""
    return w.dtype == torch.bfloat16 and w.stride(-1) == 1 and w.stride(0) % 2 == 0 and w.data_ptr() % 4 == 0
