"""Triton device functions of the NVFP4 kernels: the spec's arithmetic, step for step.

Every function mirrors :mod:`.reference` / :mod:`.candidates` / :mod:`.windows` in the same
fp32 operations, so that the MSE sweep, fake-quant and cast/pack are bit-exact (the kernels
that rely on it launch with ``enable_fp_fusion=False``: no multiply-add is contracted to an FMA).
Tensors are ``[B, 16]`` (one NVFP4 block per row) with per-block values ``[B]``.

Rounding to bf16 and to E4M3 is done with explicit integer arithmetic on fp32 bits, never by a
cast that rounds: the result then does not depend on the backend's conversion (the Triton
interpreter truncates where the GPU rounds to nearest even).

Every ``@triton.jit`` function of :mod:`nvfp4_dist.kernels` takes its arguments as tensor pointers
(``*_ptr``), then sizes, strides and other runtime values, then ``tl.constexpr`` flags, defaulted
ones last. Runs of per-block operands (thresholds ``t0..t6``, code values ``q1..q7``, the Hessian
split ``h1, h2, h3``) stay separate arguments and return values rather than tuples: a tuple
argument (or a nested tuple return) needs Triton >= 3.3, and Triton 3.2, the oldest that
``pyproject.toml`` accepts, rejects it ("cannot convert (...) of type <class 'tuple'> to tensor").
"""

import triton
import triton.language as tl

LAST_CANDIDATE = tl.constexpr(125)
E4M3_MIN = tl.constexpr(0.001953125)  # 2^-9, smallest E4M3 subnormal: the block-scale floor
E4M3_MAX = tl.constexpr(448.0)
E4M3_MIN_NORMAL = tl.constexpr(0.015625)  # 2^-6
MIN_GLOBAL_AMAX = tl.constexpr(5.421010862427522e-20)  # 2^-64, as numerics.constants
GLOBAL_SCALE_DENOM = tl.constexpr(2688.0)  # 6 * 448


@triton.jit
def tree16(x):
    """Pairwise sum of ``x [B, 16]`` over axis 1: ``x[0::2] + x[1::2]`` four times -> ``[B]``."""
    x = tl.reshape(x, [x.shape[0], 8, 2])
    lo, hi = tl.split(x)
    x = tl.reshape(lo + hi, [x.shape[0], 4, 2])
    lo, hi = tl.split(x)
    x = tl.reshape(lo + hi, [x.shape[0], 2, 2])
    lo, hi = tl.split(x)
    x = tl.reshape(lo + hi, [x.shape[0], 1, 2])
    lo, hi = tl.split(x)
    return tl.reshape(lo + hi, [x.shape[0]])


@triton.jit
def load_blocks(w_ptr, stride_row, nb, n_blocks, BLK: tl.constexpr):
    """Blocks ``n`` of program ``pid`` (int32 ``[BLK]``, < 2^31), their mask and ``w [BLK, 16]``
    (fp32) of a ``[rows, 16 * nb]`` weight with unit stride along cin and row stride
    ``stride_row``. Block indices stay int32 (cheap division); element offsets are int64."""
    n = tl.program_id(0) * BLK + tl.arange(0, BLK)
    mask = n < n_blocks
    row = n // nb
    col = n - row * nb
    c = tl.arange(0, 16)
    base = row.to(tl.int64) * stride_row + col * 16
    w = tl.load(w_ptr + base[:, None] + c[None, :], mask=mask[:, None], other=0.0)
    return n, mask, w.to(tl.float32)


