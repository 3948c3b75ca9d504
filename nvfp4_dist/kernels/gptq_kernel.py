"""Triton kernels of GPTQ's inner loop: bit-exact versions of :func:`.gptq_ops.sweep_block` and
:func:`.gptq_ops.propagate`.

Both are elementwise over rows: a program owns a tile of whole rows (and, for ``propagate``, a
range of columns) and never combines values of different rows, so a rank holding some rows of
a weight gets the bits one process holding all rows gets. Every product is rounded, then every
subtraction, as the torch reference does: the kernels launch with ``enable_fp_fusion=False``, so
``x - e * u`` is never contracted to a fused multiply-add (whose single rounding would differ),
and divisions are ``div_rn`` (correctly rounded, as torch's tensor division).

* ``_sweep_block``: one ``[ROWS, 16]`` tile of the block in registers, the 16 columns in order.
  Column k is read out of the tile by an integer sum over its fp32 bits (one nonzero term, so
  exact, the sign of zero included), rounded to the weight's dtype with explicit bit arithmetic
  (the interpreter's casts truncate where the GPU rounds), quantized with the spec's threshold
  chain of :mod:`.tl_nvfp4`, and its scaled error updates the later columns of the tile.
* ``_block_step``: one whole GPTQ block step in one launch (:func:`.gptq_ops.gptq_block_step`):
  per tile of rows, the block scale search on the dtype-rounded block (the MSE sweep of
  :mod:`.mse_kernel` or the local-Hessian sweep of :mod:`.hessian_kernel`, written with the same
  device functions so the winner is theirs bit for bit), the block amax ``fl(c_k g)``, the sweep
  of ``_sweep_block`` and the lazy update of the rest of the block's span, each error column
  applied as soon as it is known (per element the order of :func:`.gptq_ops.propagate`).
* ``_propagate``: ``rest -= err[:, k] * u[k]`` for k = 0..K-1 on a ``[ROWS, COLS]`` tile held in
  registers: the tile is read and written once for all K updates. ``K`` may be any width (16
  for one block; a multiple of 16 applies several blocks' errors in one pass, the reference's
  per-element order unchanged). Each step loads the tile rows' errors k (read in place: a tile's
  ``[ROWS, K]`` errors stay in L1 over the steps) and one contiguous row of U.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_nvfp4 import (
    MIN_GLOBAL_AMAX,
    bf16_round,
    candidate_window,
    code_values,
    e2m1_pick,
    global_scale,
    hessian_loss,
    mse_search,
    scale_value,
    split3,
    start_candidate,
    take_better,
    weight_times_hessian,
)

# dtype codes of the value each column is rounded to before it is quantized
DTYPE_FP32 = 0
DTYPE_BF16 = 1
DTYPE_FP16 = 2
_DTYPE_CODES = {torch.float32: DTYPE_FP32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_FP16}

SIGN_BIT = tl.constexpr(-2147483648)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to the weight's dtype (nearest, ties to even), as fp32."""
    if DTYPE == 1:
        return bf16_round(x)
    if DTYPE == 2:
        return x.to(tl.float16).to(tl.float32)  # both backends round fp32 -> fp16 to nearest even
    return x


