"""Fake-quant of bf16 (and fp16) weights on pairs of elements: the forward's hot path in QAT.

Bit-exact with :func:`nvfp4_dist.numerics.nvfp4.fake_quant` (as the element-wise kernel in
:mod:`.cast_kernels`), with half its per-element instructions and no fp32 conversions (840 SASS
instructions per thread for 32 elements against 1080): 1.3x a copy on an H200 where the
element-wise kernel takes 1.7x.

Why pairs (see :mod:`.tl_bf16x2`): the spec's comparisons of a bf16 element with fp32 thresholds
are bf16 comparisons with the thresholds rounded down (strict) or up (inclusive), and rounding
each code's value to bf16 before the selection equals rounding the selected value. So two
elements share one 32-bit register through the whole chain. Per 16-element block the thresholds
and values are computed once, with the spec's fp32 operations, then rounded as above and doubled
into both halves of a register.

Layout. Each program takes ``ROWS x COLS`` elements as blocks of 8 int32 pairs; Triton
gives each thread half a block (two 16-byte accesses, coalesced across the warp) and computes the
per-block operands one block per thread, handing them over through shared memory. The launch
(tiles, grid) is :func:`.cast_kernels.launch_fake_quant`'s, shared with the element-wise kernel.

fp16 weights take the same kernel with ``set.*.f16x2`` compares, thresholds rounded down / up on
the fp16 grid and values rounded to nearest fp16 (what the reference's cast of the fp32 value
does); the argument above holds on any grid, subnormals and infinity included.

The PTX chain runs only on the GPU, its integer twin under the interpreter (:mod:`.tl_bf16x2`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_bf16x2 import both_halves, f16_both_halves, magnitude_and_sign, pair_chain
from .tl_nvfp4 import bf16_round, code_values, static_block_scales, thresholds


@triton.jit
def _threshold(t, UP: tl.constexpr, F16: tl.constexpr):
    """Per-block threshold ``t [B]`` rounded down (strict) or up (inclusive) on the weight's
    grid, in both halves, as ``[B, 1]``."""
    if F16:
        return f16_both_halves(t, UP)[:, None]
    return both_halves(t, UP)[:, None]


@triton.jit
def _value(q, F16: tl.constexpr):
    """Per-block dequantized value ``q [B]`` rounded to nearest on the weight's grid (the output's
    rounding), in both halves, as ``[B, 1]``."""
    if F16:
        return f16_both_halves(q, None)[:, None]
    return both_halves(bf16_round(q), False)[:, None]


@triton.jit
def fake_quant_pairs(w_ptr, bamax_ptr, beta_ptr, g_ptr, out_ptr, stride_row, rows, cin, g_rows,
                     HAS_BETA: tl.constexpr, GROUP_G: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                     EVEN: tl.constexpr, PTX: tl.constexpr, F16: tl.constexpr = False, CODES: tl.constexpr = False):
    """``ROWS x COLS`` elements as blocks; block indices from the program ids and constexpr
    shifts (no integer division per block). ``EVEN``: no access needs a mask. ``GROUP_G``: one
    global amax per ``g_rows`` rows (stacked experts), else one for the whole weight. ``F16``:
    fp16 weights (the same chain on the fp16 grid)."""
    PER_ROW: tl.constexpr = COLS // 16
    i = tl.arange(0, ROWS * PER_ROW)
    row = tl.program_id(0) * ROWS + i // PER_ROW
    col = tl.program_id(1) * PER_ROW + i % PER_ROW
    nb = cin // 16
    block = row.to(tl.int64) * nb + col
    pair = tl.arange(0, 8)[None, :]
    src = w_ptr.to(tl.pointer_type(tl.int32)) + (row.to(tl.int64) * (stride_row // 2) + col * 8)[:, None] + pair
    dst = out_ptr.to(tl.pointer_type(tl.int32)) + (row.to(tl.int64) * (cin // 2) + col * 8)[:, None] + pair
    mask = (row < rows) & (col < nb)
    if EVEN:
        w = tl.load(src)
    else:
        w = tl.load(src, mask=mask[:, None], other=0)
    v, d, S = static_block_scales(bamax_ptr, beta_ptr, g_ptr, block, row, rows, g_rows, mask, HAS_BETA, GROUP_G,
                                  not EVEN, CODES)
    t0, t1, t2, t3, t4, t5, t6 = thresholds(d)
    q1, q2, q3, q4, q5, q6, q7 = code_values(v, S)
    a, s = magnitude_and_sign(w, PTX, F16)
    q = pair_chain(a, s, _threshold(t0, False, F16), _threshold(t1, True, F16), _threshold(t2, False, F16),
                   _threshold(t3, True, F16), _threshold(t4, False, F16), _threshold(t5, True, F16),
                   _threshold(t6, False, F16), _value(q1, F16), _value(q2, F16), _value(q3, F16),
                   _value(q4, F16), _value(q5, F16), _value(q6, F16), _value(q7, F16), PTX, F16)
    if EVEN:
        tl.store(dst, q)
    else:
        tl.store(dst, q, mask=mask[:, None])
