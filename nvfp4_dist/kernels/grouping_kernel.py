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

Cost: ``E + 1`` programs each read the ``T * k`` indices twice; each program's steps run one
after the other, so the kernel is bound by their latency, not by memory: <= 57-110 us per call
on an H200 at 128 experts and 32768 choices, by tile. The torch sort and search take ~200 us
there between CUDA events, bound by the host's time for their ~15 launches (against ~60 us of
host time for this launch; their kernels alone were ~50 us in a profile). A form in two
launches (per-chunk counts, then their prefix sums and the writes) would spread the work over
chunks; the host's time was the first concern here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# choices per step and warps per program on the GPU: at 32768 choices of 128 experts on an H200
# (bench_observers.py, 2026-12-03) <= 57 us per call (the call's host time bounds that reading),
# 8192 x 8: 79, 4096 x 4: 90 (105 in a profile), 32768 x 16: 111
CUDA_TILE, CUDA_WARPS = 16384, 16
INTERPRETER_TILE = 4096  # the interpreter pays per step: few, large tiles


@triton.jit
def _experts_at(idx_ptr, p, live, n_experts):
    """The experts chosen at positions ``p`` in int32 (an index outside [0, E) becomes E, the
    sentinels' expert, before the narrowing)."""
    key = tl.load(idx_ptr + p, mask=live, other=0)
    return tl.where((key >= 0) & (key < n_experts), key, n_experts).to(tl.int32)


@triton.jit
def _group_choices(idx_ptr, pos_ptr, expert_ptr, off_ptr, n, n_experts, divisor, TILE: tl.constexpr):
    e = tl.program_id(0)  # n_experts: the program of the sentinels
    below = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, TILE):
        p = start + tl.arange(0, TILE)
        live = p < n
        key = _experts_at(idx_ptr, p, live, n_experts)
        below += tl.sum((live & (key < e)).to(tl.int32), axis=0)
    tl.store(off_ptr + e, below.to(tl.int64))
    base = below
    for start in range(0, n, TILE):
        p = start + tl.arange(0, TILE)
        live = p < n
        key = _experts_at(idx_ptr, p, live, n_experts)
        hit = live & (key == e)
        dst = base + tl.cumsum(hit.to(tl.int32), axis=0) - 1  # ascending p within the expert
        tl.store(pos_ptr + dst, (p // divisor).to(tl.int64), mask=hit)
        tl.store(expert_ptr + dst, tl.full([TILE], 0, tl.int64) + e, mask=hit)
        base += tl.sum(hit.to(tl.int32), axis=0)


def launch_grouped_choices(top_k_index: torch.Tensor, n_experts: int, divisor: int = 1,
                           tile: int | None = None, num_warps: int | None = None):
    """``(positions [T * k], offsets [E + 1], row_expert [T * k])`` (int64) of ``top_k_index
    [T, k]`` (integer) grouped by expert; ``positions`` holds ``p // divisor`` of each choice's
    flat position ``p`` (``divisor=k``: its token). ``tile`` (a power of two), ``num_warps``:
    the program's shape; any choice gives the same integers."""
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    if n >= 2**31 or n_experts >= 2**31 - 1:
        raise ValueError(f"{n} routing choices of {n_experts} experts: more than the kernel's 32-bit positions")
    # one allocation for the three outputs (every element is written below)
    out = torch.empty(2 * n + n_experts + 1, dtype=torch.int64, device=flat.device)
    positions, row_expert, offsets = out[:n], out[n:2 * n], out[2 * n:]
    tile = tile or (CUDA_TILE if flat.is_cuda else INTERPRETER_TILE)
    _group_choices[(n_experts + 1,)](flat, positions, row_expert, offsets, n, n_experts, divisor, TILE=tile,
                                     num_warps=num_warps or CUDA_WARPS)
    return positions, offsets, row_expert
