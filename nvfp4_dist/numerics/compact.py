"""Compact forms of the quantizer state a calibration keeps per 16-element block: one byte each.

A block's state is what the fake-quant and the export read of it, nothing more:

* the stored FP8 scale ``v = e4m3(clamp(block_amax / 6 / S, 2^-9, 448))`` as its E4M3 bits
  (uint8, 0x01..0x7E; the byte the export writes as ``weight_scale``). Its fp32 block amax is
  ``fl(c_k * g)`` with ``k = bits - 1`` (``c_k = v_k / 448``, the sweep candidate of that value),
  which is bit for bit what a sweep (MSE, local Hessian, DSS, GPTQ) chose, and whose scale is
  ``v`` again (FORMATS: the candidate's FP8 round trip is exact). A max-calibrated block's raw
  ``max |w|`` is not kept: only its scale ever mattered. Compared with an fp32 amax this is a
  quarter of the memory (3.1% of a bf16 weight instead of 12.5%) and of the checkpoint bytes.
* DSS's beta as a code in hundredths (uint8 ``round(100 * beta)``): the grids DSS searches are
  multiples of 0.01 (:func:`check_beta_grid`), and ``fl32(code / 100)`` (one IEEE division) is
  the fp32 grid value exactly for every code 1..255 (checked exhaustively in the tests).

Code 0 is never a valid state in either form (scales are clamped to >= 2^-9; betas are > 0):
decoding it gives NaN, which is how a placeholder that was never loaded shows.
"""

from __future__ import annotations

import torch

from .constants import NUM_FP8_CANDIDATES
from .nvfp4 import candidate_block_amax, scale_fp8

BETA_UNIT = 100  # codes per 1.0 of beta
BETA_MAX_CODE = 255
UNSET = 0  # the code of a placeholder never filled (a NaN when decoded)


def scale_bits(block_amax: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """E4M3 bits (uint8) of the stored scales of ``block_amax`` under ``global_amax``
    (broadcast from the left: one value, or one per leading index, e.g. ``[E]`` for ``[E, rows, nb]``)."""
    return scale_fp8(block_amax, _leading(global_amax, block_amax)).view(torch.uint8)


def block_amax_of_bits(bits: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """fp32 block amaxes ``fl(c_k * g)`` of stored scale bits (``k = bits - 1``, the candidate of
    that value): the value a sweep chose, whose scale is ``bits`` again; NaN for a code that is
    no positive finite scale."""
    valid = (bits >= 1) & (bits <= NUM_FP8_CANDIDATES)  # bytes 1..126 hold the values in order
    amax = candidate_block_amax(torch.where(valid, bits.long() - 1, 0), _leading(global_amax, bits))
    return amax.masked_fill(~valid, float("nan"))


def beta_codes(beta: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``round(100 * beta)`` of DSS betas on a grid of hundredths."""
    return torch.round(beta.float() * BETA_UNIT).to(torch.uint8)


def beta_of_codes(codes: torch.Tensor) -> torch.Tensor:
    """fp32 betas ``fl32(code / 100)`` (NaN for code 0: never a beta)."""
    beta = codes.float() / torch.tensor(float(BETA_UNIT), device=codes.device)  # IEEE division
    return beta.masked_fill(codes == UNSET, float("nan"))


def check_beta_grid(lo: float, hi: float, step: float) -> str | None:
    """Why the DSS grid ``lo..hi`` step ``step`` cannot be stored as codes, or None when it can
    (every value a multiple of 0.01 in (0, 2.55])."""
    for value in beta_grid_values(lo, hi, step):
        code = round(value * BETA_UNIT)
        if abs(value * BETA_UNIT - code) > 1e-6 or not 0 < code <= BETA_MAX_CODE:
            return (f"value {value} is not a multiple of 0.01 in (0, 2.55] (betas are kept as "
                    "hundredths, one byte per block)")
    return None


def beta_grid_values(lo: float, hi: float, step: float) -> list[float]:
    """The DSS beta grid ``round(lo + i * step, 10)`` for i = 0.. while the value is <= hi (Python
    floats; the search takes them as fp32)."""
    n = int(round((hi - lo) / step)) + 1
    return [round(lo + i * step, 10) for i in range(n)]


def _leading(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``g`` with trailing unit axes so that its leading axes broadcast against ``like``."""
    return g.reshape(*g.shape, *([1] * (like.dim() - g.dim())))
