"""Torch reference of the NVFP4 block-scale searches: the specification the kernels must meet.

Every search works on one weight shard ``w [rows, cin]`` (fp32/bf16/fp16, ``cin % 16 == 0``)
with an fp32 0-d ``global_amax`` g (already reduced over the weight's fused group) and returns
a :class:`~nvfp4_dist.kernels.types.ScaleChoice`.

Candidates. ``v_k`` (k = 0..125) are the finite positive E4M3 values, ascending. Candidate k
stores FP8 scale ``v_k`` and means ``block_amax = fl(c_k * g)`` with ``c_k = fl(v_k / 448)``.
With ``S = fl(g / 2688)`` its decode scale is ``d_k = fl(v_k * S)``.

Quantizing one element ``w`` of a block against quant scale ``d_q`` (``d_k``, or ``fl(beta *
d_k)`` under DSS), all fp32:
  1. code   = number of thresholds t in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) with
              ``|w| > fl(t * d_q)`` (t = 0.25, 1.25, 2.5, 5) or ``|w| >= fl(t * d_q)``
              (t = 0.75, 1.75, 3.5): round to nearest, ties to the even code.
  2. q      = ``fl(fl(e2m1[code] * v_k) * S)`` (the inner product is exact).
  3. dw     = ``fl(|w| - q)`` carrying the sign of w (equal to ``fl(w - sign(w) * q)``).

Objectives per 16-element block (``tree16`` = pairwise sum in index order:
``x[0::2] + x[1::2]`` repeated four times):
  * ``mse``:            ``tree16(dw * dw)``.
  * ``local_hessian``:  ``tree16(dw * (H_b dw))`` where ``H_b`` (fp32 16x16, symmetric) is the
                        block's normalised input Hessian; ``H_b dw`` is a 16-term dot product
                        whose summation order is not specified (BLAS here, tensor cores in the
                        kernel), so Hessian losses agree to fp32 rounding, not bit for bit.
  * ``max``:            no search: ``block_amax = max |w_b|``.
Selection: the smallest loss; ties go to the smallest k (the first candidate).

DSS (decoupled scales, local-Hessian objective only): starting from the coupled optimum k*
(whose loss is the incumbent, beta = 1), try ``s_d = v_k`` for k in (k*-1, k*, k*+1) (clipped to
0..125) and each beta of the grid in order, with quant scale ``fl(beta * d_k)`` for the codes and
``v_k`` for dequantization; a pair replaces the incumbent only with a strictly lower loss, so
DSS never ends above the coupled search.

Chunking: rows are processed in chunks of ``chunk_elems`` elements; results for a row never
depend on which other rows share its chunk, so a shard's result equals the same rows' result
inside the full weight (the basis of TP invariance).
"""

from __future__ import annotations

import torch

from ..numerics import nvfp4
from ..numerics.constants import (
    BLOCK_SIZE,
    E2M1_THRESHOLD_INCLUSIVE,
    E2M1_THRESHOLDS,
    E2M1_VALUES,
    NUM_FP8_CANDIDATES,
    e4m3_positive_values,
)
from .types import ScaleChoice

DEFAULT_CHUNK_ELEMS = 1 << 21


def default_betas() -> torch.Tensor:
    """DSS beta grid [0.5, 1.5] step 0.05 (21 values, includes 1.0), fp32."""
    return beta_grid(0.5, 1.5, 0.05)


def beta_grid(lo: float, hi: float, step: float) -> torch.Tensor:
    """``fp32(round(lo + i * step, 10))`` for i = 0.. while the value is <= hi."""
    n = int(round((hi - lo) / step)) + 1
    return torch.tensor([round(lo + i * step, 10) for i in range(n)], dtype=torch.float32)


def tree16(x: torch.Tensor) -> torch.Tensor:
    """Pairwise sum over a last dimension of 16 in a fixed order (see module docstring)."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x.squeeze(-1)


class CandidateTables:
    """Per-candidate constants for one global scale, fp32 on ``device``.

    ``v`` (126,), ``decode`` = fl(v * S) (126,), ``qmag`` = fl(fl(e2m1 * v) * S) (126, 8) and
    ``bounds`` (126, 7): thresholds ``fl(t * d)``, the inclusive ones moved one ulp down so that
    ``bucketize(|w|, bounds[k])`` (strict '>' count) equals the threshold count of step 1.
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


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight shard [rows, cin], got shape {tuple(w.shape)}")
    if w.shape[1] % BLOCK_SIZE:
        raise ValueError(f"cin={w.shape[1]} is not a multiple of {BLOCK_SIZE}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"weight dtype {w.dtype} is not one of fp32/bf16/fp16")


def _check_hessian(hessian: torch.Tensor, w: torch.Tensor) -> None:
    nb = w.shape[1] // BLOCK_SIZE
    if tuple(hessian.shape) != (nb, BLOCK_SIZE, BLOCK_SIZE):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight "
                         f"{tuple(w.shape)}: expected ({nb}, 16, 16)")


