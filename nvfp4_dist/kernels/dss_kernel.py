"""Triton DSS search: decoupled scales under the local-Hessian loss, from the coupled optimum.

A program takes ``BLK_R`` rows of one cin-block b (all share ``H_b``) and tries, per row,
``k* - 1, k*, k* + 1`` (k* the sweep's choice) times the beta grid in the spec's order, keeping a
strict improvement over the coupled optimum. For a stored scale value ``s = fl(v_k S)`` and quant
scale ``q = fl(beta s)`` the codes give signed E2M1 values ``e`` and the loss

    (w - s e)^T H (w - s e) = w^T H w + s * sum_i e_i (s (H e)_i - 2 (H w)_i)

``w^T H w`` and ``H w`` are computed once per tile (``H w`` from exact splits of w and H on the
tensor cores); per candidate only ``H e`` is new, and ``e`` (at most 2 significant bits) is exact
in bf16, so three bf16 MMAs against the exact split of H give it to fp32 rounding. The expanded
form rounds relative to ``|w|^T |H| |w|`` rather than to the loss itself: a few ulps of that
scale, well inside ``HESSIAN_REL_TOL`` (see :mod:`.hessian_kernel`), and two fp32 operations per
element instead of five.

bf16 weights (``PAIRS``) take the codes two elements per instruction (:mod:`.tl_bf16x2`). The
pairs are built from the weight as it comes out of an identity MMA, i.e. in the registers of the
MMA accumulator, which hold the same elements as the next MMA's register operand: the code chain
then feeds the tensor cores without a trip through shared memory, and ``e`` comes back in the
accumulator's layout from a product with the identity. The element-wise chain (fp32, fp16 and
misaligned bf16 weights) selects the same ``e``, so both give the same bits (tested).

The coupled optimum is evaluated once more in this kernel's form, and a try must beat both that
and the sweep's loss: a beta whose codes are the coupled ones (the same quantized weight) cannot
win by the two forms' rounding. On an H200 at 8192x4096 bf16 the kernel takes 1.82 ms for 1 + 3 x 20
tries per block (the former element-wise loss with the operand through shared memory: 2.26 ms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_bf16x2 import FAST_Q_LIMIT, magnitude_and_sign, pair_chain, pairs_fit, scaled_thresholds
from .hessian_kernel import stacked_view
from .tl_nvfp4 import split3, weight_times_hessian

BLK_R = 64  # rows per program (fixed: a row's reduction order follows the tile layout)
NUM_WARPS = 4


@triton.jit
def _codes_fp32(w, q):
    """Signed e2m1 values of ``w [B, 16]`` (fp32) for quant scales ``q [B]``: the spec's chain."""
    a = tl.abs(w)
    d = q[:, None]
    e = tl.where(a > 0.25 * d, 0.5, 0.0)
    e = tl.where(a >= 0.75 * d, 1.0, e)
    e = tl.where(a > 1.25 * d, 1.5, e)
    e = tl.where(a >= 1.75 * d, 2.0, e)
    e = tl.where(a > 2.5 * d, 3.0, e)
    e = tl.where(a >= 3.5 * d, 4.0, e)
    e = tl.where(a > 5.0 * d, 6.0, e)
    return tl.where(w < 0, -e, e)


@triton.jit
def _codes_pairs(wa, ws, q, BLK_R: tl.constexpr, BF16_DOT: tl.constexpr, FULL_RANGE: tl.constexpr,
                 PTX: tl.constexpr):
    """The same values from bf16 pairs (magnitudes ``wa``, signs ``ws``, ``[B, 8]`` int32) as a
    ``[B, 16]`` tensor-core operand (bf16; fp32 where the dots are fp32). Element 2j is the low
    half of pair j."""
    t0, t1, t2, t3, t4, t5, t6 = scaled_thresholds(q[:, None], FULL_RANGE, PTX)
    # the values of codes 1..7: 0.5, 1, 1.5, 2, 3, 4, 6 as bf16 bits, in both halves
    pairs = pair_chain(wa, ws, t0, t1, t2, t3, t4, t5, t6, 0x3F003F00, 0x3F803F80, 0x3FC03FC0, 0x40004000,
                       0x40404040, 0x40804080, 0x40C040C0, PTX)
    if BF16_DOT:
        e = tl.join(pairs.to(tl.int16).to(tl.bfloat16, bitcast=True),
                    (pairs >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True))
    else:  # a bf16 is the top half of its fp32
        e = tl.join((pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True))
    return tl.reshape(e, [BLK_R, 16])