@triton.jit
def load_blocks_by_thread(w_ptr, stride_row, nb, n_blocks, BLK: tl.constexpr):
    """As :func:`load_blocks`, with each block's 16 elements held by one thread.

    Built from 16 column loads by nested joins (a join's operand index is the new, fastest
    axis, so pairing columns p and p + 8 first yields column order 0..15): the tile then has
    no cross-thread axis and per-block values broadcast without layout conversions.
    """
    n = tl.program_id(0).to(tl.int64) * BLK + tl.arange(0, BLK)
    mask = n < n_blocks
    row = n // nb
    p = w_ptr + row * stride_row + (n - row * nb) * 16
    x0 = tl.join(tl.load(p + 0, mask=mask, other=0.0), tl.load(p + 8, mask=mask, other=0.0))
    x1 = tl.join(tl.load(p + 1, mask=mask, other=0.0), tl.load(p + 9, mask=mask, other=0.0))
    x2 = tl.join(tl.load(p + 2, mask=mask, other=0.0), tl.load(p + 10, mask=mask, other=0.0))
    x3 = tl.join(tl.load(p + 3, mask=mask, other=0.0), tl.load(p + 11, mask=mask, other=0.0))
    x4 = tl.join(tl.load(p + 4, mask=mask, other=0.0), tl.load(p + 12, mask=mask, other=0.0))
    x5 = tl.join(tl.load(p + 5, mask=mask, other=0.0), tl.load(p + 13, mask=mask, other=0.0))
    x6 = tl.join(tl.load(p + 6, mask=mask, other=0.0), tl.load(p + 14, mask=mask, other=0.0))
    x7 = tl.join(tl.load(p + 7, mask=mask, other=0.0), tl.load(p + 15, mask=mask, other=0.0))
    y0 = tl.join(x0, x4)
    y1 = tl.join(x1, x5)
    y2 = tl.join(x2, x6)
    y3 = tl.join(x3, x7)
    w = tl.join(tl.join(y0, y2), tl.join(y1, y3))
    return n, mask, tl.reshape(w, [BLK, 16]).to(tl.float32)


@triton.jit
def global_scale(g_ptr):
    """S = fl(max(g, 2^-64) / 2688) from the fp32 global amax at ``g_ptr``."""
    g = tl.maximum(tl.load(g_ptr).to(tl.float32), MIN_GLOBAL_AMAX)
    return tl.math.div_rn(g, GLOBAL_SCALE_DENOM)


@triton.jit
def e4m3_round(r):
    """Round fp32 ``r`` in [2^-9, 448] to the nearest E4M3 value, ties to even (fp32 result)."""
    bits = r.to(tl.int32, bitcast=True)
    # normal range: keep 3 mantissa bits, RNE on the 20 dropped ones (a carry bumps the exponent)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # subnormal range: multiples of 2^-9; adding 2^23 rounds r * 512 (exact) to an integer, RNE
    sub = ((r * 512.0 + 8388608.0) - 8388608.0) * 0.001953125
    return tl.where(r < E4M3_MIN_NORMAL, sub, normal)


