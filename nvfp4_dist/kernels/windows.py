"""Exact candidate windows: lower bounds that rule candidates out without changing any result.

A sweep returns the smallest k whose loss is minimal. Here, per block, one candidate is
evaluated first (``k0``: the smallest k with ``qmax_k >= A``, A = max |w|; its loss U is an upper
bound of the optimum) and bounds then prove every candidate outside ``[k_lo, k_hi]`` a loser:
  * below: ``loss_k > U`` (strictly, since a smaller k would win a tie);
  * above: ``loss_k >= U = loss_k0`` (k > k0 loses the tie), or k beyond the first candidate
    ``Z`` that zeroes the whole block (every later one has the identical loss).
The searches then evaluate only the window, in any order, keeping (loss, k) lexicographically
smallest, so their result is the full sweep's bit for bit (MSE) and for the Hessian loss of the
spec. Every bound uses the fp32 values the loss itself is made of, and fp32 sums of non-negative
terms are monotone in every term, which makes the MSE bounds exact without margins:
  * saturation (k < k0): the max element codes to 7, ``dw = fl(A - qmax_k)`` is one term of the
    loss, so ``loss_k >= fl(dw^2)``; it decreases with k.
  * tail (k > k0): for ``a < h_K = fl(0.5 d_K)`` and any k >= K the code is 0 or 1 (q = 0 or
    ``h_k``), so ``|dw| >= min(a, fl(h_K - a))``; ``tree16`` of these squares is a lower bound of
    every loss_k, k >= K, and grows with K.
Under the Hessian loss one error alone bounds the quadratic form by the Schur complement:
``dw^T H dw >= kappa_j dw_j^2`` with ``kappa_j = 1 / (H^-1)_jj`` (minimum over all other entries).
:func:`schur_floor` folds into kappa the fp32 rounding of the loss (relative to ``|dw|^T |H| |dw|``,
at most ``rho / lambda_min`` times the loss), so the bounds hold for the computed losses too;
blocks whose H is singular or too ill-conditioned get kappa = 0 (no pruning, still exact).
The Triton kernels compute the same windows in-kernel.
"""

from __future__ import annotations

import torch

from ..numerics.constants import NUM_FP8_CANDIDATES
from .candidates import CandidateTables, candidate_loss, dss_errors, hessian_form, tree16

_LAST = NUM_FP8_CANDIDATES - 1
_SEARCH_STEPS = 7  # ceil(log2(127)): bisection over any sub-range of the 126 candidates
# Rounding of the spec's Hessian loss: 16 products and 15 sequential sums for (H dw)_j, then a
# product and the 4-level tree, give |L_fp32 - L| <= 21.1 u |dw|^T |H| |dw| (u = 2^-24);
# 2^-19 = 32 u covers it.
LOSS_ROUNDING = 2.0**-19
# kappa is computed in float64 (inverse of a matrix whose condition the factor below bounds by
# 2^19) and used in fp32 products of fp32 squares: a few roundings of 2^-24 each.
KAPPA_MARGIN = 1.0 - 2.0**-18


def schur_floor(hessian: torch.Tensor) -> torch.Tensor:
    """Per-entry Schur floors ``kappa [nb, 16]`` (fp32) of block Hessians ``[nb, 16, 16]``.

    ``kappa_j * dw_j^2`` is a lower bound of the computed fp32 loss of any dw (see module
    docstring); 0 where H_b is not positive definite or its condition makes the bound unsafe.
    ``lambda_min >= 1 / ||H^-1||_inf`` stands in for an eigensolver (slow on small batches).
    """
    h = hessian.double()
    h = 0.5 * (h + h.transpose(-1, -2))  # the quadratic form sees only the symmetric part
    _, chol_info = torch.linalg.cholesky_ex(h)
    inv, info = torch.linalg.inv_ex(h)
    kappa = 1.0 / inv.diagonal(dim1=-2, dim2=-1)
    habs = hessian.double().abs()
    rho = habs.sum(-1).amax(-1).maximum(habs.sum(-2).amax(-1))  # >= || |H| ||_2
    # fp32 loss >= (1 - 2^-19 rho / lambda_min) * exact loss, for every dw
    factor = 1.0 - LOSS_ROUNDING * rho * inv.abs().sum(-1).amax(-1)
    ok = (chol_info == 0) & (info == 0) & (factor > 0) & torch.isfinite(kappa).all(-1) & (kappa > 0).all(-1)
    kappa = torch.where(ok[:, None], kappa * (factor * KAPPA_MARGIN)[:, None], 0.0)
    return kappa.float()


def start_candidate(amax: torch.Tensor, tables: CandidateTables) -> torch.Tensor:
    """k0: smallest k with ``qmax_k >= amax`` (clamped to 125), int64 like ``amax``."""
    return torch.searchsorted(tables.qmax, amax.contiguous()).clamp_max(_LAST)


def _bisect(lo: torch.Tensor, hi: torch.Tensor, accept) -> torch.Tensor:
    """Smallest k in [lo, hi) with ``accept(k)`` (monotone: false then true), else hi."""
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) // 2
        go = lo < hi
        ok = accept(mid.clamp_max(_LAST))
        hi = torch.where(go & ok, mid, hi)
        lo = torch.where(go & ~ok, mid + 1, lo)
    return lo


