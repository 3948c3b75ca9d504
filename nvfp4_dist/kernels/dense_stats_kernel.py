"""Triton accumulation of a dense layer's input statistics in one launch: the fp32 block
Hessians of a batch added onto the running sums, and the running input amax (the spec is
:func:`.reference.dense_input_stats`).

Input ``x [N, cin]`` (bf16/fp16/fp32, unit stride along cin), running sums ``H [cin/16, 16, 16]``
fp32 and ``amax`` 0-d fp32, both updated in place: ``H[b] += sum_t x_tb x_tb^T`` and
``amax = max(amax, max |x|)``.

Layout. A program takes one 16-channel block column and every token, ``CHUNK`` tokens per step:
it loads the step's ``[CHUNK, 16]`` values, forms ``A^T A`` with one ``tl.dot`` (the tensor cores
for 16-bit inputs: the product of two bf16 or fp16 values is exact in fp32, the accumulation is
fp32; fp32 inputs take IEEE fp32 products, not TF32) and adds it to a ``[16, 16]`` fp32
accumulator (one rounded addition per entry and step). At
the end it adds the batch's block Hessian onto the running sum (one fp32 addition per entry, as
the torch path does) and merges its block column's ``max |x|`` into ``amax`` with an atomic max
(a NaN counts as +inf, as in the experts' statistics; a maximum does not depend on the order).

Order. The steps follow the tokens in order and nothing else is shared between programs, so the
result is the same on every run and a block column's sums do not depend on the other columns
(a row-parallel shard's observer gets the bits of the whole input's blocks: the tensor-parallel
bit-identity of the statistics). Within a step the order of the fp32 additions is the tensor
cores' (not IEEE round-to-nearest per addition); the steps' sums are added in order, rounded to
nearest. Where every partial sum is exact in fp32 the result is the exact Gram block, whatever
the order.

Why one launch: an observer runs inside the forward and its launches cost the forward host time
(the torch path takes six: an fp32 copy of the input, a batched product, a sum of sub-sums, the
addition, the max, the running max), and its GPU time (the fp32 copy alone writes twice the
input).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CUDA_CHUNK = 128  # tokens per step on the GPU
CUDA_WARPS = 4
INTERPRETER_CHUNK = 1024  # the interpreter pays per step: few, large ones


@triton.jit
def _dense_stats(x_ptr, h_ptr, amax_ptr, n, stride_row, CHUNK: tl.constexpr, WITH_HESSIAN: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, 16)
    t = tl.arange(0, CHUNK)
    cols = b * 16 + i
    gram = tl.zeros([16, 16], dtype=tl.float32)
    # running max |x| per position of the step's tile, reduced once after the loop
    top = tl.zeros([CHUNK, 16], dtype=tl.float32)
    for t0 in range(0, n, CHUNK):
        rows = t0 + t
        a = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :],
                    mask=(rows < n)[:, None], other=0.0)  # [CHUNK, 16]: masked tokens add +0.0
        if UPCAST:  # the interpreter's dot misreads 16-bit floats: the same exact products in fp32
            a = a.to(tl.float32)
        # each step's sum on its own, then added in IEEE fp32 (round to nearest), so the tensor
        # cores' accumulation (not round-to-nearest) spans one step's tokens only. Measured on an
        # H200 (4096 bf16 tokens): 1.1-1.2e-5 of max |H| from the exact sums, carried accumulator
        # or not, so the steps' own sums carry it (the torch path's 256-token sub-sums: 4e-7;
        # one fp32 GEMM over all tokens, session 8: 6e-6): fp32 statistics' rounding either way
        if WITH_HESSIAN:
            if IEEE:  # fp32 inputs: IEEE fp32 products (TF32 would round the inputs)
                gram += tl.dot(tl.trans(a), a, input_precision="ieee")
            else:  # bf16/fp16: exact products on the tensor cores, fp32 accumulation
                gram += tl.dot(tl.trans(a), a)
        v = tl.abs(a.to(tl.float32))
        top = tl.maximum(top, tl.where(v != v, float("inf"), v))  # NaN counts as +inf
    if WITH_HESSIAN:
        h_off = b * 256 + i[:, None] * 16 + i[None, :]
        tl.store(h_ptr + h_off, tl.load(h_ptr + h_off) + gram)
    tl.atomic_max(amax_ptr, tl.max(tl.max(top, axis=1), axis=0))  # order-independent


def launch_dense_stats(x: torch.Tensor, amax: torch.Tensor, hessian_sum: torch.Tensor | None = None,
                       chunk: int | None = None, num_warps: int | None = None) -> None:
    """``amax`` (0-d fp32, value >= 0) = max(amax, max |x|) and, when given, ``hessian_sum``
    (fp32 ``[cin/16, 16, 16]``, contiguous) += the block Hessians of ``x [N, cin]``
    (bf16/fp16/fp32, unit stride along cin). ``chunk``, ``num_warps``: tokens per step and
    warps per program."""
    n, cin = x.shape
    if n == 0 or cin == 0:
        return
    chunk = chunk or (CUDA_CHUNK if x.is_cuda else INTERPRETER_CHUNK)
    _dense_stats[(cin // 16,)](
        x_ptr=x, h_ptr=amax if hessian_sum is None else hessian_sum, amax_ptr=amax, n=n,
        stride_row=x.stride(0), CHUNK=chunk, WITH_HESSIAN=hessian_sum is not None,
        IEEE=x.dtype == torch.float32 or not x.is_cuda, UPCAST=not x.is_cuda, num_warps=num_warps or CUDA_WARPS)
