"""Triton implementation of the stacked-experts entries of :mod:`.dispatch`: the block-scale
searches of all E experts of one MoE projection in one launch per kernel, the per-expert
block Hessians of their inputs in one launch, and the grouping of the routing choices by expert
that feeds them in one launch.

Same results as the per-expert calls of :mod:`.triton_ops` bit for bit (the kernels tile each
expert's rows exactly as a call of its own would: grid axis ``experts``), and as
:func:`.reference.search_mse_stacked` & co. to the tolerance of the per-expert kernels.
"""

from __future__ import annotations

import torch

from ..numerics import nvfp4
from ..numerics.constants import BLOCK_SIZE, GLOBAL_SCALE_DENOM
from . import block_hessian_kernel, floor_kernel, grouping_kernel, hessian_kernel, mse_kernel
from .reference import _check_weight
from .triton_ops import _fp32, _on_device, _table, _values, sweep_then_dss
from .types import ScaleChoice


def _prepare(w: torch.Tensor, global_amax: torch.Tensor):
    """``(w, g [E], S [E])`` of stacked experts ``w [E, rows, cin]`` (unit stride along cin)."""
    if w.dim() != 3:
        raise ValueError(f"expected stacked experts [E, rows, cin], got shape {tuple(w.shape)}")
    _check_weight(w[0] if w.shape[0] else w.reshape(-1, w.shape[-1]))
    w = w.detach()
    if w.stride(-1) != 1:
        w = w.contiguous()
    g = nvfp4.clamp_global_amax(_fp32(global_amax, w.device).reshape(-1))
    if g.numel() != w.shape[0]:
        raise ValueError(f"global_amax has {g.numel()} values for {w.shape[0]} experts")
    # S = g / 2688 divided by a tensor: a correctly rounded quotient on every device
    return w, g, (g / torch.full((), GLOBAL_SCALE_DENOM, device=w.device)).contiguous()


def _hessians(w: torch.Tensor, hessian: torch.Tensor):
    nb = w.shape[-1] // BLOCK_SIZE
    if tuple(hessian.shape) != (w.shape[0], nb, BLOCK_SIZE, BLOCK_SIZE):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match stacked weight "
                         f"{tuple(w.shape)}: expected ({w.shape[0]}, {nb}, 16, 16)")
    h = _fp32(hessian, w.device)
    kappa = floor_kernel.launch_schur_floor(h.reshape(-1, BLOCK_SIZE, BLOCK_SIZE))  # per block: any E
    return h, kappa


def _choice(k: torch.Tensor, loss: torch.Tensor, g: torch.Tensor, beta=None) -> ScaleChoice:
    candidate = k.long()
    block_amax = _table("ratios", k.device)[candidate] * g[:, None, None]  # fl(c_k * g_e)
    return ScaleChoice(block_amax=block_amax, candidate=candidate, dss_beta=beta, loss=loss)


def search_mse_stacked(w: torch.Tensor, global_amax: torch.Tensor) -> ScaleChoice:
    """MSE sweep of every expert of ``w [E, rows, cin]`` (global amax ``[E]``) in one launch."""
    w, g, s = _prepare(w, global_amax)
    with _on_device(w):
        k, loss = mse_kernel.launch_mse_sweep(w, s, _values(w.device))
    return _choice(k, loss, g)


def search_local_hessian_stacked(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor) -> ScaleChoice:
    """Hessian sweep of every expert, ``hessian [E, cin // 16, 16, 16]``, in one launch."""
    w, g, s = _prepare(w, global_amax)
    with _on_device(w):
        h, kappa = _hessians(w, hessian)
        k, loss = hessian_kernel.launch_hessian_sweep(w, h, kappa, s, _values(w.device))
    return _choice(k, loss, g)


def search_dss_stacked(w: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
                       betas: torch.Tensor | None = None) -> ScaleChoice:
    """DSS on top of the Hessian sweep for every expert: two launches for all of them."""
    w, g, s = _prepare(w, global_amax)
    with _on_device(w):
        k, loss, beta = sweep_then_dss(w, *_hessians(w, hessian), s, betas)
    return _choice(k, loss, g, beta)


def expert_block_hessians(x: torch.Tensor, offsets: torch.Tensor, hessian_sum: torch.Tensor,
                          amax: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
    """:func:`.reference.expert_block_hessians` (the same bits) in one launch."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()  # the observers' rule: every input rounded to fp32
    if x.stride(-1) != 1:
        x = x.contiguous()
    if rows is not None:
        rows = rows.to(device=x.device, dtype=torch.int64).contiguous()
    with _on_device(x):
        block_hessian_kernel.launch_block_hessians(x, offsets.to(device=x.device, dtype=torch.int64).contiguous(),
                                                   hessian_sum, amax, rows=rows)


def grouped_choices(top_k_index: torch.Tensor, n_experts: int, divisor: int = 1):
    """:func:`.reference.grouped_choices` (the same integers) in one launch."""
    with _on_device(top_k_index):
        return grouping_kernel.launch_grouped_choices(top_k_index, n_experts, divisor)
