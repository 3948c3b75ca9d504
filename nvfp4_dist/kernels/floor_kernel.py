"""Triton Schur floors: :func:`.windows.schur_floor` in one launch on the Hessian's device.

The Hessian sweep prunes candidates with ``kappa_j = 1 / (H^-1)_jj`` (see :mod:`.windows`).
On a GPU the torch formulation costs a device-to-host round trip or a handful of batched
solver launches per search, about as long as the sweep of a 8192x4096 weight. Here each
program inverts ``BLK_B`` symmetrised 16x16 blocks in float64 by Gauss-Jordan elimination
without pivoting: for a symmetric matrix that elimination is the LDL^T factorization, so
all 16 pivots are positive exactly when the block is positive definite (the Cholesky test of
the torch version), and on positive definite blocks it is backward stable like Cholesky.

The floors are not required to equal the torch version's bit for bit, only to be valid lower
bounds: both compute the same float64 quantities to ~1e-16 relative times the condition
number, which the acceptance test bounds by 2^19, far inside the 2^-18 margin folded into
kappa. The tests compare the two to 1e-9 relative and check that the searches using either
return the reference's candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .windows import KAPPA_MARGIN, LOSS_ROUNDING

BLK_B = 16  # blocks per program: a [16, 16, 16] float64 tile, 32 KiB spread over the warps


@triton.jit
def _schur_floor(h_ptr, kappa_ptr, nb, LOSS_ROUNDING: tl.constexpr, KAPPA_MARGIN: tl.constexpr,
                 BLK_B: tl.constexpr):
    blk = tl.program_id(0) * BLK_B + tl.arange(0, BLK_B)
    bmask = blk < nb
    i = tl.arange(0, 16)
    ii = i[None, :, None]  # row index of the [BLK_B, 16, 16] tile
    jj = i[None, None, :]  # column index
    offs = blk.to(tl.int64)[:, None, None] * 256 + ii * 16 + jj
    h = tl.load(h_ptr + offs, mask=bmask[:, None, None], other=0.0).to(tl.float64)
    habs = tl.abs(h)
    # || |H| ||_2 <= max(max row sum, max column sum) of |H|
    rho = tl.maximum(tl.max(tl.sum(habs, axis=2), axis=1), tl.max(tl.sum(habs, axis=1), axis=1))
    a = 0.5 * (h + tl.permute(h, (0, 2, 1)))  # the quadratic form sees only the symmetric part
    positive = bmask
    for p in tl.static_range(16):
        row = tl.sum(tl.where(ii == p, a, 0.0), axis=1)  # [BLK_B, 16]: row p
        col = tl.sum(tl.where(jj == p, a, 0.0), axis=2)  # [BLK_B, 16]: column p
        pivot = tl.sum(tl.where(i[None, :] == p, row, 0.0), axis=1)
        positive = positive & (pivot > 0.0)
        inv_pivot = 1.0 / tl.where(pivot > 0.0, pivot, 1.0)
        # in-place Gauss-Jordan step: row p becomes row / pivot with 1 / pivot on the diagonal,
        # every other row i subtracts A_ip times it, and column p becomes -A_ip / pivot
        new_row = tl.where(i[None, :] == p, inv_pivot[:, None], row * inv_pivot[:, None])
        col = tl.where(i[None, :] == p, 0.0, col)
        a = tl.where(jj == p, 0.0, a) - col[:, :, None] * new_row[:, None, :]
        a = tl.where(ii == p, new_row[:, None, :], a)
    diag = tl.sum(tl.where(ii == jj, a, 0.0), axis=2)  # (H^-1)_jj
    kappa = 1.0 / tl.where(positive[:, None], diag, 1.0)
    inv_norm = tl.max(tl.sum(tl.abs(a), axis=2), axis=1)  # ||H^-1||_inf >= 1 / lambda_min
    factor = 1.0 - LOSS_ROUNDING * rho * inv_norm
    ok = positive & (factor > 0.0) & (tl.min(kappa, axis=1) > 0.0)
    ok = ok & (tl.max(tl.abs(kappa), axis=1) < float("inf"))
    kappa = tl.where(ok[:, None], kappa * (factor * KAPPA_MARGIN)[:, None], 0.0)
    out = blk.to(tl.int64)[:, None] * 16 + i[None, :]
    tl.store(kappa_ptr + out, kappa.to(tl.float32), mask=bmask[:, None])


def launch_schur_floor(hessian: torch.Tensor) -> torch.Tensor:
    """``kappa [nb, 16]`` fp32 of fp32 contiguous block Hessians ``[nb, 16, 16]`` on their device."""
    nb = hessian.shape[0]
    kappa = torch.empty(nb, 16, dtype=torch.float32, device=hessian.device)
    if nb:
        _schur_floor[(triton.cdiv(nb, BLK_B),)](
            h_ptr=hessian, kappa_ptr=kappa, nb=nb,
            LOSS_ROUNDING=LOSS_ROUNDING, KAPPA_MARGIN=KAPPA_MARGIN, BLK_B=BLK_B, num_warps=4)
    return kappa