@triton.jit
def _sweep_column(tile, quant, err, k, d, q1, q2, q3, q4, q5, q6, q7, u_ptr, stride_u, DTYPE: tl.constexpr):
    """Column ``k`` of a ``[ROWS, 16]`` block tile: rounded to the weight's dtype (stored back in
    the tile), quantized with decode scale ``d`` and the code values ``q1..q7``, its scaled error
    ``e = (x - q) / U_kk``; the later columns of the tile take ``-e * U_kj`` (at k = 15 none is
    later, so that update changes nothing). Returns ``(tile, quant, err, e)`` with column k of
    ``quant`` / ``err`` set."""
    col = tl.arange(0, 16)
    here = col[None, :] == k
    # column k: an integer sum of its bits and 15 zeros (exact, -0.0 kept)
    x = tl.sum(tl.where(here, tile.to(tl.int32, bitcast=True), 0), axis=1).to(tl.float32, bitcast=True)
    x = _round_to(x, DTYPE)
    tile = tl.where(here, x[:, None], tile)
    q = e2m1_pick(tl.abs(x), d, q1, q2, q3, q4, q5, q6, q7)
    # the sign as a bit: a zero code of a negative x gives -0.0, as the reference's negation
    q = (q.to(tl.int32, bitcast=True) | tl.where(x < 0, SIGN_BIT, 0)).to(tl.float32, bitcast=True)
    e = tl.math.div_rn(x - q, tl.load(u_ptr + k * stride_u + k))
    quant = tl.where(here, q[:, None], quant)
    err = tl.where(here, e[:, None], err)
    u = tl.load(u_ptr + k * stride_u + col)  # row k of the block's U (columns > k used)
    tile = tl.where(col[None, :] > k, tile - e[:, None] * u[None, :], tile)
    return tile, quant, err, e


