"""Triton implementation of :mod:`.dispatch`: input checks, device placement, result assembly.

Same signatures and results as :mod:`.reference` (bit-exact for the MSE sweep, fake-quant and
cast/pack; Hessian and DSS losses to fp32 rounding, see :mod:`.hessian_kernel`). Weights may be
any ``[rows, cin]`` view with unit stride along cin (other layouts are copied once); every launch
runs on the weight's device, so shards on different GPUs of one process are safe. On CPU tensors
the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported), with fixed large tiles instead of autotuning.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..numerics import nvfp4
from ..numerics.constants import E4M3_MAX, GLOBAL_SCALE_DENOM, e4m3_positive_values
from . import (act_quant_kernel, cast_kernels, dense_stats_kernel, dss_kernel, floor_kernel, gptq_kernel,
               hessian_kernel, mse_kernel)
from .reference import _check_hessian, _check_weight, default_betas
from .types import ScaleChoice

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Cached per device: ``values``, the 126 E4M3 values, or ``ratios``, ``c_k = v_k / 448``.

    Built on the CPU: CUDA torch divides by a Python scalar as a multiplication by its rounded
    reciprocal, which is not the spec's correctly rounded quotient.
    """
    if (name, device) not in _TABLES:
        values = e4m3_positive_values()
        _TABLES[name, device] = (values if name == "values" else values / E4M3_MAX).to(device)
    return _TABLES[name, device]


def _values(device: torch.device) -> torch.Tensor:
    return _table("values", device)


def interpreted() -> bool:
    """True when these kernels run under the Triton interpreter (they then accept CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(mse_kernel._mse_sweep, InterpretedFunction)


def _on_device(w: torch.Tensor):
    """Launches go to the current device: switch to ``w``'s only when it is another one (the
    switch costs microseconds per call, a fifth of a fake-quant launch)."""
    if w.is_cuda and w.device.index != torch.cuda.current_device():
        return torch.cuda.device(w.device)
    return contextlib.nullcontext()


def _unit_stride(w: torch.Tensor) -> torch.Tensor:
    """``w`` itself when its cin stride is 1 (any row stride), else a contiguous copy."""
    return w if w.stride(-1) == 1 else w.contiguous()


def _fp32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32).contiguous()


def _block_state(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-block scale input on ``device``: uint8 codes as they are, values as fp32."""
    return t.detach().to(device).contiguous() if t.dtype == torch.uint8 else _fp32(t, device)


def _prepare(w: torch.Tensor, global_amax: torch.Tensor):
    _check_weight(w)
    w = _unit_stride(w.detach())
    g = nvfp4.clamp_global_amax(_fp32(global_amax, w.device).reshape(()))
    # S = g / 2688 divided by a tensor: a correctly rounded quotient on every device
    s = g / torch.full((), GLOBAL_SCALE_DENOM, device=w.device)
    return w, g, s.reshape(1)


def _choice(k: torch.Tensor, loss: torch.Tensor, g: torch.Tensor, beta=None) -> ScaleChoice:
    candidate = k.long()
    block_amax = _table("ratios", k.device)[candidate] * g  # fl(c_k * g), as the reference
    return ScaleChoice(block_amax=block_amax, candidate=candidate, dss_beta=beta, loss=loss)


def search_mse(w: torch.Tensor, global_amax: torch.Tensor) -> ScaleChoice:
    """126-candidate MSE sweep of ``w [rows, cin]``; equals :func:`.reference.search_mse` bit for bit."""
    w, g, s = _prepare(w, global_amax)
    with _on_device(w):
        k, loss = mse_kernel.launch_mse_sweep(w, s, _values(w.device))
    return _choice(k, loss, g)


def _hessian_inputs(w: torch.Tensor, hessian: torch.Tensor):
    _check_hessian(hessian, w)
    h = _fp32(hessian, w.device)
    # one launch on the device: a host round trip or batched GPU solvers cost about as much as
    # the sweep itself on an 8192x4096 weight
    return h, floor_kernel.launch_schur_floor(h)


def search_local_hessian(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor) -> ScaleChoice:
    """126-candidate sweep of ``dw^T H_b dw``; ``hessian`` fp32 ``[cin // 16, 16, 16]``."""
    w, g, s = _prepare(w, global_amax)
    with _on_device(w):
        h, kappa = _hessian_inputs(w, hessian)
        k, loss = hessian_kernel.launch_hessian_sweep(w, h, kappa, s, _values(w.device))
    return _choice(k, loss, g)


