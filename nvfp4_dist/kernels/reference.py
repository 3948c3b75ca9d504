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
                        block's normalised input Hessian and ``(H_b dw)_j`` is the sum of
                        ``fl(dw_i * H_ij)`` for i = 0..15, left to right (elementwise ops, so a
                        row's loss never depends on the rows computed with it; a BLAS product's
                        order follows its shape). The Triton kernels use tensor cores in another
                        order: their Hessian losses agree to fp32 rounding, not bit for bit.
  * ``max``:            no search: ``block_amax = max |w_b|``.
Selection: the smallest loss; ties go to the smallest k (the first candidate).

DSS (decoupled scales, local-Hessian objective only): starting from the coupled optimum k*
(whose loss is the incumbent, beta = 1), try ``s_d = v_k`` for k in (k*-1, k*, k*+1) (clipped to
0..125) and each beta of the grid in order, with quant scale ``fl(beta * d_k)`` for the codes and
``v_k`` for dequantization; a pair replaces the incumbent only with a strictly lower loss, so
DSS never ends above the coupled search.

Speed (same results): each block first evaluates one candidate and then only the window of
candidates that exact lower bounds cannot rule out (:mod:`.windows`); the plain 126-candidate
sweep stays as ``_full_sweep`` / ``_full_dss``, the slow paths the tests compare against.

Chunking: rows are processed in chunks of ``chunk_elems`` elements; results for a row never
depend on which other rows share its chunk, so a shard's result equals the same rows' result
inside the full weight (the basis of TP invariance).

