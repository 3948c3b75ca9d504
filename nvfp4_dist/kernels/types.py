"""Result types shared by the reference search and the Triton kernels."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Method(str, enum.Enum):
    """Block-scale search objective."""

    MAX = "max"  # block_amax = max |w|: one pass, no search
    MSE = "mse"  # 126-candidate FP8 sweep minimising the block's sum of squared errors
    LOCAL_HESSIAN = "local_hessian"  # 126-candidate sweep minimising dw^T H_b dw per block
    GPTQ = "gptq"  # column-sequential quantization with Hessian-inverse error compensation


class KernelImpl(str, enum.Enum):
    """Where the block-scale search runs."""

    AUTO = "auto"  # Triton for CUDA tensors, the torch reference elsewhere
    TRITON = "triton"  # Triton kernels (CUDA, or the interpreter under TRITON_INTERPRET=1)
    TORCH = "torch"  # the torch reference (slow on large weights, exact by definition)


@dataclass(frozen=True)
class ScaleChoice:
    """Searched block scales for one weight shard ``[rows, cin]``.

    ``block_amax``: fp32 ``[rows, cin // 16]``; for sweep methods it equals ``fl(c_k * g)``.
    ``candidate``: int64 ``[rows, cin // 16]`` index k of the chosen FP8 candidate (None for max).
    ``dss_beta``: fp32 ``[rows, cin // 16]`` quant-scale ratio (None unless DSS ran).
    ``loss``: fp32 ``[rows, cin // 16]`` objective at the choice (block SSE, or dw^T H dw).
    """

    block_amax: torch.Tensor = field(repr=False)
    candidate: torch.Tensor | None = field(default=None, repr=False)
    dss_beta: torch.Tensor | None = field(default=None, repr=False)
    loss: torch.Tensor | None = field(default=None, repr=False)