def search_dss(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
               betas: torch.Tensor | None = None) -> ScaleChoice:
    """Decoupled-scale search on top of the Hessian sweep (spec in :mod:`.reference`)."""
    w, g, s = _prepare(w, global_amax)
    with _on_device(w):
        k, loss, beta = sweep_then_dss(w, *_hessian_inputs(w, hessian), s, betas)
    return _choice(k, loss, g, beta)


def sweep_then_dss(w: torch.Tensor, h: torch.Tensor, kappa: torch.Tensor, s: torch.Tensor,
                   betas: torch.Tensor | None):
    """``(k, loss, beta)``: the Hessian sweep, then DSS over ``betas`` (default grid) from its
    choice; one weight or stacked experts alike (the launches take both)."""
    values = _values(w.device)
    k, loss = hessian_kernel.launch_hessian_sweep(w, h, kappa, s, values)
    betas = (default_betas() if betas is None else betas).detach().float().cpu().reshape(-1)
    # beta = 1 repeats a coupled candidate, whose loss the sweep already proved no lower than
    # the coupled optimum (evaluated, or outside the exact window): skipping it can change the
    # choice only within the fp32 rounding of the loss that the loss-exact criterion allows
    beta = dss_kernel.launch_dss_search(w, h, s, values, betas[betas != 1.0], k, loss)
    return k, loss, beta


def _static_inputs(w, block_amax, global_amax, dss_beta):
    """2-D unit-stride view of ``w [..., cin]``, its scale inputs on w's device (fp32 amaxes and
    betas, or the uint8 codes of the quantizer state as they are), and the rows per global amax:
    0 for one global amax, ``w.shape[-2]`` for one per leading index (stacked experts
    ``[E, rows, cin]`` with ``global_amax [E]``)."""
    w = w.detach()
    if w.dim() < 1 or w.shape[-1] % 16:
        raise ValueError(f"weight shape {tuple(w.shape)}: the last dimension must be a multiple of 16")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"weight dtype {w.dtype} is not one of fp32/bf16/fp16")
    w2 = _unit_stride(w.reshape(-1, w.shape[-1]))
    nb = w.shape[-1] // 16
    if dss_beta is not None and (dss_beta.dtype == torch.uint8) != (block_amax.dtype == torch.uint8):
        raise TypeError("block scales and DSS betas must both be codes (uint8) or both values (float)")
    bamax = _block_state(block_amax, w.device).reshape(-1, nb)
    if bamax.shape[0] != w2.shape[0]:
        raise ValueError(f"block_amax shape {tuple(block_amax.shape)} does not match weight "
                         f"{tuple(w.shape)}: expected {(*w.shape[:-1], nb)}")
    beta = None if dss_beta is None else _block_state(dss_beta, w.device).reshape(-1, nb)
    g = _fp32(global_amax, w.device).reshape(-1)
    g_rows = 0
    if g.numel() != 1:
        if w.dim() < 3 or g.numel() != math.prod(w.shape[:-2]):
            raise ValueError(f"global_amax shape {tuple(global_amax.shape)} does not match weight "
                             f"{tuple(w.shape)}: one value, or one per leading index {tuple(w.shape[:-2])}")
        g_rows = w.shape[-2]
    return w2, bamax, g, beta, g_rows


