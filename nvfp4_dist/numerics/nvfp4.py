"""NVFP4 encode/decode in plain torch, on any device and for fp32/bf16/fp16 inputs.

Scale conventions (names used across the package):
  * ``global_amax`` g: max |w| over a weight and its fused group (fp32, 0-d).
  * ``global_scale`` S = g / 2688 (fp32): ModelOpt's ``weight_scale_2``.
  * ``block_amax``: per 16-element block, fp32 ``[rows, cin // 16]``.
  * ``scale_fp8`` v: the stored block scale, ``e4m3(clamp(block_amax / 6 / S, 2^-9, 448))``.
  * ``decode_scale`` d = fl(v * S): multiply an E2M1 magnitude by it to dequantize.
  * ``dss_beta`` beta: decoupled-scale ratio; codes are taken against the quant scale
    ``d_q = fl(beta * d)`` while dequantization still uses ``v`` and ``S`` (beta = 1: coupled).

Order of operations is part of the contract (the Triton kernels reproduce it bit for bit):
  * code: the number of E2M1 thresholds that |w| passes, each threshold being ``fl(t * d_q)``;
    this is round-to-nearest-even on the E2M1 grid, decided by comparisons only.
  * dequant magnitude: ``fl(fl(e2m1 * v) * S)``; ``e2m1 * v`` is exact in fp32 (<= 7 significant
    bits), so it is the single rounding of the exact product, the same number an engine gets from
    ``e2m1 * weight_scale * weight_scale_2`` evaluated left to right.
"""

from __future__ import annotations

import torch

from .constants import (
    BLOCK_SIZE,
    E2M1_THRESHOLD_INCLUSIVE,
    E2M1_THRESHOLDS,
    E2M1_VALUES,
    E4M3_MAX,
    E4M3_MIN_SCALE,
    E2M1_MAX,
    GLOBAL_SCALE_DENOM,
    MIN_GLOBAL_AMAX,
    e4m3_positive_values,
)

_SIGN_BIT = 8


def _table(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def blocks(w: torch.Tensor) -> torch.Tensor:
    """View ``[..., K]`` as ``[..., K // 16, 16]`` (K must be a multiple of 16)."""
    if w.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {BLOCK_SIZE}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)


def clamp_global_amax(global_amax: torch.Tensor) -> torch.Tensor:
    """fp32 global amax raised to ``MIN_GLOBAL_AMAX`` (all-zero weights stay well defined)."""
    return global_amax.float().clamp_min(MIN_GLOBAL_AMAX)