@triton.jit
def _sweep_block(block_ptr, u_ptr, scale_ptr, s_ptr, quant_ptr, err_ptr, rows, stride_block, stride_u, stride_scale,
                 DTYPE: tl.constexpr, FROM_AMAX: tl.constexpr, ROWS: tl.constexpr):
    """``FROM_AMAX``: ``scale_ptr`` holds block amaxes and ``s_ptr`` the global amax, whose
    stored scale values and global scale are computed here (the spec's ops, as fake-quant);
    else the FP8 scale values and the global scale themselves."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = r < rows
    col = tl.arange(0, 16)
    src = block_ptr + r.to(tl.int64)[:, None] * stride_block + col[None, :]
    tile = tl.load(src, mask=rmask[:, None], other=0.0)
    if FROM_AMAX:
        S = global_scale(s_ptr)
        v = scale_value(tl.load(scale_ptr + r.to(tl.int64) * stride_scale, mask=rmask, other=0.0), S)
    else:
        S = tl.load(s_ptr)
        v = tl.load(scale_ptr + r.to(tl.int64) * stride_scale, mask=rmask, other=1.0)  # FP8 scale values
    d = v * S  # decode (= quant) scale fl(v S)
    q1, q2, q3, q4, q5, q6, q7 = code_values(v, S)
    quant = tl.zeros([ROWS, 16], dtype=tl.float32)
    err = tl.zeros([ROWS, 16], dtype=tl.float32)
    for k in range(16):  # a loop, not unrolled (one copy to compile; see _block_step)
        tile, quant, err, e = _sweep_column(tile, quant, err, k, d, q1, q2, q3, q4, q5, q6, q7, u_ptr, stride_u,
                                            DTYPE)
    tl.store(src, tile, mask=rmask[:, None])
    out = r.to(tl.int64)[:, None] * 16 + col[None, :]
    tl.store(quant_ptr + out, quant, mask=rmask[:, None])
    tl.store(err_ptr + out, err, mask=rmask[:, None])


@triton.jit
def _hessian_search(w, rmask, v_ptr, h_ptr, kappa_ptr, S, BF16_DOT: tl.constexpr):
    """The candidate of each row's block under ``dw^T H_b dw``: the fp32 code chain of
    :func:`.hessian_kernel._hessian_sweep` on the same ``[64, 16]`` tile (same products, same
    tensor-core shapes), its window and its two-candidates-per-step order."""
    c = tl.arange(0, 16)
    h = tl.load(h_ptr + c[:, None] * 16 + c[None, :])
    h1, h2, h3 = split3(h)
    hw = weight_times_hessian(w, h1, h2, h3, BF16_DOT)
    a = tl.abs(w)
    kappa = tl.load(kappa_ptr + c)[None, :]
    amax = tl.max(a, axis=1)
    k0 = start_candidate(v_ptr, amax, S)
    v0 = tl.load(v_ptr + k0)
    best = hessian_loss(w, a, hw, h1, h2, h3, v0, v0 * S, S, BF16_DOT)
    best_k = k0
    k_lo, k_hi = candidate_window(v_ptr, a, amax, k0, best, kappa, S, True)
    width = tl.max(tl.where(rmask, k_hi - k_lo + 1, 0))
    for i in range(0, width, 2):
        ka = k_lo + i
        kb = ka + 1
        va = tl.load(v_ptr + tl.minimum(ka, 125))
        vb = tl.load(v_ptr + tl.minimum(kb, 125))
        loss_a = hessian_loss(w, a, hw, h1, h2, h3, va, va * S, S, BF16_DOT)
        loss_b = hessian_loss(w, a, hw, h1, h2, h3, vb, vb * S, S, BF16_DOT)
        best, best_k = take_better(ka, loss_a, k_hi, k0, best, best_k)
        best, best_k = take_better(kb, loss_b, k_hi, k0, best, best_k)
    return best_k


@triton.jit
def _block_step(cols_ptr, u_ptr, bamax_ptr, g_ptr, ratio_ptr, v_ptr, h_ptr, kappa_ptr, quant_ptr, err_ptr, rows,
                n_rest, stride_cols, stride_u, stride_bamax, stride_quant, stride_err, DTYPE: tl.constexpr,
                SEARCH: tl.constexpr, BF16_DOT: tl.constexpr, ROWS: tl.constexpr, REST: tl.constexpr):
    """``SEARCH``: 0 reads the block amaxes, 1 searches them by MSE, 2 by the local Hessian
    (``h_ptr``/``kappa_ptr``: the block's 16x16 Hessian and Schur floors). ``cols_ptr``: the
    block's 16 columns followed by the ``n_rest`` columns of the rest of its span (``REST`` >=
    n_rest, a power of two, or 0 when there are none)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = r < rows
    rl = r.to(tl.int64)
    col = tl.arange(0, 16)
    src = cols_ptr + rl[:, None] * stride_cols + col[None, :]
    tile = tl.load(src, mask=rmask[:, None], other=0.0)
    # the clamped global amax and S = fl(g / 2688): the search's and the sweep's global scale
    G = tl.maximum(tl.load(g_ptr).to(tl.float32), MIN_GLOBAL_AMAX)
    S = global_scale(g_ptr)
    if SEARCH == 0:
        bamax = tl.load(bamax_ptr + rl * stride_bamax, mask=rmask, other=0.0)
    else:
        # the search sees the block as the weight's dtype holds it (gptq.py's ``.to(dtype)``)
        w = _round_to(tile, DTYPE)
        if SEARCH == 1:
            best_k, _ = mse_search(w, rmask, v_ptr, S)
        else:
            best_k = _hessian_search(w, rmask, v_ptr, h_ptr, kappa_ptr, S, BF16_DOT)
        bamax = tl.load(ratio_ptr + best_k) * G  # fl(c_k * g), the searches' block amax
        tl.store(bamax_ptr + rl * stride_bamax, bamax, mask=rmask)
    v = scale_value(bamax, S)
    d = v * S
    q1, q2, q3, q4, q5, q6, q7 = code_values(v, S)
    if REST > 0:
        rc = tl.arange(0, REST)
        cmask = rc < n_rest
        rmask2 = rmask[:, None] & cmask[None, :]
        rest_src = cols_ptr + rl[:, None] * stride_cols + 16 + rc[None, :]
        rest = tl.load(rest_src, mask=rmask2, other=0.0)
    quant = tl.zeros([ROWS, 16], dtype=tl.float32)
    err = tl.zeros([ROWS, 16], dtype=tl.float32)
    # a loop, not unrolled: one copy of the step to compile (the column is selected by masks)
    for k in range(16):
        tile, quant, err, e = _sweep_column(tile, quant, err, k, d, q1, q2, q3, q4, q5, q6, q7, u_ptr, stride_u,
                                            DTYPE)
        if REST > 0:  # the rest of the span takes e_k now: per element, propagate's order
            ur = tl.load(u_ptr + k * stride_u + 16 + rc, mask=cmask, other=0.0)
            rest = rest - e[:, None] * ur[None, :]
    tl.store(src, tile, mask=rmask[:, None])
    if REST > 0:
        tl.store(rest_src, rest, mask=rmask2)
    tl.store(quant_ptr + rl[:, None] * stride_quant + col[None, :], quant, mask=rmask[:, None])
    tl.store(err_ptr + rl[:, None] * stride_err + col[None, :], err, mask=rmask[:, None])