Export: :func:`quantize_pack` gives the stored form (packed codes and FP8 scales) of given block
amaxes, the twin of the Triton cast/pack kernel.
"""

from __future__ import annotations

import torch

from ..numerics import nvfp4
from ..numerics.compact import beta_grid_values
from ..numerics.constants import BLOCK_SIZE, NUM_FP8_CANDIDATES
from .candidates import CandidateTables, block_loss, candidate_loss, dss_errors, tree16
from .types import ScaleChoice
from .windows import pruned_dss, schur_floor, windowed_sweep

DEFAULT_CHUNK_ELEMS = 1 << 21
# The Hessian loss makes [.., 16] temporaries per (H dw) term: smaller chunks keep them in cache.
HESSIAN_CHUNK_ELEMS = 1 << 19

__all__ = ["CandidateTables", "DEFAULT_CHUNK_ELEMS", "beta_grid", "block_loss", "candidate_loss",
           "default_betas", "quantize_pack", "search_dss", "search_local_hessian", "search_max",
           "search_mse", "tree16"]


def default_betas() -> torch.Tensor:
    """DSS beta grid [0.5, 1.5] step 0.05 (21 values, includes 1.0), fp32."""
    return beta_grid(0.5, 1.5, 0.05)


def beta_grid(lo: float, hi: float, step: float) -> torch.Tensor:
    """:func:`~nvfp4_dist.numerics.compact.beta_grid_values` as fp32."""
    return torch.tensor(beta_grid_values(lo, hi, step), dtype=torch.float32)


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


def _choice(global_amax, best_k, best_loss, beta=None) -> ScaleChoice:
    return ScaleChoice(block_amax=nvfp4.candidate_block_amax(best_k, global_amax),
                       candidate=best_k, dss_beta=beta, loss=best_loss)


def _windowed(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor | None,
              chunk_elems: int) -> ScaleChoice:
    tables = CandidateTables(global_amax, w.device)
    nb = w.shape[1] // BLOCK_SIZE
    kappa = None if hessian is None else schur_floor(hessian)
    best_loss = torch.empty(w.shape[0], nb, dtype=torch.float32, device=w.device)
    best_k = torch.empty(w.shape[0], nb, dtype=torch.int64, device=w.device)
    for start, wb in _row_chunks(w, chunk_elems):
        rows = wb.shape[0]
        column = torch.arange(nb, device=w.device).repeat(rows)
        k, loss = windowed_sweep(wb.reshape(-1, BLOCK_SIZE), tables, hessian, kappa, column)
        best_k[start:start + rows] = k.view(rows, nb)
        best_loss[start:start + rows] = loss.view(rows, nb)
    return _choice(global_amax, best_k, best_loss)


def _full_sweep(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor | None,
                chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> ScaleChoice:
    """The plain 126-candidate sweep (slow; the definition the windowed search must equal)."""
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
    return _choice(global_amax, best_k, best_loss)


def search_max(w: torch.Tensor, global_amax: torch.Tensor) -> ScaleChoice:
    """``max`` method: block_amax = per-block max |w| (fp32 [rows, cin // 16])."""
    _check_weight(w)
    return ScaleChoice(block_amax=nvfp4.block_amax(w))


def search_mse(w: torch.Tensor, global_amax: torch.Tensor,
               chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> ScaleChoice:
    """126-candidate sweep minimising the block SSE (see module docstring)."""
    _check_weight(w)
    return _windowed(w, global_amax, None, chunk_elems)


def search_local_hessian(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
                         chunk_elems: int = HESSIAN_CHUNK_ELEMS) -> ScaleChoice:
    """126-candidate sweep minimising ``dw^T H_b dw``; ``hessian`` fp32 [cin // 16, 16, 16]."""
    _check_weight(w)
    _check_hessian(hessian, w)
    return _windowed(w, global_amax, hessian.float(), chunk_elems)


def dss_pair_loss(wb: torch.Tensor, k: torch.Tensor, beta: float | torch.Tensor,
                  tables: CandidateTables, hessian: torch.Tensor) -> torch.Tensor:
    """Hessian loss of (s_d = v_k per block, quant scale fl(beta * d_k)) -> [rows, nb]."""
    return block_loss(dss_errors(wb, k, beta, tables), hessian)


def _full_dss(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
              betas: torch.Tensor | None = None, chunk_elems: int = HESSIAN_CHUNK_ELEMS) -> ScaleChoice:
    """DSS over every block and pair (slow; the definition :func:`search_dss` must equal)."""
    coupled = _full_sweep(w, global_amax, hessian.float(), chunk_elems)
    betas = default_betas() if betas is None else betas.float()
    tables = CandidateTables(global_amax, w.device)
    hessian = hessian.float()
    best_loss, best_k = coupled.loss.clone(), coupled.candidate.clone()
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
    return _choice(global_amax, best_k, best_loss, best_beta)


def search_dss(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
               betas: torch.Tensor | None = None,
               chunk_elems: int = HESSIAN_CHUNK_ELEMS) -> ScaleChoice:
    """Decoupled scale search under the local-Hessian loss (see module docstring)."""
    coupled = search_local_hessian(w, global_amax, hessian, chunk_elems)
    betas = (default_betas() if betas is None else betas.float()).tolist()
    tables = CandidateTables(global_amax, w.device)
    hessian = hessian.float()
    kappa = schur_floor(hessian)
    nb = w.shape[1] // BLOCK_SIZE
    best_loss, best_k = coupled.loss.clone(), coupled.candidate.clone()
    best_beta = torch.ones_like(best_loss)
    for start, wb in _row_chunks(w, chunk_elems):
        rows = slice(start, start + wb.shape[0])
        column = torch.arange(nb, device=w.device).repeat(wb.shape[0])
        k, beta, loss = pruned_dss(wb.reshape(-1, BLOCK_SIZE), coupled.candidate[rows].reshape(-1),
                                   coupled.loss[rows].reshape(-1), betas, tables, hessian, kappa, column)
        best_k[rows], best_beta[rows], best_loss[rows] = (t.view(wb.shape[:2]) for t in (k, beta, loss))
    return _choice(global_amax, best_k, best_loss, best_beta)


def quantize_pack(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                  dss_beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored NVFP4 form of ``w [rows, cin]`` with block amaxes ``[rows, cin // 16]``.

    Returns ``(packed uint8 [rows, cin // 2], scale float8_e4m3fn [rows, cin // 16])``: codes
    against the quant scale (``fl(beta * d)`` under DSS), element 2j in the low nibble.
    """
    _check_weight(w)
    scale = nvfp4.scale_fp8(block_amax, global_amax)
    codes = nvfp4.encode(w, scale, nvfp4.global_scale(global_amax), dss_beta)
    return nvfp4.pack(codes), scale


# --- Stacked experts: the searches of E same-shaped weights at once, and their statistics ---

def _stacked(search, w: torch.Tensor, global_amax: torch.Tensor, *per_expert) -> ScaleChoice:
    """``search`` of each expert ``w[e]`` with its own global amax (and Hessian), stacked."""
    if w.dim() != 3:
        raise ValueError(f"expected stacked experts [E, rows, cin], got shape {tuple(w.shape)}")
    g = global_amax.reshape(-1)
    if g.numel() != w.shape[0]:
        raise ValueError(f"global_amax has {g.numel()} values for {w.shape[0]} experts")
    choices = [search(w[e], g[e], *(a[e] for a in per_expert)) for e in range(w.shape[0])]

    def stack(field):
        values = [getattr(c, field) for c in choices]
        return None if not values or values[0] is None else torch.stack(values)
    return ScaleChoice(block_amax=stack("block_amax") if choices else
                       torch.empty(0, w.shape[1], w.shape[2] // BLOCK_SIZE, device=w.device),
                       candidate=stack("candidate"), dss_beta=stack("dss_beta"), loss=stack("loss"))


def search_mse_stacked(w: torch.Tensor, global_amax: torch.Tensor) -> ScaleChoice:
    """:func:`search_mse` of each expert of ``w [E, rows, cin]`` with ``global_amax [E]``: the
    definition the one-launch kernels must equal (results ``[E, rows, cin // 16]``)."""
    return _stacked(search_mse, w, global_amax)


def search_local_hessian_stacked(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor) -> ScaleChoice:
    """:func:`search_local_hessian` per expert; ``hessian [E, cin // 16, 16, 16]`` (expert e's rows
    take ``hessian[e]``)."""
    return _stacked(search_local_hessian, w, global_amax, hessian)


def search_dss_stacked(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
                       betas: torch.Tensor | None = None) -> ScaleChoice:
    """:func:`search_dss` per expert (one beta grid for all)."""
    return _stacked(lambda we, ge, he: search_dss(we, ge, he, betas), w, global_amax, hessian)


def nan_as_inf(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every NaN as +inf, infinities kept: the observers' amax rule (a NaN input must
    stay non-finite through the running maxima; ``nan_to_num``'s defaults would turn +inf into
    the largest finite value)."""
    return t.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def expert_block_hessians(x: torch.Tensor, offsets: torch.Tensor, hessian_sum: torch.Tensor,
                          amax: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
    """In place: ``hessian_sum[e] += sum_t x_t,b x_t,b^T`` over expert e's rows of ``x``; when
    ``amax`` (fp32 ``[E]``, values >= 0) is given, also ``amax[e] = max(amax[e], max |x|)`` over
    expert e's fp32-rounded values, a NaN counting as +inf (rows outside every expert's range
    are not read).

    ``x [N, cin]``: the rows of all experts grouped by expert, expert e's at ``offsets[e]:
    offsets[e + 1]`` (``offsets`` int64 ``[E + 1]``), or with ``rows`` (int64 ``[N]``) the token
    rows that position p reads as ``x[rows[p]]``; ``hessian_sum`` float64 ``[E, cin // 16,
    16, 16]``. Each element is rounded to fp32, each product is taken exactly in float64 and the
    products are added one token at a time in row order onto the running sum (the order the
    Triton kernel follows, so both give the same bits; summing across calls equals one call
    over all the rows).
    """
    n_experts, nb = hessian_sum.shape[:2]
    counts = (offsets[1:] - offsets[:-1]).cpu()
    longest = int(counts.max()) if n_experts else 0
    if longest == 0:
        return
    # position t of expert e's rows, zero-padded to the longest: a zero row adds +0.0 everywhere
    start = offsets[:-1].to(x.device)
    pos = torch.arange(longest, device=x.device)
    valid = pos[None, :] < counts.to(x.device)[:, None]
    index = torch.where(valid, start[:, None] + pos[None, :], 0)
    if rows is not None:
        index = rows.to(x.device)[index]
    padded = x[index.reshape(-1)].float().double().reshape(n_experts, longest, nb, BLOCK_SIZE)
    padded = torch.where(valid[:, :, None, None], padded, 0.0)  # (not a product: inf * 0 is NaN)
    if amax is not None:  # a max is exact in any order; the padding's +0.0 changes nothing (amax >= 0)
        top = nan_as_inf(padded.abs()).amax(dim=(1, 2, 3)).float()
        torch.maximum(amax, top.to(amax.device), out=amax)
    for t in range(longest):
        xt = padded[:, t]
        hessian_sum += xt[..., :, None] * xt[..., None, :]


def grouped_choices(top_k_index: torch.Tensor, n_experts: int, divisor: int = 1):
    """``(positions [T * k], offsets [E + 1], row_expert [T * k])`` (int64): the routing choices
    of ``top_k_index [T, k]`` grouped by expert with one stable sort, so expert e's flat
    positions ``p = token * k + slot`` ascending at ``offsets[e]:offsets[e + 1]`` (the order of
    ``(top_k_index == e).nonzero()``), ``row_expert`` naming each one's expert; indices outside
    ``[0, E)`` (expert-parallel sentinels) sort last with ``row_expert = E``. ``positions`` holds
    ``p // divisor`` (``divisor=k``: the token). Nothing waits for the device."""
    flat = top_k_index.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    row_expert, order = torch.sort(flat, stable=True)
    # offsets[e] = the number of choices of experts below e, found in the sorted experts (on CUDA
    # a bincount would wait for the device: it reads the largest value to size its output)
    offsets = torch.searchsorted(row_expert, torch.arange(n_experts + 1, device=flat.device))
    return (order if divisor == 1 else order // divisor), offsets, row_expert


# Tokens per chunk of the torch path's fp32 block Hessians (a ~chunk * cin fp32 temporary).
DENSE_TOKEN_CHUNK = 4096
# Tokens per sub-sum of the fp32 block Hessians (see block_grams): cuBLAS runs the token (K)
# loop of each [16, n] @ [n, 16] product serially in one small tile, so nb products over 4096
# tokens keep few SMs busy (137 us for 4096 x 4096 on an H200); c interleaved sub-sums make
# nb * c products of n / c tokens each.
SUBSUM_TOKENS = 256


def dense_input_stats(x: torch.Tensor, amax: torch.Tensor, hessian_sum: torch.Tensor | None = None) -> None:
    """In place: ``amax`` (0-d fp32, value >= 0) = max(amax, max |x|) over the fp32-rounded
    values of ``x [N, cin]`` (a NaN counting as +inf, as in :func:`expert_block_hessians`) and,
    when given, ``hessian_sum`` (fp32 ``[cin // 16, 16, 16]``) += the batch's block Hessians
    ``sum_t x_tb x_tb^T``, formed in fp32 (:func:`block_grams` of each chunk of
    ``DENSE_TOKEN_CHUNK`` tokens) and added onto the running sum. The fp32 additions' order is
    the implementation's (the Triton kernel's is the tensor cores'): every implementation gives
    the exact Gram blocks where the partial sums are exact in fp32, and a block column's sums
    never depend on the other columns."""
    if x.shape[0] == 0:
        return
    # max |x| in one reduction (no |x| copy), exact in x's dtype; rounding a max to fp32 is the
    # max of the rounded values
    top = torch.linalg.vector_norm(x, float("inf")).float()
    torch.maximum(amax, nan_as_inf(top), out=amax)
    if hessian_sum is None:
        return
    for start in range(0, x.shape[0], DENSE_TOKEN_CHUNK):
        hessian_sum += block_grams(x[start:start + DENSE_TOKEN_CHUNK].float())


def block_grams(x: torch.Tensor, subsum_tokens: int = SUBSUM_TOKENS) -> torch.Tensor:
    """``sum_t x_tb x_tb^T`` ``[cin/16, 16, 16]`` of the rows ``x [n, cin]`` (fp32), in fp32.

    Order: the rows go into ``c = max(1, n // subsum_tokens)`` interleaved sub-sums (sub-sum j
    takes rows j, j + c, j + 2c, ...: a strided view of x, no copy); one batched fp32 GEMM forms
    the ``c * nb`` partial 16x16 products (cuBLAS's order within each), the ``c`` partials of a
    block are added in fp32 by one ``sum`` (torch's order), and the ``n % c`` last rows, if any,
    add one more fp32 product. fp32 accumulation throughout, like one GEMM over all the rows;
    only the rounding order differs.
    """
    n, cin = x.shape
    nb = cin // BLOCK_SIZE
    c = max(1, n // subsum_tokens)
    k = n // c
    # row kk * c + j, block b -> product j * nb + b, token kk (strides 16, c * cin, 1)
    v = x[:c * k].reshape(k, c * nb, BLOCK_SIZE).transpose(0, 1)
    out = torch.bmm(v.transpose(1, 2), v).view(c, nb, BLOCK_SIZE, BLOCK_SIZE).sum(0)
    if c * k < n:
        tail = x[c * k:].reshape(-1, nb, BLOCK_SIZE).transpose(0, 1)
        out += torch.bmm(tail.transpose(1, 2), tail)
    return out