def fake_quant(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
               dss_beta: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``w [..., cin]`` in ``w.dtype`` (no autograd graph).

    ``global_amax``: one value, or for stacked experts ``w [E, rows, cin]`` one per expert
    (``[E]``): all experts then go in one launch.
    """
    w2, bamax, g, beta, g_rows = _static_inputs(w, block_amax, global_amax, dss_beta)
    with _on_device(w2):
        out = cast_kernels.launch_fake_quant(w2, bamax, g, beta, g_rows)
    return out.reshape(w.shape)


def quantize_pack(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                  dss_beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ``uint8 [rows, cin // 2]`` and scales ``float8_e4m3fn [rows, cin // 16]``."""
    _check_weight(w)
    w2, bamax, g, beta, _ = _static_inputs(w, block_amax, global_amax, dss_beta)  # 2-D: one global amax
    with _on_device(w2):
        return cast_kernels.launch_quantize_pack(w2, bamax, g, beta)


def gptq_sweep_block(block: torch.Tensor, u_block: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype, from_amax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.gptq_ops.sweep_block` (same arguments and bits; with ``from_amax``,
    :func:`.gptq_ops.sweep_block_from_amax`: ``scale`` the block amaxes, ``global_scale`` the
    global amax); ``block`` is updated in place (a view without unit column stride goes through
    a copy)."""
    dev = block.device
    target = block if block.stride(-1) == 1 else block.contiguous()
    u = _unit_stride(u_block.detach().to(device=dev, dtype=torch.float32))
    scale = scale.detach().to(device=dev, dtype=torch.float32).reshape(-1)  # any stride
    with _on_device(block):
        quant, err = gptq_kernel.launch_sweep_block(target, u, scale, _fp32(global_scale, dev).reshape(1), dtype,
                                                    from_amax)
    if target is not block:
        block.copy_(target)
    return quant, err


def gptq_block_step(cols: torch.Tensor, u_rows: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                    dtype: torch.dtype, search: str | None, hessian: torch.Tensor | None, kappa: torch.Tensor | None,
                    quant: torch.Tensor, err: torch.Tensor) -> None:
    """:func:`.gptq_ops.gptq_block_step` in one launch (same bits); the caller
    (:func:`.gptq_ops.gptq_block_step`) has checked that every tensor is fp32 on ``cols``'
    device with unit column stride where the kernel needs it (``kappa``: the block's Schur floors,
    computed here when not given)."""
    dev = cols.device
    g = global_amax.reshape(1)
    h = None
    if search == "local_hessian":
        h = hessian.reshape(16, 16)
        if kappa is None:
            kappa = floor_kernel.launch_schur_floor(h.reshape(1, 16, 16).contiguous())
        kappa = kappa.reshape(16)
    with _on_device(cols):
        gptq_kernel.launch_block_step(cols, u_rows, block_amax, g, _table("ratios", dev), _values(dev), h, kappa,
                                      quant, err, dtype, search)


def schur_floor(hessian: torch.Tensor) -> torch.Tensor:
    """Schur floors ``[nb, 16]`` fp32 of block Hessians ``[nb, 16, 16]`` (one launch)."""
    with _on_device(hessian):
        return floor_kernel.launch_schur_floor(_fp32(hessian, hessian.device))


def gptq_propagate(rest: torch.Tensor, err: torch.Tensor, u_rows: torch.Tensor) -> None:
    """:func:`.gptq_ops.propagate` (same arguments and bits), ``rest`` updated in place."""
    dev = rest.device
    target = rest if rest.stride(-1) == 1 else rest.contiguous()
    u = _unit_stride(u_rows.detach().to(device=dev, dtype=torch.float32))
    with _on_device(rest):
        gptq_kernel.launch_propagate(target, err.detach().to(device=dev, dtype=torch.float32), u)
    if target is not rest:
        rest.copy_(target)


def fake_quant_input(x: torch.Tensor, input_amax: torch.Tensor,
                     row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W4A4 activation fake-quant of ``x [..., K]`` (any strides; fp32/bf16/fp16) in ``x.dtype``,
    bit-exact with :func:`nvfp4_dist.numerics.nvfp4.fake_quant_input` (no autograd graph), one
    launch; ``row_scale [...]`` (x's rows) indexes per-row scales in ``input_amax [E]``."""
    x = x.detach()
    if x.dim() < 1 or x.shape[-1] % 16:
        raise ValueError(f"input shape {tuple(x.shape)}: the last dimension must be a multiple of 16")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"input dtype {x.dtype} is not one of fp32/bf16/fp16")
    x2 = _unit_stride(x.reshape(-1, x.shape[-1]))
    amax = _fp32(input_amax, x.device).reshape(-1 if row_scale is not None else 1)
    if row_scale is not None:
        if row_scale.shape != x.shape[:-1]:
            raise ValueError(f"row_scale shape {tuple(row_scale.shape)} does not match the rows of {tuple(x.shape)}")
        row_scale = row_scale.detach().to(x.device).reshape(-1).contiguous()
    with _on_device(x2):
        out = act_quant_kernel.launch_fake_quant_input(x2, amax, row_scale)
    return out.reshape(x.shape)


def dense_input_stats(x: torch.Tensor, amax: torch.Tensor, hessian_sum: torch.Tensor | None = None) -> None:
    """:func:`.reference.dense_input_stats` in one launch (the same values where the fp32 sums
    are exact; the tensor cores' order of additions otherwise)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()  # the observers' rule: every input rounded to fp32
    with _on_device(x):
        dense_stats_kernel.launch_dense_stats(_unit_stride(x), amax, hessian_sum)