@triton.jit
def _propagate(rest_ptr, err_ptr, u_ptr, rows, n, K, stride_rest, stride_err, stride_err_k, stride_u,
               ROWS: tl.constexpr, COLS: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    rmask = r < rows
    cmask = c < n
    mask = rmask[:, None] & cmask[None, :]
    ptr = rest_ptr + r.to(tl.int64)[:, None] * stride_rest + c[None, :]
    tile = tl.load(ptr, mask=mask, other=0.0)
    for k in range(K):
        e = tl.load(err_ptr + r.to(tl.int64) * stride_err + k * stride_err_k, mask=rmask, other=0.0)
        u = tl.load(u_ptr + k * stride_u + c, mask=cmask, other=0.0)
        tile = tile - e[:, None] * u[None, :]  # product rounded, then the difference
    tl.store(ptr, tile, mask=mask)


# GPU tiles: the sweep holds 16 columns per row (one row per thread with 128 rows and 4 warps);
# propagate holds a [32, 256] tile (64 values per thread, 4 warps) and streams K error columns
# and U rows through it. The interpreter pays per program: one program per launch up to 2^18
# elements.
SWEEP_ROWS = 128
PROP_ROWS = 32
PROP_COLS = 256
INTERPRETER_ELEMS = 2**18


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_sweep_block(block: torch.Tensor, u_block: torch.Tensor, scale: torch.Tensor, s: torch.Tensor,
                       dtype: torch.dtype, from_amax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``block [rows, 16]`` fp32 (unit column stride, updated in place), ``u_block [16, 16]`` fp32
    (unit column stride), ``scale [rows]`` fp32 (any stride), ``s`` fp32 one element (all on one
    device) -> ``(quant, err)`` fp32 ``[rows, 16]``. ``scale`` and ``s`` are the FP8 scale values
    and the global scale, or with ``from_amax`` the block amaxes and the global amax."""
    rows = block.shape[0]
    quant = torch.empty(rows, 16, dtype=torch.float32, device=block.device)
    err = torch.empty(rows, 16, dtype=torch.float32, device=block.device)
    if rows == 0:
        return quant, err
    tile = SWEEP_ROWS if block.is_cuda else min(INTERPRETER_ELEMS // 16, _pow2(rows))
    _sweep_block[(triton.cdiv(rows, tile),)](
        block_ptr=block, u_ptr=u_block, scale_ptr=scale, s_ptr=s, quant_ptr=quant, err_ptr=err, rows=rows,
        stride_block=block.stride(0), stride_u=u_block.stride(0), stride_scale=scale.stride(0),
        DTYPE=_DTYPE_CODES[dtype], FROM_AMAX=from_amax, ROWS=tile, num_warps=4, enable_fp_fusion=False)
    return quant, err


# The block step's tile on the local-Hessian path: 64 rows, 4 warps, as the local-Hessian sweep's
# (its tensor-core products and row sums then have the sweep's shapes, on the GPU and in the
# interpreter). The MSE and fixed-scale steps give the same bits on any tile (every sum is in a
# written-out order): 32 rows on the GPU, a short serial chain per thread and 128 programs for a
# 4096-row weight; the interpreter takes them in one program.
STEP_ROWS_HESSIAN = 64
STEP_ROWS = 32
# The rest of the span a step updates, as a tile width: one width for every block of a 128-column
# span (at most 112 columns after the block; masked), so the GPU compiles one step per search and
# dtype instead of one per power of two. The interpreter takes the exact width (it pays per value).
STEP_REST = 128
SEARCH_CODES = {None: 0, "mse": 1, "local_hessian": 2}


def launch_block_step(cols: torch.Tensor, u_rows: torch.Tensor, block_amax: torch.Tensor, g: torch.Tensor,
                      ratios: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor | None,
                      kappa: torch.Tensor | None, quant: torch.Tensor, err: torch.Tensor, dtype: torch.dtype,
                      search: str | None) -> None:
    """``cols [rows, 16 + n]`` fp32 (unit column stride, updated in place), ``u_rows [16, 16 + n]``
    fp32 (unit column stride), ``block_amax [rows]`` fp32 (any stride; written when searching),
    ``g`` the global amax (fp32, one element), ``ratios`` / ``values`` the 126 candidates'
    ``c_k`` and ``v_k``, ``hessian [16, 16]`` / ``kappa [16]`` fp32 contiguous (local_hessian),
    ``quant`` / ``err`` ``[rows, 16]`` fp32 outputs (unit column stride)."""
    rows, width = cols.shape
    n_rest = width - 16
    if rows == 0:
        return
    code = SEARCH_CODES[search]
    if code == 2:
        tile = STEP_ROWS_HESSIAN
    elif cols.is_cuda:
        tile = STEP_ROWS
    else:
        tile = min(INTERPRETER_ELEMS // max(16, _pow2(width)), _pow2(rows))
    if cols.is_cuda:
        rest = max(STEP_REST, _pow2(n_rest))
    else:
        rest = _pow2(n_rest) if n_rest > 0 else 0
    dummy = g  # pointer arguments the chosen path never reads
    _block_step[(triton.cdiv(rows, tile),)](
        cols_ptr=cols, u_ptr=u_rows, bamax_ptr=block_amax, g_ptr=g, ratio_ptr=ratios, v_ptr=values,
        h_ptr=dummy if hessian is None else hessian, kappa_ptr=dummy if kappa is None else kappa,
        quant_ptr=quant, err_ptr=err, rows=rows, n_rest=n_rest, stride_cols=cols.stride(0),
        stride_u=u_rows.stride(0), stride_bamax=block_amax.stride(0), stride_quant=quant.stride(0),
        stride_err=err.stride(0), DTYPE=_DTYPE_CODES[dtype], SEARCH=code, BF16_DOT=cols.is_cuda, ROWS=tile,
        REST=rest, num_warps=4, enable_fp_fusion=False)


def launch_propagate(rest: torch.Tensor, err: torch.Tensor, u_rows: torch.Tensor) -> None:
    """``rest [rows, n]`` fp32 (unit column stride, updated in place) ``-= err[:, k] * u_rows[k]``
    for k = 0..K-1 in order; ``err [rows, K]`` fp32 (any strides), ``u_rows [K, n]`` fp32 with
    unit column stride."""
    rows, n = rest.shape
    k = err.shape[1]
    if rows == 0 or n == 0 or k == 0:
        return
    if rest.is_cuda:
        tile_rows, cols = PROP_ROWS, PROP_COLS
    else:
        cols = min(_pow2(n), INTERPRETER_ELEMS)
        tile_rows = max(1, min(INTERPRETER_ELEMS // cols, _pow2(rows)))
    _propagate[(triton.cdiv(rows, tile_rows), triton.cdiv(n, cols))](
        rest_ptr=rest, err_ptr=err, u_ptr=u_rows, rows=rows, n=n, K=k, stride_rest=rest.stride(0),
        stride_err=err.stride(0), stride_err_k=err.stride(1), stride_u=u_rows.stride(0), ROWS=tile_rows,
        COLS=cols, num_warps=4, enable_fp_fusion=False)