def _saturation_bound(a: torch.Tensor, amax: torch.Tensor, k: torch.Tensor, tables: CandidateTables,
                      kappa: torch.Tensor | None) -> torch.Tensor:
    qmax = tables.qmax[k]
    if kappa is None:  # the max element's term is the largest one
        over = amax - qmax
        return torch.where(amax > qmax, over * over, torch.zeros_like(amax))
    over = a - qmax.unsqueeze(-1)
    return (kappa * torch.where(a > qmax.unsqueeze(-1), over * over, torch.zeros_like(a))).amax(-1)


def _tail_bound(a: torch.Tensor, k: torch.Tensor, tables: CandidateTables,
                kappa: torch.Tensor | None) -> torch.Tensor:
    half = tables.qmag[k, 1].unsqueeze(-1)  # fl(fl(0.5 v) S) = fl(0.5 d): the code-1 value
    low = torch.minimum(a, half - a)
    term = torch.where(a < half, low * low, torch.zeros_like(a))
    return tree16(term) if kappa is None else (kappa * term).amax(-1)


def candidate_window(a: torch.Tensor, k0: torch.Tensor, upper: torch.Tensor, tables: CandidateTables,
                     kappa: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_lo, k_hi)`` per block: candidates outside cannot be chosen (module docstring).

    ``a``: |w| fp32 ``[..., 16]``; ``k0``: start candidates ``[...]``; ``upper``: their losses;
    ``kappa``: Schur floors broadcastable to ``a`` for the Hessian loss, None for MSE.
    """
    amax = a.amax(-1)
    k_lo = _bisect(torch.zeros_like(k0), k0,
                   lambda k: _saturation_bound(a, amax, k, tables, kappa) <= upper)
    zero = torch.searchsorted(tables.zero_bound, amax.contiguous()).clamp_max(_LAST)
    k_hi = _bisect(k0 + 1, zero + 1, lambda k: _tail_bound(a, k, tables, kappa) >= upper) - 1
    return k_lo, k_hi


def windowed_sweep(wb: torch.Tensor, tables: CandidateTables, hessian: torch.Tensor | None = None,
                   kappa: torch.Tensor | None = None,
                   column: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sweep of blocks ``wb [n, 16]`` (fp32) -> (candidate int64 [n], loss fp32 [n]).

    MSE when ``hessian`` is None; else ``hessian [nb, 16, 16]`` and ``kappa [nb, 16]``
    (:func:`schur_floor`) are indexed by ``column [n]``, each block's cin-block. Candidates are
    visited in increasing k, each for the blocks whose window holds it (one shared set of
    thresholds per step); the losses are the spec's, whatever subset they are computed on.
    """
    def loss_of(idx, k):
        h = None if hessian is None else hessian[column[idx]]
        return candidate_loss(wb[idx], k, tables, h)

    a = wb.abs()
    k0 = start_candidate(a.amax(-1), tables)
    best_loss = torch.empty(wb.shape[0], dtype=torch.float32, device=wb.device)
    for k in k0.unique().tolist():
        idx = (k0 == k).nonzero().squeeze(1)
        best_loss[idx] = loss_of(idx, k)
    best_k = k0.clone()
    if k0.numel() == 0:
        return best_k, best_loss
    k_lo, k_hi = candidate_window(a, k0, best_loss, tables, None if kappa is None else kappa[column])
    for k in range(int(k_lo.min()), int(k_hi.max()) + 1):  # Python ints: the shared-threshold path
        idx = ((k_lo <= k) & (k <= k_hi) & (k0 != k)).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        loss = loss_of(idx, k)
        old_loss, old_k = best_loss[idx], best_k[idx]
        better = (loss < old_loss) | ((loss == old_loss) & (k < old_k))  # ties: smallest k
        best_loss[idx] = torch.where(better, loss, old_loss)
        best_k[idx] = torch.where(better, k, old_k)
    return best_k, best_loss


def pruned_dss(wb: torch.Tensor, k_star: torch.Tensor, loss: torch.Tensor, betas: list[float],
               tables: CandidateTables, hessian: torch.Tensor, kappa: torch.Tensor,
               column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DSS pairs in spec order over blocks ``wb [n, 16]``, from the coupled ``(k_star, loss)``.

    ``hessian [nb, 16, 16]`` and ``kappa [nb, 16]`` are indexed by ``column [n]`` (each block's
    cin-block). A pair's quadratic form is computed
    only for blocks where ``max_j kappa_j dw_j^2`` does not exceed the incumbent (otherwise it
    cannot be strictly better). Returns (candidate int64, beta fp32, loss fp32), each ``[n]``.
    """
    best_loss, best_k = loss.clone(), k_star.clone()
    best_beta = torch.ones_like(best_loss)
    kappa = kappa[column]
    for offset in (-1, 0, 1):
        k = (k_star + offset).clamp(0, _LAST)
        for beta in betas:
            dw = dss_errors(wb, k, beta, tables)
            idx = ((kappa * (dw * dw)).amax(-1) <= best_loss).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            cand = hessian_form(dw[idx], hessian[column[idx]])
            old = best_loss[idx]
            better = cand < old  # strict: the incumbent and earlier pairs win ties
            best_loss[idx] = torch.where(better, cand, old)
            best_k[idx] = torch.where(better, k[idx], best_k[idx])
            best_beta[idx] = torch.where(better, beta, best_beta[idx])
    return best_k, best_beta, best_loss