def _divide(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """Correctly rounded ``numerator / denominator`` on every device.

    CUDA torch divides by a Python number through its rounded reciprocal (two roundings), so
    the same weight would quantize differently on CPU and GPU; dividing by a tensor is IEEE
    division everywhere."""
    return numerator / torch.tensor(denominator, dtype=numerator.dtype, device=numerator.device)


def global_scale(global_amax: torch.Tensor) -> torch.Tensor:
    """S = g / 2688 in fp32 (ModelOpt ``weight_scale_2``); g is clamped first."""
    return _divide(clamp_global_amax(global_amax), GLOBAL_SCALE_DENOM)


def block_amax(w: torch.Tensor) -> torch.Tensor:
    """Per-block max |w|: ``[..., K]`` -> ``[..., K // 16]`` fp32."""
    return blocks(w).abs().amax(dim=-1).float()


def scale_fp8(block_amax_: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """Stored block scale: ``e4m3(clamp(block_amax / 6 / S, 2^-9, 448))``, never NaN.

    The clamp happens before the cast: a zero block gets the smallest scale (its codes are all
    zero) and nothing reaches the E4M3 NaN encoding. For ``block_amax = c_k * g`` with a sweep
    candidate ``c_k = v_k / 448`` the cast returns exactly ``v_k``.
    """
    ratio = _divide(block_amax_.float(), E2M1_MAX) / global_scale(global_amax).to(block_amax_.device)
    ratio = torch.nan_to_num(ratio, nan=E4M3_MIN_SCALE)  # NaN cannot come from validated weights
    return ratio.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def candidate_ratios(device=None) -> torch.Tensor:
    """Sweep candidates ``c_k = v_k / 448`` (fp32, shape (126,)): ``block_amax = c_k * g``."""
    return _divide(e4m3_positive_values(), E4M3_MAX).to(device)


def candidate_block_amax(index: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """``fl(c_k * g)`` for candidate indices ``index`` (any shape), fp32."""
    c = candidate_ratios(index.device)
    return c[index.long()] * clamp_global_amax(global_amax).to(index.device)


def e2m1_code_magnitude(abs_w: torch.Tensor, quant_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude codes (0..7, uint8) of ``abs_w`` against ``quant_scale`` (broadcastable).

    Nearest with ties to the even code; saturates at 6 (code 7). Decided by comparing ``abs_w``
    with ``fl(t * quant_scale)`` for each threshold t, so no division is ever rounded.
    """
    abs_w = abs_w.float()
    quant_scale = quant_scale.float()
    code = torch.zeros(abs_w.shape, dtype=torch.uint8, device=abs_w.device)
    for t, inclusive in zip(E2M1_THRESHOLDS, E2M1_THRESHOLD_INCLUSIVE):
        thr = t * quant_scale
        code += (abs_w >= thr) if inclusive else (abs_w > thr)
    return code


def encode(w: torch.Tensor, scale: torch.Tensor, global_scale_: torch.Tensor,
           dss_beta: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit codes (uint8, one per element, sign in bit 3) of ``w [..., K]``.

    ``scale``: stored FP8 block scales ``[..., K // 16]`` (float8_e4m3fn or their fp32 values);
    ``dss_beta``: optional fp32 ``[..., K // 16]`` decoupled quant-scale ratio.
    """
    wb = blocks(w.float())
    d = scale.float() * global_scale_.float()  # decode scale, fl(v * S)
    if dss_beta is not None:
        d = dss_beta.float() * d  # quant scale d_q = fl(beta * d)
    code = e2m1_code_magnitude(wb.abs(), d.unsqueeze(-1))
    code |= (wb < 0).to(torch.uint8) << 3
    return code.reshape(w.shape)


def decode(codes: torch.Tensor, scale: torch.Tensor, global_scale_: torch.Tensor) -> torch.Tensor:
    """Dequantize codes ``[..., K]`` with FP8 scales ``[..., K // 16]`` to fp32: (e2m1 * v) * S."""
    grid = _table(E2M1_VALUES, codes.device)
    mag = grid[(codes & 7).long()]
    value = blocks(mag) * scale.float().unsqueeze(-1)  # exact: <= 7 significant bits
    value = value * global_scale_.float()
    value = torch.where(blocks(codes) >= _SIGN_BIT, -value, value)
    return value.reshape(codes.shape)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: element 2j in the low nibble, 2j+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("pack needs an even last dimension")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., K // 2]`` uint8 -> ``[..., K]`` uint8 codes."""
    low = packed & 0xF
    high = (packed >> 4) & 0xF
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def fake_quant(w: torch.Tensor, block_amax_: torch.Tensor, global_amax: torch.Tensor,
               dss_beta: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize-dequantize ``w [..., K]`` with static block amaxes ``[..., K // 16]``.

    Returns ``decode(encode(w))`` cast to ``out_dtype`` (default: ``w.dtype``).
    """
    scale = scale_fp8(block_amax_, global_amax)
    s = global_scale(global_amax)
    out = decode(encode(w, scale, s, dss_beta), scale, s)
    return out.to(out_dtype or w.dtype)


def input_scale(input_amax: torch.Tensor) -> torch.Tensor:
    """Static activation scale ``act_amax / 2688`` (ModelOpt ``input_scale``)."""
    return global_scale(input_amax)


def input_global_scale(input_amax: torch.Tensor) -> torch.Tensor:
    """G = fl(1 / S_in), S_in = :func:`input_scale`: the scale an engine multiplies activation
    block amaxes by (vLLM ``modelopt_fp4``: ``1 / input_scale``)."""
    s = input_scale(input_amax)
    return torch.ones_like(s) / s  # tensor / tensor: one IEEE rounding on every device


def dynamic_scale_fp8(block_amax_: torch.Tensor, input_amax: torch.Tensor) -> torch.Tensor:
    """Activation block scale as engines compute it per token: ``e4m3_satfinite(fl(fl(amax / 6)
    * G))`` with G = :func:`input_global_scale`, round to nearest even.

    Unlike the weights' :func:`scale_fp8` there is no lower clamp: a ratio at or below 2^-10
    rounds to a zero scale (a zero or tiny block dequantizes to zeros, as in the engines'
    kernels, which then use an output scale of 0); above 448 it saturates to 448.
    """
    g = input_global_scale(input_amax).to(block_amax_.device)
    ratio = _divide(block_amax_.float(), E2M1_MAX) * g
    return ratio.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def fake_quant_input(x: torch.Tensor, input_amax: torch.Tensor,
                     row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 W4A4 activation quantize-dequantize of ``x [..., K]`` as served, in ``x.dtype``.

    Dynamic per-16-element block scales along the last dimension (per token) under the
    calibrated static global input scale ``S_in = fl(clamp(input_amax) / 2688)`` (the exported
    ModelOpt ``input_scale``; compressed-tensors stores ``input_global_scale = fl(2688 /
    input_amax)``)::

        G    = fl(1 / S_in)
        v    = e4m3_satfinite(fl(fl(block_amax / 6) * G))     (0 for blocks at or below 2^-10 / G * 6)
        d    = fl(v * S_in)                                    (decode scale)
        code = E2M1 round-to-nearest-even of |x| / d, by comparing |x| with fl(t * d)
        out  = sign(x) * fl(fl(e2m1[code] * v) * S_in)        (x's sign bit; cast to x.dtype)

    This is what vLLM's ``scaled_fp4_quant`` (``modelopt_fp4`` and compressed-tensors W4A4
    linears) computes from the exported scale: ``v`` from the block amax times the global scale,
    codes from ``x * (1 / (v / G))`` saturating at 6, and the GEMM's ``alpha`` multiplies by
    ``S_in``. Engines use approximate reciprocals there (and compressed-tensors' stored ``G`` is
    ``fl(2688 / input_amax)``, which can differ from ``fl(1 / S_in)`` by an ulp): their codes and
    scales can differ from these only for values within an ulp or two of a rounding boundary.
    Values beyond the calibrated range saturate: a block scale stops at 448, a code at 6.

    ``row_scale`` (integer, shape ``x.shape[:-1]``, values in ``[0, E)``): one static scale per
    row instead of one in all, row ``i`` quantized under ``input_amax[row_scale[i]]`` of
    ``input_amax [E]`` (fused experts: every expert's rows in one call, each under its expert's
    input scale). Every operation above is elementwise given the row's scale, so the result is
    bit for bit that of calling this function on each expert's rows with its own scale.
    """
    if row_scale is not None:  # [..., 1]: broadcast over the row's blocks
        input_amax = input_amax.reshape(-1)[row_scale.long()].unsqueeze(-1)
    xb = blocks(x)
    amax = xb.abs().amax(dim=-1).float()
    v = dynamic_scale_fp8(amax, input_amax).float()
    s = input_scale(input_amax).to(x.device)
    d = v * s
    code = e2m1_code_magnitude(xb.abs(), d.unsqueeze(-1))
    grid = _table(E2M1_VALUES, x.device)
    out = (grid[code.long()] * v.unsqueeze(-1)) * s.unsqueeze(-1)
    out = torch.where(torch.signbit(xb), -out, out)  # x's sign, -0.0 included
    return out.reshape(x.shape).to(x.dtype)
