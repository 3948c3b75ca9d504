"""Which implementation runs the searches and fake-quant (see the package docstring)."""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ConfigError
from ..numerics import nvfp4
from ..numerics.compact import beta_of_codes, block_amax_of_bits
from . import reference, windows
from .types import KernelImpl, Method, ScaleChoice


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_module():
    """The Triton implementation, or None when this build has none yet for the request."""
    if not triton_available():
        return None
    try:
        from . import triton_ops  # noqa: F401  (present once the kernels are built)
    except ImportError:
        return None
    return triton_ops


def _use_triton(w: torch.Tensor, kernels: KernelImpl) -> bool:
    kernels = KernelImpl(kernels)
    if kernels is KernelImpl.TORCH:
        return False
    if kernels is KernelImpl.AUTO:
        return w.is_cuda and _triton_module() is not None
    if _triton_module() is None:
        raise ConfigError("kernels='triton' was requested but triton (or its kernels) is not importable")
    if not w.is_cuda and not _triton_module().interpreted():
        raise ConfigError("kernels='triton' on a CPU tensor needs the Triton interpreter: set "
                          "TRITON_INTERPRET=1 before triton is first imported, or use kernels='torch'")
    return True


def triton_impl(w: torch.Tensor, kernels: KernelImpl):
    """The Triton implementation module (:mod:`.triton_ops`) when ``kernels`` selects it for
    ``w`` (AUTO: CUDA tensors), else None; an explicit request that cannot be met raises."""
    return _triton_module() if _use_triton(w, kernels) else None


def search_block_scales(w: torch.Tensor, global_amax: torch.Tensor, method: Method,
                        hessian: torch.Tensor | None = None, dss_betas: torch.Tensor | None = None,
                        kernels: KernelImpl = KernelImpl.AUTO) -> ScaleChoice:
    """Search NVFP4 block scales of ``w [rows, cin]``.

    ``global_amax``: fp32 0-d, already reduced over the fused group. ``hessian``: fp32
    ``[cin // 16, 16, 16]`` (required for local_hessian). ``dss_betas``: fp32 beta grid; when
    given, DSS runs on top of the local-Hessian search.
    """
    method = Method(method)
    global_amax = global_amax.to(device=w.device, dtype=torch.float32)
    if method is Method.LOCAL_HESSIAN and hessian is None:
        raise ValueError("local_hessian search needs a hessian")
    if dss_betas is not None and method is not Method.LOCAL_HESSIAN:
        raise ValueError("DSS runs on top of the local_hessian search only")
    impl = _triton_module() if _use_triton(w, kernels) else reference
    if method is Method.MAX:
        return reference.search_max(w, global_amax)
    if method is Method.MSE:
        return impl.search_mse(w, global_amax)
    if dss_betas is not None:
        return impl.search_dss(w, global_amax, hessian.to(w.device), dss_betas)
    return impl.search_local_hessian(w, global_amax, hessian.to(w.device))


def schur_floors(hessian: torch.Tensor, kernels: KernelImpl = KernelImpl.AUTO) -> torch.Tensor:
    """Schur floors ``[nb, 16]`` fp32 of block Hessians ``[nb, 16, 16]`` (the local-Hessian
    searches' candidate pruning bounds, :func:`.windows.schur_floor`), on the Hessian's device."""
    if _use_triton(hessian, kernels):
        return _triton_module().schur_floor(hessian)
    return windows.schur_floor(hessian.float())


