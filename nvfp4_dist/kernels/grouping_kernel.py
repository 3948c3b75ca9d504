"""Triton grouping of MoE routing choices by expert, in one launch (the spec is
:func:`.reference.grouped_choices`).

The observers of fused experts and their W4A4 forward group the ``T * k`` routing choices
(``top_k_index [T, k]``, flat position ``p = token * k + slot``) by expert, stably: expert e's
positions ascending, experts in order, indices outside ``[0, E)`` (expert-parallel sentinels) last.
In torch that is a stable sort of the experts and a search for the offsets, ~15 launches with
their allocations and memsets: on the GPU their cost is the host's (microseconds each, 32k
elements), and in a forward the host already has little to spare. Here one program per expert
(and one for the sentinels) reads all choices twice: first counting the choices of experts
below its own (its offset), then writing its own positions in order, each tile's ranks from a
prefix sum of its hits. Integer work only, so the results equal the reference exactly.

Cost: ``E + 1`` programs each read the ``T * k`` indices twice (from L2 after the first
program): ~66 MB of loads at 128 experts and 32768 choices, a few microseconds on an H200.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 4096  # choices per step (the interpreter pays per step: few, large tiles)


@triton.jit
def _group_choices(idx_ptr, pos_ptr, expert_ptr, off_ptr, n, n_experts, divisor, TILE: tl.constexpr):
    e = tl.program_id(0)  # n_experts: the program of the sentinels
    below = tl.zeros([], dtype=tl.int64)
    for start in range(0, n, TILE):
        p = start + tl.arange(0, TILE)
        live = p < n
        key = tl.load(idx_ptr + p, mask=live, other=0)
        key = tl.where((key >= 0) & (key < n_experts), key, n_experts)
        below += tl.sum((live & (key < e)).to(tl.int64), axis=0)
    tl.store(off_ptr + e, below)
    base = below
    for start in range(0, n, TILE):
        p = start + tl.arange(0, TILE)
        live = p < n
        key = tl.load(idx_ptr + p, mask=live, other=0)
        key = tl.where((key >= 0) & (key < n_experts), key, n_experts)
        hit = live & (key == e)
        dst = base + tl.cumsum(hit.to(tl.int64), axis=0) - 1  # ascending p within the expert
        tl.store(pos_ptr + dst, (p // divisor).to(tl.int64), mask=hit)
        tl.store(expert_ptr + dst, tl.full([TILE], 0, tl.int64) + e, mask=hit)
        base += tl.sum(hit.to(tl.int64), axis=0)


def launch_grouped_choices(top_k_index: torch.Tensor, n_experts: int, divisor: int = 1):
    """``(positions [T * k], offsets [E + 1], row_expert [T * k])`` (int64) of ``top_k_index
    [T, k]`` (integer) grouped by expert; ``positions`` holds ``p // divisor`` of each choice's
    flat position ``p`` (``divisor=k``: its token)."""
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    if n >= 2**31:
        raise ValueError(f"{n} routing choices: more than the kernel's 32-bit positions")
    # one allocation for the three outputs (every element is written below)
    out = torch.empty(2 * n + n_experts + 1, dtype=torch.int64, device=flat.device)
    positions, row_expert, offsets = out[:n], out[n:2 * n], out[2 * n:]
    _group_choices[(n_experts + 1,)](flat, positions, row_expert, offsets, n, n_experts, divisor, TILE=TILE,
                                     num_warps=4)
    return positions, offsets, row_expert