@triton.jit
def _dot(x, y, acc, BF16_DOT: tl.constexpr):
    """``acc + x @ y`` for operands exact in bf16: bf16 tensor cores, else fp32 IEEE products."""
    if BF16_DOT:
        return tl.dot(x, y, acc)
    return tl.dot(x, y, acc, input_precision="ieee")


@triton.jit
def _loss(e, c0, hw2, s, h1, h2, h3, eye, BF16_DOT: tl.constexpr, e_acc=None):
    """``c0 + s * sum(e * (s H e + hw2))`` per row: the loss of signed e2m1 values ``e`` (the MMA
    operand) at stored scale values ``s [B]``, with ``c0 = w^T H w`` and ``hw2 = -2 H w``.
    ``e_acc``: the same values in fp32 in the accumulator's layout, when the caller has them."""
    he = _dot(e, h1, _dot(e, h2, _dot(e, h3, tl.zeros(hw2.shape, tl.float32), BF16_DOT), BF16_DOT), BF16_DOT)
    if e_acc is None:
        # e in the accumulator's layout: its product with the identity (one non-zero term per
        # entry). On an H200 this beat unpacking the operand's bf16 pairs (8 more operations).
        e_acc = _dot(e, eye, tl.zeros(hw2.shape, tl.float32), BF16_DOT)
    return c0 + s * tl.sum(e_acc * (s[:, None] * he + hw2), axis=1)


@triton.jit
def _try(q, s, wa, ws, wf, c0, hw2, h1, h2, h3, eye, BLK_R: tl.constexpr, BF16_DOT: tl.constexpr,
         PAIRS: tl.constexpr, FULL_RANGE: tl.constexpr, PTX: tl.constexpr):
    """The loss of quant scales ``q [B]`` at stored scale values ``s [B]``: codes from the bf16
    pairs (``wa``, ``ws``) or from the fp32 weight ``wf`` in the accumulator's layout."""
    if PAIRS:
        return _loss(_codes_pairs(wa, ws, q, BLK_R, BF16_DOT, FULL_RANGE, PTX), c0, hw2, s, h1, h2, h3, eye, BF16_DOT)
    e = _codes_fp32(wf, q)
    return _loss(e.to(eye.dtype), c0, hw2, s, h1, h2, h3, eye, BF16_DOT, e)


@triton.jit
def _try_betas(betas_ptr, best, best_i, first_i, s, n_betas, wa, ws, wf, c0, hw2, h1, h2, h3, eye,
               BLK_R: tl.constexpr, BF16_DOT: tl.constexpr, PAIRS: tl.constexpr, FULL_RANGE: tl.constexpr,
               PTX: tl.constexpr):
    """The beta grid at stored scale values ``s [B]``: ``(best, best_i)`` updated in grid order,
    the winner's index counted from ``first_i``."""
    # one beta per step: two per step (independent evaluations in flight) measured 1% slower
    for j in range(0, n_betas):
        loss = _try(tl.load(betas_ptr + j) * s, s, wa, ws, wf, c0, hw2, h1, h2, h3, eye, BLK_R, BF16_DOT, PAIRS,
                    FULL_RANGE, PTX)
        better = loss < best  # strict: the incumbent and earlier pairs win ties
        best = tl.where(better, loss, best)
        best_i = tl.where(better, first_i + j, best_i)
    return best, best_i


