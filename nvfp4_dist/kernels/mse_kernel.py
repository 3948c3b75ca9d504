"""Triton MSE sweep: the 126-candidate block search, bit-exact with the reference.

One program takes ``BLK`` NVFP4 blocks, one row of a ``[BLK, 16]`` tile each. Per block it
evaluates the start candidate k0, bisects the exact window ``[k_lo, k_hi]`` (:mod:`.windows`),
and sweeps the window, each block at its own candidate ``k_lo + i``; the loop runs to the
widest window of the tile. The loss is ``tree16`` of ``(|w| - q)^2`` in the reference's order,
and the kernel launches with FMA contraction off, so every loss equals the reference's bits and
the chosen candidate is the reference's on every block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hessian_kernel import stacked_view
from .tl_nvfp4 import load_blocks_by_thread, mse_search


@triton.jit
def _mse_sweep(w_ptr, s_ptr, v_ptr, k_ptr, loss_ptr, stride_row, stride_expert, nb, n_blocks, BLK: tl.constexpr):
    # stacked experts: axis 1 names the expert (its weight, global scale and outputs)
    e = tl.program_id(1).to(tl.int64)
    w_ptr += e * stride_expert
    s_ptr += e
    k_ptr += e * n_blocks
    loss_ptr += e * n_blocks
    n, mask, w = load_blocks_by_thread(w_ptr, stride_row, nb, n_blocks, BLK)
    best_k, best = mse_search(w, mask, v_ptr, tl.load(s_ptr))
    tl.store(k_ptr + n, best_k, mask=mask)
    tl.store(loss_ptr + n, best, mask=mask)


# A fixed tile on CUDA: every tile gives the same bits, and autotuning compiled and timed six
# variants per size class on first use, ~25 s of an 8B model's first quantize() on an H200.
# One block per thread in narrow tiles keeps the tile's widest window close to the mean one:
# 32 blocks x 1 warp was the fastest of seven tiles on an H200 for every 8B-model shape, 3-15%
# ahead (`benchmarks/kernel_breakdown.py --mse-tiles`).
CUDA_WARPS = 1
CUDA_BLK = 32 * CUDA_WARPS
INTERPRETER_BLK = 1024  # the interpreter pays per program: few, large tiles


def launch_mse_sweep(w: torch.Tensor, global_scale: torch.Tensor, values: torch.Tensor,
                     blk: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (int32) and losses (fp32), each ``[rows, cin // 16]``, of ``w [rows, cin]``.

    ``w`` has unit stride along cin (any row stride); ``global_scale``: fp32 ``[1]``;
    ``values``: the 126 E4M3 values (fp32) on ``w``'s device. ``blk`` / ``num_warps`` fix the
    tile (tests, benchmarks). Stacked experts ``w [E, rows, cin]`` with ``[E]`` global scales give
    ``[E, rows, cin // 16]`` in one launch (bit-exact per block whatever the tiling).
    """
    w, experts, stride_expert = stacked_view(w)
    rows, cin = w.shape[-2:]
    nb = cin // 16
    n_blocks = rows * nb
    k = torch.empty(*w.shape[:-1], nb, dtype=torch.int32, device=w.device)
    loss = torch.empty(*w.shape[:-1], nb, dtype=torch.float32, device=w.device)
    if n_blocks == 0 or experts == 0:
        return k, loss
    if blk is None:
        blk = CUDA_BLK if w.is_cuda else min(INTERPRETER_BLK, triton.next_power_of_2(n_blocks))
    warps = num_warps or max(1, min(8, blk // 32))  # one block per thread
    _mse_sweep[(triton.cdiv(n_blocks, blk), experts)](
        w_ptr=w, s_ptr=global_scale, v_ptr=values, k_ptr=k, loss_ptr=loss,
        stride_row=w.stride(-2), stride_expert=stride_expert, nb=nb, n_blocks=n_blocks,
        BLK=blk, num_warps=warps, enable_fp_fusion=False)
    return k, loss
