"""The spec's building blocks: per-candidate constants and the block losses, in plain torch.

:mod:`.reference` documents the semantics; this module holds the arithmetic both its fast
(windowed) and its slow (full) searches share, so that the two are bit-identical by
construction: every loss is computed by one function, whatever subset of blocks it is given.
"""

from __future__ import annotations

import torch

from ..numerics import nvfp4
from ..numerics.constants import (
    E2M1_THRESHOLD_INCLUSIVE,
    E2M1_THRESHOLDS,
    E2M1_VALUES,
    e4m3_positive_values,
)


class CandidateTables:
    """Per-candidate constants for one global scale, fp32 on ``device``.

    ``v`` (126,) FP8 scale values; ``decode`` = fl(v * S) (126,); ``qmag`` = fl(fl(e2m1 * v) * S)
    (126, 8), the dequantized magnitude of every code; ``bounds`` (126, 7): thresholds
    ``fl(t * d)``, the inclusive ones moved one ulp down, so that the strict count
    ``#{bounds < |w|}`` (``bucketize``) is the threshold count of the spec. ``qmax`` = qmag[:, 7]
    and ``zero_bound`` = bounds[:, 0] = fl(0.25 * d) (|w| at or below it gets code 0).
    """

    def __init__(self, global_amax: torch.Tensor, device: torch.device):
        self.global_scale = nvfp4.global_scale(global_amax).to(device)
        self.v = e4m3_positive_values().to(device)
        self.decode = self.v * self.global_scale
        grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
        self.qmag = (grid[None, :] * self.v[:, None]) * self.global_scale
        t = torch.tensor(E2M1_THRESHOLDS, dtype=torch.float32, device=device)
        inclusive = torch.tensor(E2M1_THRESHOLD_INCLUSIVE, device=device)
        thr = t[None, :] * self.decode[:, None]
        self.bounds = torch.where(inclusive, torch.nextafter(thr, torch.zeros_like(thr)), thr)
        self.qmax = self.qmag[:, 7].contiguous()
        self.zero_bound = self.bounds[:, 0].contiguous()


def tree16(x: torch.Tensor) -> torch.Tensor:
    """Pairwise sum over a last dimension of 16 in a fixed order: ``x[0::2] + x[1::2]``, 4 times."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x.squeeze(-1)


def hessian_form(dw: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tree16_j(dw_j * (H dw)_j)``, ``(H dw)_j = sum_i fl(dw_i * H_ij)`` added for i = 0..15 in order.

    ``dw``: ``[..., 16]`` (fp32 in the searches); ``hessian``: ``[..., 16, 16]`` broadcastable
    against ``dw[..., None]`` (``[nb, 16, 16]`` for ``dw [rows, nb, 16]``, or one per block).
    Elementwise products and sums only: a block's value never depends on which other blocks are
    computed with it (a BLAS product's summation order follows the matrix shape), so a row's
    result is the same in any shard or chunk, and temporaries stay the size of ``dw``.
    """
    hdw = dw[..., 0:1] * hessian[..., 0, :]
    for i in range(1, hessian.shape[-2]):
        # in place, one pass per term (6x faster than a separate product and sum on the CPU);
        # each element's arithmetic is the same whatever the tensor's shape
        hdw.addcmul_(dw[..., i:i + 1], hessian[..., i, :])
    return tree16(dw * hdw)


def block_loss(dw: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Block objective of signed errors ``dw [..., 16]``: SSE, or dw^T H_b dw (see above)."""
    if hessian is None:
        return tree16(dw * dw)
    return hessian_form(dw, hessian)


def _signed(dw_abs: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.where(wb < 0, -dw_abs, dw_abs)


def candidate_errors(wb: torch.Tensor, k: int | torch.Tensor, tables: CandidateTables,
                     signed: bool) -> torch.Tensor:
    """Errors ``|w| - q`` of candidate k for blocks ``wb [..., 16]`` (fp32), sign of w if ``signed``.

    ``k``: one candidate for every block (int) or one per block (int64 tensor ``wb.shape[:-1]``).
    """
    aw = wb.abs()
    if isinstance(k, int):
        bounds = tables.bounds[k]
        code = (aw > bounds[0]).to(torch.uint8)
        for i in range(1, bounds.shape[0]):
            code += aw > bounds[i]
        q = tables.qmag[k][code.long()]
    else:
        bounds = tables.bounds[k].unsqueeze(-2)
        code = (aw > bounds[..., 0]).to(torch.uint8)
        for i in range(1, bounds.shape[-1]):
            code += aw > bounds[..., i]
        q = torch.gather(tables.qmag[k], -1, code.long())
    dw = aw - q
    return _signed(dw, wb) if signed else dw


def candidate_loss(wb: torch.Tensor, k: int | torch.Tensor, tables: CandidateTables,
                   hessian: torch.Tensor | None) -> torch.Tensor:
    """Loss of candidate k (int, or int64 per block) for every block of ``wb [..., 16]``."""
    return block_loss(candidate_errors(wb, k, tables, hessian is not None), hessian)


def dss_errors(wb: torch.Tensor, k: torch.Tensor, beta: float | torch.Tensor,
               tables: CandidateTables) -> torch.Tensor:
    """Signed errors of the DSS pair (s_d = v_k per block, quant scale fl(beta * d_k)).

    ``k``: int64 per block (``wb.shape[:-1]``); ``beta``: one value or fp32 per block.
    """
    d_q = beta * tables.decode[k]
    code = nvfp4.e2m1_code_magnitude(wb.abs(), d_q.unsqueeze(-1))
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=wb.device)
    q = (grid[code.long()] * tables.v[k].unsqueeze(-1)) * tables.global_scale
    return _signed(wb.abs() - q, wb)
