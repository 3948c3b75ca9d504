"""Triton fake-quant and export cast/pack: one pass over the weight, bit-exact with numerics.

Both take static block amaxes (and optional DSS betas) and compute, per 16-element block, the
stored FP8 scale ``e4m3(clamp(block_amax / 6 / S, 2^-9, 448))`` with IEEE divisions and an
explicit round-to-nearest-even, then the spec's codes. Fake-quant writes
``fl(fl(e2m1 * v) * S)`` with w's sign in w's dtype (bf16 rounding done explicitly, see
:mod:`.tl_nvfp4`); cast/pack writes two codes per byte (element 2j in the low nibble) and the
E4M3 scale bytes. Memory-bound: fake-quant (the forward's hot path) takes 2-D tiles of whole
row segments on a fixed grid; cast/pack (export, once per weight) tiles ``[BLK, 16]`` blocks.
bf16 and fp16 weights are fake-quantized two elements per instruction by :mod:`.bf16_fake_quant`;
the element-wise kernel here serves fp32 and 16-bit views whose pairs are not 4-byte aligned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bf16_fake_quant
from .tl_bf16x2 import pairs_fit
from .tl_nvfp4 import bf16_round, code_values, e2m1_codes, e2m1_pick, e4m3_bits, load_blocks, static_block_scales


@triton.jit
def _block_tile(w_ptr, bamax_ptr, beta_ptr, g_ptr, stride_row, nb, n_blocks, HAS_BETA: tl.constexpr,
                BLK: tl.constexpr, CODES: tl.constexpr):
    n, mask, w = load_blocks(w_ptr, stride_row, nb, n_blocks, BLK)
    # per-block values as [BLK, 1]: they broadcast against the tile in its own layout
    n1, mask1 = n.to(tl.int64)[:, None], mask[:, None]
    v, d, S = static_block_scales(bamax_ptr, beta_ptr, g_ptr, n1, n1, 0, 1, mask1, HAS_BETA, False, True, CODES)
    return n1, mask1, w, v, d, S


@triton.jit
def _fake_quant(w_ptr, bamax_ptr, beta_ptr, g_ptr, out_ptr, stride_row, rows, cin, g_rows, HAS_BETA: tl.constexpr,
                GROUP_G: tl.constexpr, ROUND_BF16: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                EVEN: tl.constexpr, CODES: tl.constexpr):
    """One ``[ROWS, COLS]`` tile of the weight, seen as ``ROWS * COLS / 16`` blocks of 16.

    A 2-D grid over row and column tiles: block indices come from the program ids and
    constexpr shifts, with no per-block integer division (which cost ~15% here), and wide
    rows keep every load and store a long contiguous run. ``EVEN``: the tiles cover the
    weight exactly, so no access needs a mask. ``GROUP_G``: one global amax per ``g_rows`` rows.
    """
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    src = w_ptr + r.to(tl.int64)[:, None] * stride_row + c[None, :]
    if EVEN:
        w = tl.load(src)
    else:
        mask = (r < rows)[:, None] & (c < cin)[None, :]
        w = tl.load(src, mask=mask, other=0.0)
    w = tl.reshape(w.to(tl.float32), [ROWS * COLS // 16, 16])
    per_row: tl.constexpr = COLS // 16
    i = tl.arange(0, ROWS * COLS // 16)
    block_row = tl.program_id(0) * ROWS + i // per_row
    block_col = tl.program_id(1) * per_row + i % per_row
    nb = cin // 16
    block = (block_row.to(tl.int64) * nb + block_col)[:, None]
    bmask = ((block_row < rows) & (block_col < nb))[:, None]
    v, d, S = static_block_scales(bamax_ptr, beta_ptr, g_ptr, block, block_row[:, None], rows, g_rows, bmask,
                                  HAS_BETA, GROUP_G, not EVEN, CODES)
    q1, q2, q3, q4, q5, q6, q7 = code_values(v, S)
    q = e2m1_pick(tl.abs(w), d, q1, q2, q3, q4, q5, q6, q7)
    if ROUND_BF16:
        q = bf16_round(q)  # the interpreter's cast truncates; compiled casts round to nearest even
    # w's sign set as a bit, so that a zero code of a negative w gives -0.0 like the reference
    # (compiled float negation may be 0 - q, which loses the sign of zero)
    q = (q.to(tl.int32, bitcast=True) | tl.where(w < 0, -2147483648, 0)).to(tl.float32, bitcast=True)
    q = tl.reshape(q, [ROWS, COLS]).to(out_ptr.dtype.element_ty)
    dst = out_ptr + r.to(tl.int64)[:, None] * cin + c[None, :]
    if EVEN:
        tl.store(dst, q)
    else:
        tl.store(dst, q, mask=mask)


@triton.jit
def _quantize_pack(w_ptr, bamax_ptr, beta_ptr, g_ptr, packed_ptr, scale_ptr, stride_row, nb, n_blocks,
                   HAS_BETA: tl.constexpr, BLK: tl.constexpr, CODES: tl.constexpr):
    n, mask, w, v, d, S = _block_tile(w_ptr, bamax_ptr, beta_ptr, g_ptr, stride_row, nb, n_blocks,
                                      HAS_BETA, BLK, CODES)
    code = e2m1_codes(tl.abs(w), d) | tl.where(w < 0, 8, 0)
    lo, hi = tl.split(tl.reshape(code, [BLK, 8, 2]))
    out = packed_ptr + n * 8 + tl.arange(0, 8)[None, :]
    tl.store(out, (lo | (hi << 4)).to(tl.uint8), mask=mask)
    tl.store(scale_ptr + n, e4m3_bits(v).to(tl.uint8), mask=mask)


# Export packs each weight once: a fixed tile (autotuning compiled six variants on first use).
PACK_BLK = 256
PACK_WARPS = 4
INTERPRETER_BLK = 4096
MAX_BLOCKS = 2**31 - 4096  # block indices are int32 in-kernel


def _launch_pack(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                 dss_beta: torch.Tensor | None, packed: torch.Tensor, scale: torch.Tensor) -> None:
    rows, cin = w.shape
    nb = cin // 16
    n_blocks = rows * nb
    if n_blocks == 0:
        return
    if n_blocks > MAX_BLOCKS:
        raise ValueError(f"weight shard {tuple(w.shape)} has {n_blocks} NVFP4 blocks, more than the "
                         f"{MAX_BLOCKS} one launch handles: split the rows into smaller shards")
    beta = dss_beta if dss_beta is not None else block_amax  # placeholder pointer, never read
    blk = PACK_BLK if w.is_cuda else min(INTERPRETER_BLK, triton.next_power_of_2(n_blocks))
    _quantize_pack[(triton.cdiv(n_blocks, blk),)](
        w_ptr=w, bamax_ptr=block_amax, beta_ptr=beta, g_ptr=global_amax, packed_ptr=packed, scale_ptr=scale,
        stride_row=w.stride(0), nb=nb, n_blocks=n_blocks,
        HAS_BETA=dss_beta is not None, BLK=blk, CODES=block_amax.dtype == torch.uint8, num_warps=PACK_WARPS,
        enable_fp_fusion=False)


# Fake-quant tiles: 4096 elements per program and 4 warps, the best of a sweep on an H200 for the
# element-wise kernel (rows x cols 2..16 x 256..2048, 4/8 warps, persistent or not: within 10% of
# each other) and within 3% of the best on an H100 for the bf16-pair kernel (1..16 x 256..1024,
# 2..8 warps); the interpreter takes 64x larger tiles (it pays per program).
FQ_TILE_ELEMS = 4096
FQ_MAX_COLS = 1024
INTERPRETER_FQ_TILE_ELEMS = 2**18


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _fq_tile(rows: int, cin: int, interpreted: bool) -> tuple[int, int]:
    # plain integer arithmetic: triton.next_power_of_2 / cdiv cost microseconds per call from
    # Python, and fake-quant runs once per weight per forward
    cols = min(FQ_MAX_COLS, _next_pow2(cin))
    elems = INTERPRETER_FQ_TILE_ELEMS if interpreted else FQ_TILE_ELEMS
    return max(1, min(elems // cols, _next_pow2(rows))), cols


def launch_fake_quant(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                      dss_beta: torch.Tensor | None, g_rows: int = 0) -> torch.Tensor:
    """Quantize-dequantize ``w [rows, cin]`` (unit stride along cin) -> contiguous, w's dtype.

    ``block_amax`` (and ``dss_beta``) fp32 contiguous ``[rows, cin // 16]``, or both uint8: the
    scales' E4M3 bytes and beta codes the quantizer state holds (numerics/compact.py); ``global_amax``
    fp32, one element, or with ``g_rows > 0`` one per ``g_rows`` rows. bf16 and fp16 weights go
    through :mod:`.bf16_fake_quant`'s pair kernel, fp32 (and misaligned views) element-wise.
    """
    rows, cin = w.shape
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    if out.numel() == 0:
        return out
    tile_rows, cols = _fq_tile(rows, cin, not w.is_cuda)
    beta = dss_beta if dss_beta is not None else block_amax  # placeholder pointer, never read
    grid = (-(-rows // tile_rows), -(-cin // cols))
    # the two kernels share their runtime arguments and most constexprs and launch options
    args = dict(w_ptr=w, bamax_ptr=block_amax, beta_ptr=beta, g_ptr=global_amax, out_ptr=out,
                stride_row=w.stride(0), rows=rows, cin=cin, g_rows=max(g_rows, 1))
    flags = dict(HAS_BETA=dss_beta is not None, GROUP_G=g_rows > 0, ROWS=tile_rows, COLS=cols,
                 EVEN=rows % tile_rows == 0 and cin % cols == 0, CODES=block_amax.dtype == torch.uint8,
                 num_warps=4, enable_fp_fusion=False)
    if pairs_fit(w, (torch.bfloat16, torch.float16)):
        bf16_fake_quant.fake_quant_pairs[grid](**args, PTX=w.is_cuda, F16=w.dtype == torch.float16, **flags)
    else:
        _fake_quant[grid](**args, ROUND_BF16=w.dtype == torch.bfloat16 and not w.is_cuda, **flags)
    return out


def launch_quantize_pack(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                         dss_beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [rows, cin // 2], scale float8_e4m3fn [rows, cin // 16])`` of ``w``."""
    rows, cin = w.shape
    packed = torch.empty(rows, cin // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, cin // 16, dtype=torch.float8_e4m3fn, device=w.device)
    _launch_pack(w, block_amax, global_amax, dss_beta, packed, scale.view(torch.uint8))
    return packed, scale