@triton.jit
def _dss_search(w_ptr, h_ptr, s_ptr, v_ptr, betas_ptr, k_ptr, loss_ptr, beta_ptr, stride_row, stride_expert, rows,
                nb, n_betas, beta_max, q_limit, BLK_R: tl.constexpr, BF16_DOT: tl.constexpr, PAIRS: tl.constexpr,
                PTX: tl.constexpr):
    """In place: (k, loss) hold the coupled optimum on entry, the DSS choice on exit. Axis 2 of
    the grid names the expert of stacked experts (its own weight, Hessians, scale, outputs)."""
    b = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    w_ptr += e * stride_expert
    h_ptr += e * nb * 256
    s_ptr += e
    k_ptr += e * rows * nb
    loss_ptr += e * rows * nb
    beta_ptr += e * rows * nb
    r = tl.program_id(0).to(tl.int64) * BLK_R + tl.arange(0, BLK_R)
    rmask = r < rows
    c = tl.arange(0, 16)
    w = tl.load(w_ptr + r[:, None] * stride_row + b * 16 + c[None, :], mask=rmask[:, None], other=0)
    h = tl.load(h_ptr + b.to(tl.int64) * 256 + c[:, None] * 16 + c[None, :])
    h1, h2, h3 = split3(h)
    wf = w.to(tl.float32)
    hw = weight_times_hessian(wf, h1, h2, h3, BF16_DOT)
    eye = tl.where(c[:, None] == c[None, :], 1.0, 0.0)
    if BF16_DOT:  # the operands as the tensor cores take them (exact)
        h1, h2, h3, eye = h1.to(tl.bfloat16), h2.to(tl.bfloat16), h3.to(tl.bfloat16), eye.to(tl.bfloat16)
    if PAIRS:
        # w through the identity: the same values, in the registers of the MMA accumulator
        wf = _dot(w.to(eye.dtype), eye, tl.zeros([BLK_R, 16], tl.float32), BF16_DOT)
        bits = (wf.to(tl.int32, bitcast=True) >> 16) & 65535
        lo, hi = tl.split(tl.reshape(bits, [BLK_R, 8, 2]))
        wa, ws = magnitude_and_sign(lo | (hi << 16), PTX)
    else:
        # w exactly, in the accumulator's layout: its three bf16 parts through the identity (the
        # sums of disjoint bit ranges are exact); the fp32 chain then runs there too
        w1, w2, w3 = split3(wf)
        wf = _dot(w1.to(eye.dtype), eye, _dot(w2.to(eye.dtype), eye, _dot(w3.to(eye.dtype), eye,
                                                                          tl.zeros([BLK_R, 16], tl.float32),
                                                                          BF16_DOT), BF16_DOT), BF16_DOT)
        wa, ws = 0, 0
    c0 = tl.sum(wf * hw, axis=1)  # w^T H w
    hw2 = -2.0 * hw
    S = tl.load(s_ptr)
    # every quant scale fl(beta fl(v S)) below the fast thresholds' limit: all real weights
    fast = (beta_max * 448.0) * S < q_limit
    out = r * nb + b
    k_star = tl.load(k_ptr + out, mask=rmask, other=0)
    coupled = tl.load(loss_ptr + out, mask=rmask, other=0.0)
    # The bar to beat: the coupled optimum's loss in this kernel's form as well as the sweep's, so
    # that a beta whose codes are the coupled ones (the same quantized weight, the same loss in
    # this form) never wins by the two forms' rounding, and DSS never ends above the sweep.
    s = tl.load(v_ptr + k_star) * S
    best = tl.minimum(_try(s, s, wa, ws, wf, c0, hw2, h1, h2, h3, eye, BLK_R, BF16_DOT, PAIRS, True, PTX), coupled)
    # the winner as one index, offset * n_betas + j (-1: the coupled optimum): one select per try
    best_i = tl.zeros([BLK_R], tl.int32) - 1
    for offset in tl.static_range(3):
        k = tl.minimum(tl.maximum(k_star + (offset - 1), 0), 125)
        s = tl.load(v_ptr + k) * S  # the stored scale's value
        if fast or not PAIRS:
            best, best_i = _try_betas(betas_ptr, best, best_i, offset * n_betas, s, n_betas, wa, ws, wf, c0, hw2,
                                      h1, h2, h3, eye, BLK_R, BF16_DOT, PAIRS, False, PTX)
        else:
            best, best_i = _try_betas(betas_ptr, best, best_i, offset * n_betas, s, n_betas, wa, ws, wf, c0, hw2,
                                      h1, h2, h3, eye, BLK_R, BF16_DOT, PAIRS, True, PTX)
    offset = tl.where(best_i < 0, 1, best_i // n_betas)
    best_k = tl.minimum(tl.maximum(k_star + (offset - 1), 0), 125)
    best_beta = tl.where(best_i < 0, 1.0, tl.load(betas_ptr + best_i % n_betas, mask=best_i >= 0, other=1.0))
    tl.store(k_ptr + out, best_k, mask=rmask)
    tl.store(loss_ptr + out, tl.where(best_i < 0, coupled, best), mask=rmask)
    tl.store(beta_ptr + out, best_beta, mask=rmask)


_GRIDS: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _grid_on(device: torch.device, betas: tuple[float, ...]) -> torch.Tensor:
    """The beta grid in fp32 on ``device``, cached by value: a copy from pageable host memory
    would wait for the work queued before it (the sweep) and leave the GPU idle until launch."""
    key = (betas, device)
    if key not in _GRIDS:
        if len(_GRIDS) >= 64:
            _GRIDS.clear()
        _GRIDS[key] = torch.tensor(betas, dtype=torch.float32, device=device)
    return _GRIDS[key]


def launch_dss_search(w: torch.Tensor, hessian: torch.Tensor, global_scale: torch.Tensor,
                      values: torch.Tensor, betas: torch.Tensor, k: torch.Tensor, loss: torch.Tensor,
                      blk_r: int = BLK_R, num_warps: int = NUM_WARPS,
                      fast_q_limit: float = FAST_Q_LIMIT.value) -> torch.Tensor:
    """DSS from the coupled ``(k, loss)`` (updated in place); returns beta fp32 ``[rows, cin // 16]``.

    ``hessian`` fp32 contiguous ``[cin // 16, 16, 16]``; ``global_scale`` fp32 ``[1]``;
    ``values`` the E4M3 values; ``betas`` the grid tried, in order (positive, on the CPU;
    ``search_dss`` leaves 1.0 out). bf16 weights whose quant scales can reach ``fast_q_limit``
    (at most :data:`.tl_bf16x2.FAST_Q_LIMIT`: global amaxes near the fp32 maximum) take the
    full-range thresholds; the tests set 0 to run them on any weight. Stacked experts ``w [E,
    rows, cin]`` take ``[E, cin // 16, 16, 16]`` Hessians, ``[E]`` global scales and ``(k, loss)``
    of ``[E, rows, cin // 16]``: one launch, each expert's results the bits of its own call.
    """
    w, experts, stride_expert = stacked_view(w)
    rows, cin = w.shape[-2:]
    nb = cin // 16
    grid = tuple(float(x) for x in betas.detach().float().cpu().reshape(-1).tolist())
    if not (rows and nb and grid and experts):
        return torch.ones(*w.shape[:-1], nb, dtype=torch.float32, device=w.device)
    beta = torch.empty(*w.shape[:-1], nb, dtype=torch.float32, device=w.device)  # every entry is written
    # num_stages=1: the scalar beta loads stay plain loads (pipelined through shared memory they
    # cost a barrier per step: 4% on an H200)
    _dss_search[(triton.cdiv(rows, blk_r), nb, experts)](
        w_ptr=w, h_ptr=hessian, s_ptr=global_scale, v_ptr=values, betas_ptr=_grid_on(w.device, grid),
        k_ptr=k, loss_ptr=loss, beta_ptr=beta,
        stride_row=w.stride(-2), stride_expert=stride_expert, rows=rows, nb=nb, n_betas=len(grid),
        beta_max=max(grid), q_limit=min(fast_q_limit, FAST_Q_LIMIT.value),
        BLK_R=blk_r, BF16_DOT=w.is_cuda, PAIRS=pairs_fit(w) and w.stride(-2) % 2 == 0, PTX=w.is_cuda,
        num_warps=num_warps, num_stages=1)
    return beta
