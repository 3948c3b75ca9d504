"""Triton local-Hessian sweep and DSS search: ``dw^T H_b dw`` on tensor cores.

A program takes ``BLK_R`` rows of one cin-block b (all share ``H_b``). ``H_b w`` is computed
once per tile; per candidate only ``H_b (e2m1 * v)`` is needed, whose operands are exact in
bf16 (see :func:`.tl_nvfp4.hessian_loss`), so three bf16 MMAs against an exact split of H give
the products exactly and the loss agrees with the reference to fp32 rounding: the chosen loss
is within ``HESSIAN_REL_TOL`` of the best, relative to ``|w|^T |H| |w|`` (the tests' criterion).

The sweep evaluates per row the start candidate, then its exact window (Schur-floor bounds,
:mod:`.windows`); DSS tries ``k* - 1, k*, k* + 1`` times the beta grid, in the spec's order,
strict improvement over the coupled optimum. The tile shape is fixed (never autotuned): the
row reduction's order follows the layout, and a fixed layout keeps every row's result
independent of the shard it sits in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_nvfp4 import candidate_window, hessian_loss, split3, start_candidate, weight_times_hessian

# Relative tolerance of the chosen Hessian loss, in units of |w|^T |H| |w| of the block: the
# kernel's error is ~u (2^-24) times that scale per operation (the cancellation in
# H w - S H (e v) is bounded by it), a few dozen operations deep; 2^-16 leaves a wide margin
# while still catching any wrong code, scale or candidate (those move the loss by ~1e-3).
HESSIAN_REL_TOL = 2.0**-16

BLK_R = 64  # rows per program (fixed: see module docstring)
NUM_WARPS = 4


@triton.jit
def _tile(w_ptr, stride_row, rows, h_ptr, pid, b, BLK_R: tl.constexpr, BF16_DOT: tl.constexpr):
    r = pid.to(tl.int64) * BLK_R + tl.arange(0, BLK_R)
    rmask = r < rows
    c = tl.arange(0, 16)
    w = tl.load(w_ptr + r[:, None] * stride_row + b * 16 + c[None, :], mask=rmask[:, None], other=0.0)
    w = w.to(tl.float32)
    h = tl.load(h_ptr + b.to(tl.int64) * 256 + c[:, None] * 16 + c[None, :])
    h1, h2, h3 = split3(h)
    eye = tl.where(c[:, None] == c[None, :], 1.0, 0.0)
    return r, rmask, w, h1, h2, h3, eye, weight_times_hessian(w, h1, h2, h3, BF16_DOT)


@triton.jit
def _hessian_sweep(w_ptr, stride_row, rows, nb, h_ptr, kappa_ptr, s_ptr, v_ptr, k_ptr, loss_ptr,
                   BLK_R: tl.constexpr, BF16_DOT: tl.constexpr):
    b = tl.program_id(1)
    r, rmask, w, h1, h2, h3, eye, hw = _tile(w_ptr, stride_row, rows, h_ptr, tl.program_id(0), b, BLK_R, BF16_DOT)
    a = tl.abs(w)
    S = tl.load(s_ptr)
    kappa = tl.load(kappa_ptr + b * 16 + tl.arange(0, 16))[None, :]
    amax = tl.max(a, axis=1)
    k0 = start_candidate(amax, v_ptr, S)
    v0 = tl.load(v_ptr + k0)
    best = hessian_loss(w, a, hw, h1, h2, h3, eye, v0, v0 * S, S, BF16_DOT, False)
    best_k = k0
    k_lo, k_hi = candidate_window(a, amax, k0, best, kappa, v_ptr, S, True)
    width = tl.max(tl.where(rmask, k_hi - k_lo + 1, 0))
    for i in range(width):
        k = k_lo + i
        v = tl.load(v_ptr + tl.minimum(k, 125))
        loss = hessian_loss(w, a, hw, h1, h2, h3, eye, v, v * S, S, BF16_DOT, False)
        better = (k <= k_hi) & (k != k0) & ((loss < best) | ((loss == best) & (k < best_k)))
        best = tl.where(better, loss, best)
        best_k = tl.where(better, k, best_k)
    out = r * nb + b
    tl.store(k_ptr + out, best_k, mask=rmask)
    tl.store(loss_ptr + out, best, mask=rmask)


@triton.jit
def _dss_search(w_ptr, stride_row, rows, nb, h_ptr, s_ptr, v_ptr, betas_ptr, n_betas,
                k_ptr, loss_ptr, beta_ptr, BLK_R: tl.constexpr, BF16_DOT: tl.constexpr):
    """In place: (k, loss) hold the coupled optimum on entry, the DSS choice on exit."""
    b = tl.program_id(1)
    r, rmask, w, h1, h2, h3, eye, hw = _tile(w_ptr, stride_row, rows, h_ptr, tl.program_id(0), b, BLK_R, BF16_DOT)
    a = tl.abs(w)
    S = tl.load(s_ptr)
    out = r * nb + b
    k_star = tl.load(k_ptr + out, mask=rmask, other=0)
    best = tl.load(loss_ptr + out, mask=rmask, other=0.0)
    best_k = k_star
    best_beta = tl.zeros([BLK_R], tl.float32) + 1.0
    for offset in tl.static_range(3):
        k = tl.minimum(tl.maximum(k_star + (offset - 1), 0), 125)
        v = tl.load(v_ptr + k)
        d = v * S
        for j in range(n_betas):
            beta = tl.load(betas_ptr + j)
            loss = hessian_loss(w, a, hw, h1, h2, h3, eye, v, beta * d, S, BF16_DOT, True)
            better = loss < best  # strict: the incumbent and earlier pairs win ties
            best = tl.where(better, loss, best)
            best_k = tl.where(better, k, best_k)
            best_beta = tl.where(better, beta, best_beta)
    tl.store(k_ptr + out, best_k, mask=rmask)
    tl.store(loss_ptr + out, best, mask=rmask)
    tl.store(beta_ptr + out, best_beta, mask=rmask)


def _grid(rows: int, nb: int, blk_r: int):
    return (triton.cdiv(rows, blk_r), nb)


def launch_hessian_sweep(w: torch.Tensor, hessian: torch.Tensor, kappa: torch.Tensor,
                         global_scale: torch.Tensor, values: torch.Tensor,
                         blk_r: int = BLK_R, num_warps: int = NUM_WARPS):
    """Candidates (int32) and losses (fp32) ``[rows, cin // 16]`` of ``w [rows, cin]``.

    ``hessian`` fp32 contiguous ``[cin // 16, 16, 16]``; ``kappa`` fp32 ``[cin // 16, 16]``
    (:func:`.windows.schur_floor`); ``global_scale`` fp32 ``[1]``; ``values`` the E4M3 values.
    """
    rows, cin = w.shape
    nb = cin // 16
    k = torch.empty(rows, nb, dtype=torch.int32, device=w.device)
    loss = torch.empty(rows, nb, dtype=torch.float32, device=w.device)
    if rows and nb:
        _hessian_sweep[_grid(rows, nb, blk_r)](
            w, w.stride(0), rows, nb, hessian, kappa, global_scale, values, k, loss,
            BLK_R=blk_r, BF16_DOT=w.is_cuda, num_warps=num_warps)
    return k, loss


def launch_dss_search(w: torch.Tensor, hessian: torch.Tensor, global_scale: torch.Tensor,
                      values: torch.Tensor, betas: torch.Tensor, k: torch.Tensor, loss: torch.Tensor,
                      blk_r: int = BLK_R, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """DSS from the coupled ``(k, loss)`` (updated in place); returns beta fp32 ``[rows, cin // 16]``."""
    rows, cin = w.shape
    nb = cin // 16
    beta = torch.ones(rows, nb, dtype=torch.float32, device=w.device)
    if rows and nb and betas.numel():
        _dss_search[_grid(rows, nb, blk_r)](
            w, w.stride(0), rows, nb, hessian, global_scale, values, betas, betas.numel(),
            k, loss, beta, BLK_R=blk_r, BF16_DOT=w.is_cuda, num_warps=num_warps)
    return beta
