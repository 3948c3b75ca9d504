"""Which implementation runs the searches and fake-quant (see the package docstring)."""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ConfigError
from ..numerics import nvfp4
from . import reference
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


def quantize_pack_weight(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                         dss_beta: torch.Tensor | None = None,
                         kernels: KernelImpl = KernelImpl.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored NVFP4 form of ``w [rows, cin]``: ``(packed uint8 [rows, cin // 2], scale
    float8_e4m3fn [rows, cin // 16])``, codes against ``fl(dss_beta * d)`` when given."""
    if _use_triton(w, kernels):
        return _triton_module().quantize_pack(w, block_amax, global_amax, dss_beta)
    return reference.quantize_pack(w, block_amax, global_amax, dss_beta)


def fake_quant_weight(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                      dss_beta: torch.Tensor | None = None,
                      kernels: KernelImpl = KernelImpl.AUTO) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``w [..., cin]`` with static scales, in ``w.dtype``.

    ``global_amax``: one value, or for stacked experts ``w [E, rows, cin]`` one per expert.
    """
    if _use_triton(w, kernels):
        return _triton_module().fake_quant(w, block_amax, global_amax, dss_beta)
    if global_amax.numel() > 1 and w.dim() == 3:  # the reference takes one global amax per call
        return torch.stack([nvfp4.fake_quant(w[e], block_amax[e], global_amax[e],
                                             None if dss_beta is None else dss_beta[e])
                            for e in range(w.shape[0])])
    return nvfp4.fake_quant(w, block_amax, global_amax, dss_beta)
