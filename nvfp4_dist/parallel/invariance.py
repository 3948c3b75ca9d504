"""Layout-invariant calibration statistics: run the calibration forward in float64.

Why: a tensor-parallel forward sums row-parallel partial products in another order than TP=1
(and matmuls of other shapes may block their sums differently), so fp32 activations, and the
Hessians built from them, can differ in their last bits between TP sizes. The scale searches are
exact per row, so ``max`` and ``mse`` are layout-invariant anyway; ``local_hessian`` and DSS read
the Hessians and would inherit the difference.

How: :func:`float64_forward` runs the forward in float64. The observers round each input to fp32
before accumulating, so two layouts agree on an fp32 input unless their float64 values straddle
an fp32 rounding boundary: the float64 values differ by a few float64 ulps, and boundaries are
2^29 float64 ulps apart, so a given element differs with probability ~1e-8. With identical fp32
inputs in identical token order the Hessians are bit-identical. Weights are converted back to
their own dtype afterwards; fp32/bf16/fp16 values survive the round trip through float64
exactly, so the search sees the original weights. Costs: the forward runs at float64 speed and
memory (twice fp32); use it where bit-identical results across layouts are required.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def float64_forward(forward_loop: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """``forward_loop`` run with every floating parameter and buffer of the model in float64,
    restored to its original dtype afterwards (even when the loop raises)."""

    def loop(model: nn.Module) -> None:
        tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
        dtypes = [t.dtype for t in tensors]
        with torch.no_grad():
            for t in tensors:
                t.data = t.data.to(torch.float64)
        try:
            forward_loop(model)
        finally:
            with torch.no_grad():
                for t, dtype in zip(tensors, dtypes):
                    t.data = t.data.to(dtype)

    return loop