@triton.jit
def e4m3_bits(v):
    """The E4M3 byte (int32, 1..126) of an exact positive E4M3 value ``v`` (fp32)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)  # exponent bias 127 -> 7
    return tl.where(v < E4M3_MIN_NORMAL, (v * 512.0).to(tl.int32), normal)


@triton.jit
def scale_value(block_amax, S):
    """fp32 value of the stored scale ``e4m3(clamp(block_amax / 6 / S, 2^-9, 448))`` (nan -> 2^-9)."""
    ratio = tl.math.div_rn(tl.math.div_rn(block_amax, 6.0), S)
    ratio = tl.where(ratio != ratio, E4M3_MIN, ratio)
    return e4m3_round(tl.minimum(tl.maximum(ratio, E4M3_MIN), E4M3_MAX))


@triton.jit
def e4m3_value(bits):
    """fp32 value of E4M3 bytes ``bits`` (int32, 0..126): normal values built as fp32 bit
    patterns (exponent bias 7 -> 127), subnormals ``m * 2^-9``; exact."""
    e = (bits >> 3) & 15
    m = bits & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@triton.jit
def static_block_scales(bamax_ptr, beta_ptr, g_ptr, block, row, rows, g_rows, mask, HAS_BETA: tl.constexpr,
                        GROUP_G: tl.constexpr, MASKED: tl.constexpr, CODES: tl.constexpr = False):
    """``(v, d_q, S)`` of the blocks at offsets ``block`` (rows ``row``) from their static block
    amaxes: the stored scale's value, the quant scale (``fl(v S)``, or ``fl(beta fl(v S))`` with
    ``HAS_BETA``) and the global scale, one per block with ``GROUP_G`` (one global amax per
    ``g_rows`` rows), else one. ``MASKED``: loads under ``mask`` (amax 0, beta 1 outside it).
    ``CODES``: the block state as the quantizer keeps it (numerics/compact.py): ``bamax_ptr``
    holds the scales' E4M3 bytes, ``beta_ptr`` beta in hundredths (``fl(code / 100)``, an IEEE
    division), both uint8; the same v and d as from the amaxes they encode."""
    if GROUP_G:
        S = global_scale(g_ptr + tl.minimum(row, rows - 1) // g_rows)
    else:
        S = global_scale(g_ptr)
    if CODES:
        if MASKED:  # byte 1 (2^-9) outside the mask: what an amax of 0 gives
            v = e4m3_value(tl.load(bamax_ptr + block, mask=mask, other=1).to(tl.int32))
        else:
            v = e4m3_value(tl.load(bamax_ptr + block).to(tl.int32))
    else:
        if MASKED:
            v = scale_value(tl.load(bamax_ptr + block, mask=mask, other=0.0), S)
        else:
            v = scale_value(tl.load(bamax_ptr + block), S)
    d = v * S  # decode scale
    if HAS_BETA:
        if MASKED:
            beta = tl.load(beta_ptr + block, mask=mask, other=100 if CODES else 1.0)
        else:
            beta = tl.load(beta_ptr + block)
        if CODES:
            beta = tl.math.div_rn(beta.to(tl.float32), 100.0)
        d = beta * d  # quant scale fl(beta * d)
    return v, d, S


@triton.jit
def bf16_round(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still fp32 (finite x)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def thresholds(d):
    """``fl(t * d)`` for t = 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 (quant scale ``d``)."""
    return 0.25 * d, 0.75 * d, 1.25 * d, 1.75 * d, 2.5 * d, 3.5 * d, 5.0 * d


@triton.jit
def code_values(v, S):
    """Dequantized magnitudes ``fl(fl(e2m1 * v) * S)`` of codes 1..7."""
    return (0.5 * v) * S, v * S, (1.5 * v) * S, (2.0 * v) * S, (3.0 * v) * S, (4.0 * v) * S, (6.0 * v) * S


# q1..q7 stay separate arguments, not a tuple: Triton 3.2 takes no tuple arguments (module docstring)
@triton.jit
def e2m1_pick(a, d, q1, q2, q3, q4, q5, q6, q7):
    """The value ``q[code]`` of magnitudes ``a [B, 16]`` for quant scales ``d [B, 1]``.

    code = thresholds passed: strict at 0.25, 1.25, 2.5, 5 and inclusive at 0.75, 1.75, 3.5
    (ties to the even code). Thresholds increase, so the last one passed names the code.
    """
    t0, t1, t2, t3, t4, t5, t6 = thresholds(d)
    q = tl.where(a > t0, q1, 0.0)
    q = tl.where(a >= t1, q2, q)
    q = tl.where(a > t2, q3, q)
    q = tl.where(a >= t3, q4, q)
    q = tl.where(a > t4, q5, q)
    q = tl.where(a >= t5, q6, q)
    return tl.where(a > t6, q7, q)


@triton.jit
def e2m1_codes(a, d):
    """E2M1 magnitude codes (int32, 0..7) of ``a [B, 16]`` for quant scales ``d [B, 1]``."""
    t0, t1, t2, t3, t4, t5, t6 = thresholds(d)
    c = tl.where(a > t0, 1, 0)
    c = tl.where(a >= t1, 2, c)
    c = tl.where(a > t2, 3, c)
    c = tl.where(a >= t3, 4, c)
    c = tl.where(a > t4, 5, c)
    c = tl.where(a >= t5, 6, c)
    return tl.where(a > t6, 7, c)


@triton.jit
def mse_loss(v_ptr, a, k, S):
    """Block SSE ``tree16((|w| - q)^2)`` of per-block candidates ``k [B]`` (the spec's bits).

    Thresholds and values are written out here: the interpreter pays per nested call.
    """
    v = tl.load(v_ptr + k)
    d = (v * S)[:, None]
    v = v[:, None]
    q = tl.where(a > 0.25 * d, (0.5 * v) * S, 0.0)
    q = tl.where(a >= 0.75 * d, d, q)
    q = tl.where(a > 1.25 * d, (1.5 * v) * S, q)
    q = tl.where(a >= 1.75 * d, (2.0 * v) * S, q)
    q = tl.where(a > 2.5 * d, (3.0 * v) * S, q)
    q = tl.where(a >= 3.5 * d, (4.0 * v) * S, q)
    q = tl.where(a > 5.0 * d, (6.0 * v) * S, q)
    dw = a - q
    return tree16(dw * dw)


@triton.jit
def start_candidate(v_ptr, amax, S):
    """k0: smallest k with ``qmax_k = fl(fl(6 v_k) S) >= amax``, clamped to 125 (bisection)."""
    lo = tl.zeros(amax.shape, tl.int32)
    hi = lo + (LAST_CANDIDATE + 1)
    for _ in tl.static_range(7):
        mid = (lo + hi) >> 1
        ok = (6.0 * tl.load(v_ptr + tl.minimum(mid, LAST_CANDIDATE))) * S >= amax
        go = lo < hi
        hi = tl.where(go & ok, mid, hi)
        lo = tl.where(go & ok, lo, tl.where(go, mid + 1, lo))
    return tl.minimum(lo, LAST_CANDIDATE)


@triton.jit
def candidate_window(v_ptr, a, amax, k0, upper, kappa, S, USE_KAPPA: tl.constexpr):
    """``(k_lo, k_hi)`` of :func:`nvfp4_dist.kernels.windows.candidate_window`, in-kernel.

    ``kappa [1, 16]`` Schur floors (used when ``USE_KAPPA``, the Hessian loss); else the
    MSE bounds: the max element's saturation term and tree16 of the tail terms.
    """
    # lowest candidate whose saturation bound does not exceed the start candidate's loss
    lo = k0 * 0
    hi = k0
    for _ in tl.static_range(7):
        mid = (lo + hi) >> 1
        qmax = (6.0 * tl.load(v_ptr + mid)) * S
        if USE_KAPPA:
            over = a - qmax[:, None]
            bound = tl.max(kappa * tl.where(a > qmax[:, None], over * over, 0.0), axis=1)
        else:
            over = amax - qmax
            bound = tl.where(amax > qmax, over * over, 0.0)
        ok = bound <= upper
        go = lo < hi
        hi = tl.where(go & ok, mid, hi)
        lo = tl.where(go & ok, lo, tl.where(go, mid + 1, lo))
    k_lo = lo
    # first candidate that zeroes the whole block: fl(0.25 d_k) >= amax
    lo = k0 * 0
    hi = lo + (LAST_CANDIDATE + 1)
    for _ in tl.static_range(7):
        mid = (lo + hi) >> 1
        ok = 0.25 * (tl.load(v_ptr + tl.minimum(mid, LAST_CANDIDATE)) * S) >= amax
        go = lo < hi
        hi = tl.where(go & ok, mid, hi)
        lo = tl.where(go & ok, lo, tl.where(go, mid + 1, lo))
    zero = tl.minimum(lo, LAST_CANDIDATE)
    # first candidate above k0 whose tail bound reaches the start candidate's loss
    lo = k0 + 1
    hi = zero + 1
    for _ in tl.static_range(7):
        mid = (lo + hi) >> 1
        half = (0.5 * tl.load(v_ptr + tl.minimum(mid, LAST_CANDIDATE))) * S
        low = tl.minimum(a, half[:, None] - a)
        term = tl.where(a < half[:, None], low * low, 0.0)
        if USE_KAPPA:
            bound = tl.max(kappa * term, axis=1)
        else:
            bound = tree16(term)
        ok = bound >= upper
        go = lo < hi
        hi = tl.where(go & ok, mid, hi)
        lo = tl.where(go & ok, lo, tl.where(go, mid + 1, lo))
    return k_lo, lo - 1


@triton.jit
def take_better(k, loss, k_hi, k0, best, best_k):
    """One step of a window sweep: candidate ``k`` with ``loss`` replaces the best so far where it
    is in the window (``k <= k_hi``, not the start ``k0``, already counted) and lower, ties going
    to the smallest candidate whatever the visiting order. Returns ``(best, best_k)``."""
    better = (k <= k_hi) & (k != k0) & ((loss < best) | ((loss == best) & (k < best_k)))
    return tl.where(better, loss, best), tl.where(better, k, best_k)


@triton.jit
def mse_search(w, mask, v_ptr, S):
    """``(best_k, best)``: the MSE candidate and loss of each row's block ``w [N, 16]`` (rows where
    ``mask`` is False do not widen the sweep): the start candidate, its exact window, the window
    swept one candidate per step (every loss in tree16 order, so the tile's layout does not
    change a bit)."""
    a = tl.abs(w)
    amax = tl.max(a, axis=1)
    k0 = start_candidate(v_ptr, amax, S)
    best = mse_loss(v_ptr, a, k0, S)
    best_k = k0
    k_lo, k_hi = candidate_window(v_ptr, a, amax, k0, best, 0.0, S, False)
    width = tl.max(tl.where(mask, k_hi - k_lo + 1, 0))
    for i in range(width):
        k = k_lo + i
        best, best_k = take_better(k, mse_loss(v_ptr, a, tl.minimum(k, 125), S), k_hi, k0, best, best_k)
    return best_k, best


@triton.jit
def split3(x):
    """Exact split ``x = x1 + x2 + x3`` of fp32 ``x`` into values exact in bf16 (fp32 tensors).

    Each step keeps the top 8 significant bits by truncation; a 24-bit significand is used up
    after three steps, and every subtraction is exact.
    """
    x1 = (x.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    r = x - x1
    x2 = (r.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    return x1, x2, r - x2


@triton.jit
def dot_acc(x, y, acc, BF16_DOT: tl.constexpr):
    """``acc + x @ y`` for fp32 ``x``, ``y`` whose entries are exact in bf16: bf16 tensor-core
    products (exact) with fp32 accumulation; fp32 IEEE products where bf16 dots are unavailable
    (the interpreter). Never TF32."""
    if BF16_DOT:
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc)
    return tl.dot(x, y, acc, input_precision="ieee")


@triton.jit
def weight_times_hessian(w, h1, h2, h3, BF16_DOT: tl.constexpr):
    """``w @ H`` (``[B, 16]``) to fp32 accuracy from exact 3-way splits of w and H."""
    w1, w2, w3 = split3(w)
    acc = tl.zeros([w.shape[0], 16], dtype=tl.float32)
    acc = dot_acc(w3, h3, acc, BF16_DOT)
    acc = dot_acc(w3, h2, acc, BF16_DOT)
    acc = dot_acc(w2, h3, acc, BF16_DOT)
    acc = dot_acc(w3, h1, acc, BF16_DOT)
    acc = dot_acc(w2, h2, acc, BF16_DOT)
    acc = dot_acc(w1, h3, acc, BF16_DOT)
    acc = dot_acc(w2, h1, acc, BF16_DOT)
    acc = dot_acc(w1, h2, acc, BF16_DOT)
    return dot_acc(w1, h1, acc, BF16_DOT)


@triton.jit
def hessian_loss(w, a, hw, h1, h2, h3, v, d_q, S, BF16_DOT: tl.constexpr):
    """``dw^T H dw`` per row for dequant scale values ``v [B]`` and quant scales ``d_q [B]``.

    Codes are the spec's. ``H dw = H w - S * H (e2m1 v)``: ``e2m1 * v`` is exact in bf16 and H
    is split exactly, so the tensor cores see exact products; ``hw = w @ H`` is computed once.
    Written out in one function (the interpreter pays per call); the loss from ``e2m1 * v`` is
    :func:`loss_of_values`, shared with the bf16-pair sweep.
    """
    d = d_q[:, None]
    v = v[:, None]
    m = tl.where(a > 0.25 * d, 0.5 * v, 0.0)
    m = tl.where(a >= 0.75 * d, v, m)
    m = tl.where(a > 1.25 * d, 1.5 * v, m)
    m = tl.where(a >= 1.75 * d, 2.0 * v, m)
    m = tl.where(a > 2.5 * d, 3.0 * v, m)
    m = tl.where(a >= 3.5 * d, 4.0 * v, m)
    m = tl.where(a > 5.0 * d, 6.0 * v, m)
    m = tl.where(w < 0, -m, m)
    if BF16_DOT:
        mb = m.to(tl.bfloat16)  # exact: e2m1 * v has at most 7 significant bits
    else:
        mb = m
    return loss_of_values(w, hw, h1, h2, h3, m, mb, S, BF16_DOT)


@triton.jit
def loss_of_values(w, hw, h1, h2, h3, m, mb, S, BF16_DOT: tl.constexpr):
    """``tl.sum((w - m S) * (hw - S H m))`` per row for signed ``m = e2m1 * v`` (fp32, exact in bf16),
    ``mb`` its tensor-core operand (bf16 with ``BF16_DOT``, else ``m``)."""
    if BF16_DOT:
        hm = tl.dot(mb, h1.to(tl.bfloat16), tl.dot(mb, h2.to(tl.bfloat16), tl.dot(mb, h3.to(tl.bfloat16))))
    else:
        hm = tl.dot(mb, h1, tl.dot(mb, h2, tl.dot(mb, h3, input_precision="ieee"), input_precision="ieee"),
                    input_precision="ieee")
    return tl.sum((w - m * S) * (hw - S * hm), axis=1)
