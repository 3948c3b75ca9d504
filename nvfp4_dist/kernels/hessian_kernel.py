"""Triton local-Hessian sweep: ``dw^T H_b dw`` on tensor cores (DSS: :mod:`.dss_kernel`).

A program takes ``BLK_R`` rows of one cin-block b (all share ``H_b``). ``H_b w`` is computed
once per tile; per candidate only ``H_b (e2m1 * v)`` is needed, whose operands are exact in
bf16 (see :func:`.tl_nvfp4.hessian_loss`), so three bf16 MMAs against an exact split of H give
the products exactly and the loss agrees with the reference to fp32 rounding: the chosen loss
is within ``HESSIAN_REL_TOL`` of the best, relative to ``|w|^T |H| |w|`` (the tests' criterion).

The sweep evaluates per row the start candidate, then its exact window (Schur-floor bounds,
:mod:`.windows`). The tile shape is fixed (never autotuned): the row reduction's order follows
the layout, and a fixed layout keeps every row's result independent of the shard it sits in.

bf16 weights (``PAIRS``) take the codes two elements per instruction (:mod:`.tl_bf16x2`): the
magnitudes and signs are paired once per tile, and each candidate costs seven bf16x2
comparisons and bit-selects per pair instead of seven fp32 compares and selects per element.
The selected ``e2m1 * v`` are the same values, so the results are the same bits as the fp32
chain's (tested). The loop takes two candidates per step, whose evaluations are independent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_bf16x2 import both_halves, magnitude_and_sign, pair_chain, pairs_fit
from .tl_nvfp4 import (candidate_window, hessian_loss, loss_of_values, split3, start_candidate, take_better,
                       weight_times_hessian)

# Relative tolerance of the chosen Hessian loss, in units of |w|^T |H| |w| of the block: the
# kernel's error is ~u (2^-24) times that scale per operation (the cancellation in
# H w - S H (e v) is bounded by it), a few dozen operations deep; 2^-16 leaves a wide margin
# while still catching any wrong code, scale or candidate (those move the loss by ~1e-3).
HESSIAN_REL_TOL = 2.0**-16

BLK_R = 64  # rows per program (fixed: see module docstring)
NUM_WARPS = 4


# _tile returns nine values and _pairs_loss takes m1..m7 rather than (wa, ws) / (h1, h2, h3) /
# (m1..m7) tuples: Triton 3.2, which pyproject.toml accepts, takes no tuple arguments or nested
# tuple returns (see :mod:`.tl_nvfp4`).
@triton.jit
def _tile(w_ptr, h_ptr, stride_row, rows, pid, b, BLK_R: tl.constexpr, BF16_DOT: tl.constexpr, PAIRS: tl.constexpr,
          PTX: tl.constexpr):
    r = pid.to(tl.int64) * BLK_R + tl.arange(0, BLK_R)
    rmask = r < rows
    c = tl.arange(0, 16)
    w = tl.load(w_ptr + r[:, None] * stride_row + b * 16 + c[None, :], mask=rmask[:, None], other=0)
    if PAIRS:  # the same 16 bf16 values as 8 int32 pairs: their magnitudes and signs
        wp = w.to(tl.int16, bitcast=True).to(tl.int32) & 65535
        lo, hi = tl.split(tl.reshape(wp, [BLK_R, 8, 2]))
        wa, ws = magnitude_and_sign(lo | (hi << 16), PTX)
    else:
        wa, ws = 0, 0
    w = w.to(tl.float32)
    h = tl.load(h_ptr + b.to(tl.int64) * 256 + c[:, None] * 16 + c[None, :])
    h1, h2, h3 = split3(h)
    return r, rmask, w, wa, ws, h1, h2, h3, weight_times_hessian(w, h1, h2, h3, BF16_DOT)


@triton.jit
def _pair_values(v):
    """``e2m1 * v`` of codes 1..7 per row (exact in bf16: at most 6 significant bits), each in
    both halves of an int32: the values the pair chain selects."""
    v = v[:, None]
    return (both_halves(0.5 * v, False), both_halves(v, False), both_halves(1.5 * v, False),
            both_halves(2.0 * v, False), both_halves(3.0 * v, False), both_halves(4.0 * v, False),
            both_halves(6.0 * v, False))


@triton.jit
def _pairs_loss(wa, ws, w, hw, h1, h2, h3, m1, m2, m3, m4, m5, m6, m7, d_q, S, BF16_DOT: tl.constexpr,
                PTX: tl.constexpr):
    """:func:`.tl_nvfp4.hessian_loss` for bf16 weights: the codes of two elements per
    instruction (:mod:`.tl_bf16x2`), the same ``e2m1 * v`` values, the same loss."""
    d = d_q[:, None]
    pairs = pair_chain(wa, ws, both_halves(0.25 * d, False), both_halves(0.75 * d, True),
                       both_halves(1.25 * d, False), both_halves(1.75 * d, True), both_halves(2.5 * d, False),
                       both_halves(3.5 * d, True), both_halves(5.0 * d, False), m1, m2, m3, m4, m5, m6, m7, PTX)
    # element 2j is the low half of pair j; a bf16 is the top half of its fp32
    m = tl.join((pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True))
    m = tl.reshape(m, [w.shape[0], 16])
    if BF16_DOT:
        mb = m.to(tl.bfloat16)
    else:
        mb = m
    return loss_of_values(w, hw, h1, h2, h3, m, mb, S, BF16_DOT)


@triton.jit
def _hessian_sweep(w_ptr, h_ptr, kappa_ptr, s_ptr, v_ptr, k_ptr, loss_ptr, stride_row, stride_expert, rows, nb,
                   BLK_R: tl.constexpr, BF16_DOT: tl.constexpr, PAIRS: tl.constexpr, PTX: tl.constexpr):
    b = tl.program_id(1)
    # stacked experts: axis 2 names the expert, whose weight, Hessians, Schur floors, global
    # scale and outputs start at its own offsets; its rows are tiled as in a call of its own
    e = tl.program_id(2).to(tl.int64)
    w_ptr += e * stride_expert
    h_ptr += e * nb * 256
    kappa_ptr += e * nb * 16
    s_ptr += e
    k_ptr += e * rows * nb
    loss_ptr += e * rows * nb
    r, rmask, w, wa, ws, h1, h2, h3, hw = _tile(w_ptr, h_ptr, stride_row, rows, tl.program_id(0), b, BLK_R,
                                            BF16_DOT, PAIRS, PTX)
    a = tl.abs(w)
    S = tl.load(s_ptr)
    kappa = tl.load(kappa_ptr + b * 16 + tl.arange(0, 16))[None, :]
    amax = tl.max(a, axis=1)
    k0 = start_candidate(v_ptr, amax, S)
    v0 = tl.load(v_ptr + k0)
    if PAIRS:
        m1, m2, m3, m4, m5, m6, m7 = _pair_values(v0)
        best = _pairs_loss(wa, ws, w, hw, h1, h2, h3, m1, m2, m3, m4, m5, m6, m7, v0 * S, S, BF16_DOT, PTX)
    else:
        best = hessian_loss(w, a, hw, h1, h2, h3, v0, v0 * S, S, BF16_DOT)
    best_k = k0
    k_lo, k_hi = candidate_window(v_ptr, a, amax, k0, best, kappa, S, True)
    width = tl.max(tl.where(rmask, k_hi - k_lo + 1, 0))
    # two candidates per step (two independent evaluations in flight); past k_hi nothing counts
    for i in range(0, width, 2):
        ka = k_lo + i
        kb = ka + 1
        va = tl.load(v_ptr + tl.minimum(ka, 125))
        vb = tl.load(v_ptr + tl.minimum(kb, 125))
        if PAIRS:
            m1, m2, m3, m4, m5, m6, m7 = _pair_values(va)
            loss_a = _pairs_loss(wa, ws, w, hw, h1, h2, h3, m1, m2, m3, m4, m5, m6, m7, va * S, S, BF16_DOT, PTX)
            m1, m2, m3, m4, m5, m6, m7 = _pair_values(vb)
            loss_b = _pairs_loss(wa, ws, w, hw, h1, h2, h3, m1, m2, m3, m4, m5, m6, m7, vb * S, S, BF16_DOT, PTX)
        else:
            loss_a = hessian_loss(w, a, hw, h1, h2, h3, va, va * S, S, BF16_DOT)
            loss_b = hessian_loss(w, a, hw, h1, h2, h3, vb, vb * S, S, BF16_DOT)
        best, best_k = take_better(ka, loss_a, k_hi, k0, best, best_k)
        best, best_k = take_better(kb, loss_b, k_hi, k0, best, best_k)
    out = r * nb + b
    tl.store(k_ptr + out, best_k, mask=rmask)
    tl.store(loss_ptr + out, best, mask=rmask)


def _grid(rows: int, nb: int, blk_r: int, experts: int = 1):
    return (triton.cdiv(rows, blk_r), nb, experts)


def stacked_view(w: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(w, experts, expert stride)`` of a weight ``[rows, cin]`` (one expert, stride 0) or of
    stacked experts ``[E, rows, cin]`` (unit stride along cin), the layout every sweep takes."""
    if w.dim() == 2:
        return w, 1, 0
    return w, w.shape[0], w.stride(0)


