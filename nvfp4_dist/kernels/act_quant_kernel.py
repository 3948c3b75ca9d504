"""Triton W4A4 activation fake-quant: dynamic per-16 block scales under a static global scale.

One pass over the activation, bit-exact with :func:`nvfp4_dist.numerics.nvfp4.fake_quant_input`
(the spec and its formulas): per 16-element block along the last dimension the kernel takes the
block amax, the FP8 block scale ``e4m3_satfinite(fl(fl(amax / 6) * G))`` (explicit round to
nearest even, a ratio at or below 2^-10 rounding to a zero scale), the E2M1 codes by threshold
comparisons, and writes ``fl(fl(e2m1 * v) * S_in)`` with x's sign in x's dtype. Every operation is
the reference's fp32 operation (``enable_fp_fusion=False``: no multiply-add contracted to an FMA;
divisions are ``div_rn``; bf16 rounding done explicitly under the interpreter, whose cast
truncates).

Layout: a 2-D grid of ``[ROWS, COLS]`` tiles over the ``[tokens, K]`` view (unit stride along K,
any row stride), as the weight fake-quant in :mod:`.cast_kernels`: block indices come from the
program ids and constexpr shapes, and each block's amax is a reduction inside the tile, so the
activation is read once and written once (memory-bound).

Per-row scales (``PER_ROW``, fused experts): row ``r`` takes the static scale of
``input_amax[scale_idx[r]]`` (its expert's), loaded once per row of the tile and broadcast over
the row's blocks; every other operation is the same elementwise fp32 operation, so all experts'
rows quantize in one launch with the bits of one call per expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_nvfp4 import E4M3_MAX, bf16_round, code_values, e2m1_pick, e4m3_round, global_scale


@triton.jit
def _fake_quant_input(x_ptr, amax_ptr, idx_ptr, out_ptr, stride_row, rows, cin, ROUND_BF16: tl.constexpr,
                      HALF: tl.constexpr, PER_ROW: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                      EVEN: tl.constexpr):
    """One ``[ROWS, COLS]`` tile of ``x [rows, cin]`` as ``ROWS * COLS / 16`` blocks of 16.
    ``EVEN``: the tiles cover x exactly, so no access needs a mask. ``HALF``: 16-bit x.
    ``PER_ROW``: row r's input amax is ``amax_ptr[idx_ptr[r]]``, else ``amax_ptr[0]``."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    src = x_ptr + r.to(tl.int64)[:, None] * stride_row + c[None, :]
    if EVEN:
        x = tl.load(src)
    else:
        mask = (r < rows)[:, None] & (c < cin)[None, :]
        x = tl.load(src, mask=mask, other=0.0)  # masked elements fill whole blocks (cin % 16 == 0)
    # the sign from x's own bits (signbit, as the reference): the interpreter's bf16 -> fp32
    # conversion loses subnormals, whose blocks quantize to signed zeros
    if HALF:
        neg = tl.reshape(x.to(tl.int16, bitcast=True) < 0, [ROWS * COLS // 16, 16])
    else:
        neg = tl.reshape(x.to(tl.int32, bitcast=True) < 0, [ROWS * COLS // 16, 16])
    x = tl.reshape(x.to(tl.float32), [ROWS * COLS // 16, 16])
    a = tl.abs(x)
    if PER_ROW:  # each row's own S_in, one per block: [ROWS] -> [ROWS * COLS / 16]
        idx = tl.load(idx_ptr + r, mask=r < rows, other=0).to(tl.int64)
        S = global_scale(amax_ptr + idx)  # [ROWS] pointers: the same formula, row by row
        S = tl.reshape(tl.broadcast_to(S[:, None], [ROWS, COLS // 16]), [ROWS * COLS // 16])
    else:
        S = global_scale(amax_ptr)  # S_in = fl(max(input_amax, 2^-64) / 2688)
    G = tl.math.div_rn(1.0, S)
    ratio = tl.math.div_rn(tl.max(a, axis=1), 6.0) * G
    v = e4m3_round(tl.minimum(ratio, E4M3_MAX))[:, None]  # satfinite; <= 2^-10 rounds to 0
    if PER_ROW:
        S = S[:, None]  # [blocks, 1], against v
    d = v * S  # decode scale
    q1, q2, q3, q4, q5, q6, q7 = code_values(v, S)
    q = e2m1_pick(a, d, q1, q2, q3, q4, q5, q6, q7)
    if ROUND_BF16:
        q = bf16_round(q)  # the interpreter's cast truncates; compiled casts round to nearest even
    # x's sign set as a bit: a zero value of a negative x (or of -0.0) is -0.0, as in the reference
    q = (q.to(tl.int32, bitcast=True) | tl.where(neg, -2147483648, 0)).to(tl.float32, bitcast=True)
    q = tl.reshape(q, [ROWS, COLS]).to(out_ptr.dtype.element_ty)
    dst = out_ptr + r.to(tl.int64)[:, None] * cin + c[None, :]
    if EVEN:
        tl.store(dst, q)
    else:
        tl.store(dst, q, mask=mask)


# 4096 elements per program on the GPU (the weight fake-quant's tile); the interpreter pays per
# program and takes 64x larger tiles.
TILE_ELEMS = 4096
MAX_COLS = 1024
INTERPRETER_TILE_ELEMS = 2**18


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_fake_quant_input(x: torch.Tensor, input_amax: torch.Tensor,
                            row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quant of ``x [rows, cin]`` (unit stride along cin, fp32/bf16/fp16) -> contiguous, x's
    dtype; ``input_amax``: fp32 contiguous on x's device, one element, or ``[E]`` with
    ``row_scale``: contiguous int32/int64 ``[rows]`` in ``[0, E)`` (not checked: no device wait)."""
    rows, cin = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cols = min(MAX_COLS, _next_pow2(cin))
    elems = TILE_ELEMS if x.is_cuda else INTERPRETER_TILE_ELEMS
    tile_rows = max(1, min(elems // cols, _next_pow2(rows)))
    grid = (-(-rows // tile_rows), -(-cin // cols))
    _fake_quant_input[grid](
        x_ptr=x, amax_ptr=input_amax, idx_ptr=input_amax if row_scale is None else row_scale, out_ptr=out,
        stride_row=x.stride(0), rows=rows, cin=cin, ROUND_BF16=x.dtype == torch.bfloat16 and not x.is_cuda,
        HALF=x.element_size() == 2, PER_ROW=row_scale is not None, ROWS=tile_rows, COLS=cols,
        EVEN=rows % tile_rows == 0 and cin % cols == 0, num_warps=4, enable_fp_fusion=False)
    return out
