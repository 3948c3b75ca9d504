"""GPTQ's two inner-loop primitives (torch reference; the semantics any faster version must
reproduce bit for bit).

Both are elementwise fp32 in a fixed order, so a row's result never depends on the other rows
(a rank holding some rows computes them exactly as one process holding all rows does):

* :func:`sweep_block`: one 16-column NVFP4 block, column by column. Column k is rounded to the
  weight's dtype (the value the parameter will hold), quantized with the block's FP8 scale, and
  its scaled error ``e_k = (x_k - q_k) / U_kk`` updates the block's later columns
  (``x_j -= e_k * U_kj``, j > k).
* :func:`propagate`: the lazy update of the columns after a block by its 16 scaled errors,
  ``rest -= e_k * U_k,rest`` for k = 0..15 in that order (a product rounded to fp32, then a
  subtraction rounded to fp32: no fused multiply-add, no BLAS reduction).
"""

from __future__ import annotations

import torch

from ..numerics import nvfp4
from ..numerics.constants import BLOCK_SIZE, E2M1_VALUES


def quantize_column(x: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of one column ``x [rows]`` (fp32) whose elements sit in blocks
    with FP8 scale values ``scale [rows]`` (fp32): the operations of :func:`nvfp4.encode` and
    :func:`nvfp4.decode`, element by element."""
    d = scale * global_scale  # decode scale fl(v * S)
    code = nvfp4.e2m1_code_magnitude(x.abs(), d)
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    value = (grid[code.long()] * scale) * global_scale
    return torch.where(x < 0, -value, value)


def sweep_block(block: torch.Tensor, u_block: torch.Tensor, scale: torch.Tensor,
                global_scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one block in place.

    ``block [rows, 16]`` fp32 (updated: column k becomes its dtype-rounded value before it is
    quantized), ``u_block [16, 16]`` fp32 (the block's diagonal block of the upper Cholesky
    factor of H^-1), ``scale [rows]`` fp32 FP8 scale values, ``global_scale`` fp32 0-d.
    Returns ``(quant [rows, 16], err [rows, 16])``, both fp32.
    """
    rows = block.shape[0]
    quant = torch.empty(rows, BLOCK_SIZE, dtype=torch.float32, device=block.device)
    err = torch.empty(rows, BLOCK_SIZE, dtype=torch.float32, device=block.device)
    for k in range(BLOCK_SIZE):
        x = block[:, k].to(dtype).float()
        block[:, k] = x
        q = quantize_column(x, scale, global_scale)
        quant[:, k] = q
        e = (x - q) / u_block[k, k]
        err[:, k] = e
        if k + 1 < BLOCK_SIZE:
            block[:, k + 1:] -= e[:, None] * u_block[k, k + 1:][None, :]
    return quant, err


def propagate(rest: torch.Tensor, err: torch.Tensor, u_rows: torch.Tensor) -> None:
    """``rest [rows, n] -= err[:, k] * u_rows[k]`` for k = 0..15 in order, in place (fp32).
    ``err [rows, 16]``, ``u_rows [16, n]``: the block's rows of U restricted to ``rest``'s columns."""
    for k in range(BLOCK_SIZE):
        rest -= err[:, k:k + 1] * u_rows[k][None, :]