def quantize_pack_weight(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                         dss_beta: torch.Tensor | None = None,
                         kernels: KernelImpl = KernelImpl.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored NVFP4 form of ``w [rows, cin]``: ``(packed uint8 [rows, cin // 2], scale
    float8_e4m3fn [rows, cin // 16])``, codes against ``fl(dss_beta * d)`` when given.
    ``block_amax``/``dss_beta``: fp32 values, or the quantizer state's uint8 codes (both)."""
    if _use_triton(w, kernels):
        return _triton_module().quantize_pack(w, block_amax, global_amax, dss_beta)
    return reference.quantize_pack(w, *_state_values(block_amax, global_amax, dss_beta))


def fake_quant_weight(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                      dss_beta: torch.Tensor | None = None,
                      kernels: KernelImpl = KernelImpl.AUTO) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``w [..., cin]`` with static scales, in ``w.dtype``.

    ``global_amax``: one value, or for stacked experts ``w [E, rows, cin]`` one per expert.
    ``block_amax``/``dss_beta``: fp32 values, or the uint8 codes the quantizer state holds (both
    codes: :mod:`nvfp4_dist.numerics.compact`), which the kernels read as they are.
    """
    if _use_triton(w, kernels):
        return _triton_module().fake_quant(w, block_amax, global_amax, dss_beta)
    block_amax, global_amax, dss_beta = _state_values(block_amax, global_amax, dss_beta)
    if global_amax.numel() > 1 and w.dim() == 3:  # the reference takes one global amax per call
        return torch.stack([nvfp4.fake_quant(w[e], block_amax[e], global_amax[e],
                                             None if dss_beta is None else dss_beta[e])
                            for e in range(w.shape[0])])
    return nvfp4.fake_quant(w, block_amax, global_amax, dss_beta)


def _state_values(block_amax, global_amax, dss_beta):
    """``(block_amax, global_amax, dss_beta)`` with uint8 codes decoded to their fp32 values."""
    if block_amax.dtype == torch.uint8:
        block_amax = block_amax_of_bits(block_amax, global_amax.to(block_amax.device))
    if dss_beta is not None and dss_beta.dtype == torch.uint8:
        dss_beta = beta_of_codes(dss_beta)
    return block_amax, global_amax, dss_beta


def fake_quant_input(x: torch.Tensor, input_amax: torch.Tensor,
                     kernels: KernelImpl = KernelImpl.AUTO, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W4A4 activation quantize-dequantize of ``x [..., K]`` as served, in ``x.dtype``: dynamic
    per-16 FP8 block scales under the static global input scale of ``input_amax`` (fp32, one
    value; or ``[E]`` with ``row_scale``, x's rows' indices into it: fused experts, one launch
    for all); semantics in :func:`nvfp4_dist.numerics.nvfp4.fake_quant_input`. fp64 inputs (a
    float64 calibration forward) take the reference."""
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _use_triton(x, kernels):
        return _triton_module().fake_quant_input(x, input_amax, row_scale)
    amax = input_amax.to(device=x.device, dtype=torch.float32)
    if row_scale is None:
        return nvfp4.fake_quant_input(x, amax.reshape(()))
    return nvfp4.fake_quant_input(x, amax.reshape(-1), row_scale.to(x.device))


def _stacked_module():
    """The Triton stacked-experts entries (:mod:`.stacked_ops`); imported where the Triton
    implementation is, since it loads triton."""
    from . import stacked_ops
    return stacked_ops


def search_block_scales_stacked(w: torch.Tensor, global_amax: torch.Tensor, method: Method,
                                hessian: torch.Tensor | None = None, dss_betas: torch.Tensor | None = None,
                                kernels: KernelImpl = KernelImpl.AUTO) -> ScaleChoice:
    """:func:`search_block_scales` of every expert of stacked experts ``w [E, rows, cin]`` at
    once (a few launches for all of them): ``global_amax [E]`` one per expert, ``hessian [E, cin
    // 16, 16, 16]`` one per expert (expert e's rows take ``hessian[e]``); results ``[E, rows,
    cin // 16]``, each expert's the bits of its own :func:`search_block_scales` call."""
    method = Method(method)
    global_amax = global_amax.to(device=w.device, dtype=torch.float32).reshape(-1)
    if method is Method.LOCAL_HESSIAN and hessian is None:
        raise ValueError("local_hessian search needs a hessian")
    if dss_betas is not None and method is not Method.LOCAL_HESSIAN:
        raise ValueError("DSS runs on top of the local_hessian search only")
    if method not in (Method.MAX, Method.MSE, Method.LOCAL_HESSIAN):
        raise ValueError(f"method {method.value!r} has no stacked search")
    if method is Method.MAX:
        return ScaleChoice(block_amax=nvfp4.block_amax(w))
    if not _use_triton(w, kernels):
        if method is Method.MSE:
            return reference.search_mse_stacked(w, global_amax)
        if dss_betas is not None:
            return reference.search_dss_stacked(w, global_amax, hessian.to(w.device), dss_betas)
        return reference.search_local_hessian_stacked(w, global_amax, hessian.to(w.device))
    impl = _stacked_module()
    if method is Method.MSE:
        return impl.search_mse_stacked(w, global_amax)
    if dss_betas is not None:
        return impl.search_dss_stacked(w, global_amax, hessian, dss_betas)
    return impl.search_local_hessian_stacked(w, global_amax, hessian)


def expert_block_hessians(x: torch.Tensor, offsets: torch.Tensor, hessian_sum: torch.Tensor,
                          amax: torch.Tensor | None = None, kernels: KernelImpl = KernelImpl.AUTO,
                          rows: torch.Tensor | None = None) -> None:
    """In place: ``hessian_sum [E, cin // 16, 16, 16]`` (float64, contiguous) += the block
    Hessians of each expert's rows of ``x [N, cin]`` (grouped by expert, ``offsets [E + 1]``;
    with ``rows [N]``, the rows ``x[rows]`` without forming them), and ``amax [E]`` (fp32,
    contiguous, optional) = max(amax, each expert's max |x|), in one launch on the GPU;
    semantics in :func:`.reference.expert_block_hessians`."""
    if hessian_sum.dtype != torch.float64 or not hessian_sum.is_contiguous():
        raise ValueError("expert_block_hessians accumulates into a contiguous float64 tensor")
    if tuple(hessian_sum.shape[1:]) != (x.shape[-1] // 16, 16, 16) or x.shape[-1] % 16:
        raise ValueError(f"hessian_sum shape {tuple(hessian_sum.shape)} does not match inputs {tuple(x.shape)}")
    if amax is not None and (amax.dtype != torch.float32 or tuple(amax.shape) != hessian_sum.shape[:1]
                             or not amax.is_contiguous() or amax.device != hessian_sum.device):
        raise ValueError(f"expert_block_hessians: amax must be a contiguous fp32 [{hessian_sum.shape[0]}] "
                         "tensor on the sums' device")
    if _use_triton(x, kernels):
        _stacked_module().expert_block_hessians(x, offsets, hessian_sum, amax, rows)
    else:
        reference.expert_block_hessians(x, offsets, hessian_sum, amax, rows)


def dense_input_stats(x: torch.Tensor, amax: torch.Tensor, hessian_sum: torch.Tensor | None = None,
                      kernels: KernelImpl = KernelImpl.AUTO) -> None:
    """In place: ``amax`` (0-d fp32, contiguous) = max(amax, max |x|) of ``x [N, cin]`` and,
    when given, ``hessian_sum`` (fp32 ``[cin // 16, 16, 16]``, contiguous) += the batch's
    block Hessians; one launch on the GPU; semantics in :func:`.reference.dense_input_stats`."""
    if amax.dtype != torch.float32 or amax.dim() != 0 or amax.device != x.device:
        raise ValueError("dense_input_stats: amax must be a 0-d fp32 tensor on the input's device")
    if hessian_sum is not None and (hessian_sum.dtype != torch.float32 or not hessian_sum.is_contiguous()
                                    or tuple(hessian_sum.shape) != (x.shape[-1] // 16, 16, 16)
                                    or x.shape[-1] % 16):
        raise ValueError(f"dense_input_stats: hessian_sum must be a contiguous fp32 [{x.shape[-1] // 16}, 16, 16] "
                         f"tensor for inputs {tuple(x.shape)}")
    if x.shape[-1] % 16 == 0 and _use_triton(x, kernels):
        _triton_module().dense_input_stats(x, amax, hessian_sum)
    else:
        reference.dense_input_stats(x, amax, hessian_sum)


def grouped_choices(top_k_index: torch.Tensor, n_experts: int, divisor: int = 1,
                    kernels: KernelImpl = KernelImpl.AUTO):
    """The routing choices of ``top_k_index [T, k]`` grouped by expert: ``(positions, offsets,
    row_expert)``, one launch on the GPU; semantics in :func:`.reference.grouped_choices`."""
    if _use_triton(top_k_index, kernels):
        return _stacked_module().grouped_choices(top_k_index, n_experts, divisor)
    return reference.grouped_choices(top_k_index, n_experts, divisor)
