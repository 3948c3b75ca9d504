"""W4A4 forward of transformers' fused experts: each expert's inputs fake-quantized with its own scale.

The experts module computes every expert from one ``hidden_states`` tensor (and the down
projection's input inside its forward), so a hook on the module cannot give each expert its own
quantized input. Under W4A4 the module's forward is therefore replaced (by
:mod:`nvfp4_dist.calib.apply`, undone with the fake-quant) by the eager per-expert loop of
transformers (``Qwen3MoeExperts.forward``), with the two GEMM inputs of expert ``e`` passed
through ``quant_input(module, x, e, param)``:

    x_e = hidden_states[tokens routed to e]
    h   = act(fq_in(x_e, gate_up input scale of e) @ fq(W_gate_up[e])^T (+ bias))
    y   = fq_in(h, down input scale of e) @ fq(W_down[e])^T (+ bias) (post-expert norm if any)
    out[token] += routing weight * y

This is what the engines' NVFP4 MoE kernels do with the exported per-expert ``input_scale``
(vLLM's CUTLASS path: one global input scale per expert, gate and up sharing it as ours do; its
FlashInfer backends take the max over the experts instead, a coarser scale). The weights are
the module's parameters as the fake-quant pre-hook leaves them (their images).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def first_projection(module: nn.Module) -> str:
    """``gate_up_proj``, or ``up_proj`` for experts without a gate."""
    return "gate_up_proj" if module.has_gate else "up_proj"


def experts_forward_w4a4(module: nn.Module, quant_input: Callable, hidden_states: torch.Tensor,
                         top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output ``[T, H]`` with per-expert quantized GEMM inputs (module docstring).

    ``quant_input(module, x, expert, param)``: the image of expert ``expert``'s input ``x`` to
    the projection ``param``. Routing indices outside ``[0, num_experts)`` reach no expert.
    """
    first = first_projection(module)
    up_w, down_w = getattr(module, first), module.down_proj
    n_experts, k = up_w.shape[0], top_k_index.shape[-1]
    out = torch.zeros_like(hidden_states)
    flat = top_k_index.reshape(-1).long()
    weights = top_k_weights.reshape(-1)
    hit = torch.unique(flat[(flat >= 0) & (flat < n_experts)]).tolist()
    for e in hit:
        pos = (flat == e).nonzero().squeeze(1)  # (token, slot) pairs routed to e
        tokens = pos // k
        bias = getattr(module, f"{first}_bias")[e] if module.has_bias else None
        h = F.linear(quant_input(module, hidden_states[tokens], e, first), up_w[e], bias)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        bias = module.down_proj_bias[e] if module.has_bias else None
        y = F.linear(quant_input(module, h, e, "down_proj"), down_w[e], bias)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        y = y * weights[pos, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