def _row_chunks(w: torch.Tensor, chunk_elems: int):
    rows = max(1, chunk_elems // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, nvfp4.blocks(w[start:start + rows].float())


def _signed(dw_abs: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.where(wb < 0, -dw_abs, dw_abs)


def block_loss(dw: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Block objective of signed errors ``dw [rows, nb, 16]``: SSE, or dw^T H_b dw."""
    if hessian is None:
        return tree16(dw * dw)
    # H_b dw for every row of block b: a batched [rows, 16] @ [16, 16] product per block.
    hdw = torch.bmm(dw.transpose(0, 1), hessian).transpose(0, 1)
    return tree16(dw * hdw)


def candidate_loss(wb: torch.Tensor, k: int, tables: CandidateTables,
                   hessian: torch.Tensor | None) -> torch.Tensor:
    """Loss of candidate k for every block of ``wb [rows, nb, 16]`` (fp32) -> [rows, nb]."""
    aw = wb.abs()
    code = torch.bucketize(aw, tables.bounds[k], out_int32=True)
    dw = aw - tables.qmag[k][code]
    return block_loss(dw if hessian is None else _signed(dw, wb), hessian)


def _sweep(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor | None,
           chunk_elems: int) -> ScaleChoice:
    tables = CandidateTables(global_amax, w.device)
    nb = w.shape[1] // BLOCK_SIZE
    best_loss = torch.empty(w.shape[0], nb, dtype=torch.float32, device=w.device)
    best_k = torch.empty(w.shape[0], nb, dtype=torch.int64, device=w.device)
    for start, wb in _row_chunks(w, chunk_elems):
        loss_c = torch.full(wb.shape[:2], float("inf"), device=w.device)
        k_c = torch.zeros(wb.shape[:2], dtype=torch.int64, device=w.device)
        for k in range(NUM_FP8_CANDIDATES):
            loss = candidate_loss(wb, k, tables, hessian)
            better = loss < loss_c  # strict: the first (smallest) candidate wins ties
            loss_c = torch.where(better, loss, loss_c)
            k_c = torch.where(better, k, k_c)
        best_loss[start:start + wb.shape[0]] = loss_c
        best_k[start:start + wb.shape[0]] = k_c
    return ScaleChoice(block_amax=nvfp4.candidate_block_amax(best_k, global_amax),
                       candidate=best_k, loss=best_loss)


def search_max(w: torch.Tensor, global_amax: torch.Tensor) -> ScaleChoice:
    """``max`` method: block_amax = per-block max |w| (fp32 [rows, cin // 16])."""
    _check_weight(w)
    return ScaleChoice(block_amax=nvfp4.block_amax(w))


def search_mse(w: torch.Tensor, global_amax: torch.Tensor,
               chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> ScaleChoice:
    """126-candidate sweep minimising the block SSE (see module docstring)."""
    _check_weight(w)
    return _sweep(w, global_amax, None, chunk_elems)


def search_local_hessian(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
                         chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> ScaleChoice:
    """126-candidate sweep minimising ``dw^T H_b dw``; ``hessian`` fp32 [cin // 16, 16, 16]."""
    _check_weight(w)
    _check_hessian(hessian, w)
    return _sweep(w, global_amax, hessian.float(), chunk_elems)


def dss_pair_loss(wb: torch.Tensor, k: torch.Tensor, beta: float | torch.Tensor,
                  tables: CandidateTables, hessian: torch.Tensor) -> torch.Tensor:
    """Hessian loss of (s_d = v_k per block, quant scale fl(beta * d_k)) -> [rows, nb]."""
    v = tables.v[k]  # [rows, nb]
    d_q = beta * tables.decode[k]
    code = nvfp4.e2m1_code_magnitude(wb.abs(), d_q.unsqueeze(-1))
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=wb.device)
    q = (grid[code.long()] * v.unsqueeze(-1)) * tables.global_scale
    return block_loss(_signed(wb.abs() - q, wb), hessian)


def search_dss(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
               betas: torch.Tensor | None = None,
               chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> ScaleChoice:
    """Decoupled scale search under the local-Hessian loss (see module docstring)."""
    coupled = search_local_hessian(w, global_amax, hessian, chunk_elems)
    betas = default_betas() if betas is None else betas.float()
    tables = CandidateTables(global_amax, w.device)
    hessian = hessian.float()
    best_loss = coupled.loss.clone()
    best_k = coupled.candidate.clone()
    best_beta = torch.ones_like(best_loss)
    for start, wb in _row_chunks(w, chunk_elems):
        rows = slice(start, start + wb.shape[0])
        k_star = coupled.candidate[rows]
        loss_c, k_c, beta_c = best_loss[rows], best_k[rows], best_beta[rows]
        for offset in (-1, 0, 1):
            k = (k_star + offset).clamp(0, NUM_FP8_CANDIDATES - 1)
            for beta in betas.tolist():
                loss = dss_pair_loss(wb, k, beta, tables, hessian)
                better = loss < loss_c
                loss_c = torch.where(better, loss, loss_c)
                k_c = torch.where(better, k, k_c)
                beta_c = torch.where(better, torch.full_like(beta_c, beta), beta_c)
        best_loss[rows], best_k[rows], best_beta[rows] = loss_c, k_c, beta_c
    return ScaleChoice(block_amax=nvfp4.candidate_block_amax(best_k, global_amax),
                       candidate=best_k, dss_beta=best_beta, loss=best_loss)