def launch_hessian_sweep(w: torch.Tensor, hessian: torch.Tensor, kappa: torch.Tensor,
                         global_scale: torch.Tensor, values: torch.Tensor,
                         blk_r: int = BLK_R, num_warps: int = NUM_WARPS):
    """Candidates (int32) and losses (fp32) ``[rows, cin // 16]`` of ``w [rows, cin]``.

    ``hessian`` fp32 contiguous ``[cin // 16, 16, 16]``; ``kappa`` fp32 ``[cin // 16, 16]``
    (:func:`.windows.schur_floor`); ``global_scale`` fp32 ``[1]``; ``values`` the E4M3 values.
    Stacked experts ``w [E, rows, cin]`` take ``[E, cin // 16, 16, 16]`` Hessians, ``[E, cin //
    16, 16]`` floors and ``[E]`` global scales, and give ``[E, rows, cin // 16]``: one launch,
    each expert's results the bits of its own call.
    """
    w, experts, stride_expert = stacked_view(w)
    rows, cin = w.shape[-2:]
    nb = cin // 16
    k = torch.empty(*w.shape[:-1], nb, dtype=torch.int32, device=w.device)
    loss = torch.empty(*w.shape[:-1], nb, dtype=torch.float32, device=w.device)
    if rows and nb and experts:
        _hessian_sweep[_grid(rows, nb, blk_r, experts)](
            w_ptr=w, h_ptr=hessian, kappa_ptr=kappa, s_ptr=global_scale, v_ptr=values, k_ptr=k, loss_ptr=loss,
            stride_row=w.stride(-2), stride_expert=stride_expert, rows=rows, nb=nb,
            BLK_R=blk_r, BF16_DOT=w.is_cuda, PAIRS=pairs_fit(w) and w.stride(-2) % 2 == 0, PTX=w.is_cuda,
            num_warps=num_warps)
    return k, loss
