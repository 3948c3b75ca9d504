"""W4A4 forward of transformers' fused experts: each expert's inputs fake-quantized with its own scale.

The experts module computes every expert from one ``hidden_states`` tensor (and the down
projection's input inside its forward), so a hook on the module cannot give each expert its own
quantized input. Under W4A4 the module's forward is therefore replaced (by
:mod:`nvfp4_dist.calib.apply`, undone with the fake-quant) by :func:`experts_forward_w4a4`, which
computes, for every expert ``e``:

    x_e = hidden_states[tokens routed to e]
    h   = act(fq_in(x_e, gate_up input scale of e) @ fq(W_gate_up[e])^T (+ bias))
    y   = fq_in(h, down input scale of e) @ fq(W_down[e])^T (+ bias) (post-expert norm if any)
    out[token] += routing weight * y

This is what the engines' NVFP4 MoE kernels do with the exported per-expert ``input_scale``
(vLLM's CUTLASS path: one global input scale per expert, gate and up sharing it as ours do; its
FlashInfer backends take the max over the experts instead, a coarser scale). The weights are
the module's parameters as the fake-quant pre-hook leaves them (their images).

All experts at once, a handful of launches per projection: one stable grouping (one launch on the
GPU) orders the routed (token, choice) pairs by expert (:func:`.hf_experts.grouped_choices`, the observers' grouping);
each projection's input is fake-quantized in ONE call for all experts' rows, every row under its
expert's scale (``quant_input`` gets the per-row expert indices); the GEMMs are one grouped GEMM
per projection (bf16 on a Hopper-class GPU, :func:`.hf_experts.grouped_gemm`), else one
``F.linear`` per expert; the routed outputs are scattered back with one ``index_add_``.

:func:`experts_forward_w4a4_loop` is transformers' eager per-expert loop with the same
quantization (``quant_input`` gets one expert index at a time): the reference. On the CPU
(per-expert GEMMs) the two give the same bits: the rows of an expert are in the same order
(ascending (token, choice) positions), every elementwise step (the gate, the post-expert norm)
runs on one expert's rows as in the loop, and so does the scatter (``index_add_`` expert by
expert, adding each token's contributions in the loop's order and rounding).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .hf_experts import grouped_choices, grouped_gemm


def first_projection(module: nn.Module) -> str:
    """``gate_up_proj``, or ``up_proj`` for experts without a gate."""
    return "gate_up_proj" if module.has_gate else "up_proj"


def _bias(module: nn.Module, param: str):
    return getattr(module, f"{param}_bias") if getattr(module, "has_bias", False) else None


def _activate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def _post_norm(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return module.post_expert_norm(y) if getattr(module, "has_post_expert_norm", False) else y


def experts_forward_w4a4(module: nn.Module, quant_input: Callable, hidden_states: torch.Tensor,
                         top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output ``[T, H]`` with per-expert quantized GEMM inputs, all experts at once
    (module docstring).

    ``quant_input(module, x, expert, param)``: the image of the rows ``x`` to the projection
    ``param``, ``expert`` an int64 tensor naming each row's expert (whose scale it takes).
    Routing indices outside ``[0, num_experts)`` reach no expert.
    """
    first = first_projection(module)
    up_w, down_w = getattr(module, first), module.down_proj
    n_experts, k = up_w.shape[0], top_k_index.shape[-1]
    choices, offsets, row_expert = grouped_choices(top_k_index, n_experts)
    tokens, weights = choices // k, top_k_weights.reshape(-1)[choices]
    out = torch.zeros_like(hidden_states)
    gemm = grouped_gemm(hidden_states, up_w)
    if gemm is None:
        return _per_expert(module, quant_input, out, hidden_states, tokens, weights, offsets, row_expert)
    y = _grouped(module, quant_input, gemm, hidden_states, tokens, weights, offsets, row_expert)
    return out.index_add_(0, tokens, y.to(out.dtype))


def _grouped(module, quant_input, gemm, hidden_states, tokens, weights, offsets, row_expert):
    """Routed rows' weighted outputs ``[T * k, H]`` through one grouped GEMM per projection, no
    wait for the device: rows routed nowhere (sorted last, past ``offsets[-1]``, where the
    grouped GEMM writes nothing defined) get any expert's scale and a zero output."""
    first = first_projection(module)
    n_experts = offsets.numel() - 1
    routed = row_expert < n_experts
    expert = row_expert.clamp(max=n_experts - 1)
    offs = offsets[1:].to(torch.int32)

    def linear(x, param):
        weight, bias = getattr(module, param), _bias(module, param)
        y = gemm(x.to(weight.dtype), weight.transpose(-2, -1), offs=offs)
        return y if bias is None else y + bias[expert]

    x = hidden_states[tokens]
    if torch.is_grad_enabled() and hidden_states.requires_grad:  # the rows routed nowhere get no
        x = torch.where(routed[:, None], x, 0)  # gradient (the grouped GEMM leaves theirs undefined)
    h = _activate(module, linear(quant_input(module, x, expert, first), first))
    y = _post_norm(module, linear(quant_input(module, h, expert, "down_proj"), "down_proj"))
    return torch.where(routed[:, None], y * weights[:, None], 0)


def _per_expert(module, quant_input, out, hidden_states, tokens, weights, offsets, row_expert):
    """``out`` plus the routed rows' weighted outputs, with one GEMM per expert (and the gate, the
    post-expert norm and the scatter on each expert's rows, as the loop: a single ``index_add_``
    would add a token's 16-bit contributions in fp32 and round once, the loop rounds each);
    the two activation fake-quants still take all experts' rows in one call each."""
    first = first_projection(module)
    bounds = offsets.tolist()
    n = bounds[-1]  # rows routed nowhere sort last: dropped
    spans = [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]
    tokens, weights, expert = tokens[:n], weights[:n], row_expert[:n]
    if not spans:
        return out
    up_w, down_w = getattr(module, first), module.down_proj
    up_b, down_b = _bias(module, first), _bias(module, "down_proj")
    x = quant_input(module, hidden_states[tokens], expert, first)
    h = torch.cat([_activate(module, F.linear(x[a:b], up_w[e], None if up_b is None else up_b[e]))
                   for e, a, b in spans])
    h = quant_input(module, h, expert, "down_proj")
    for e, a, b in spans:
        y = _post_norm(module, F.linear(h[a:b], down_w[e], None if down_b is None else down_b[e]))
        out.index_add_(0, tokens[a:b], (y * weights[a:b, None]).to(out.dtype))
    return out


def experts_forward_w4a4_loop(module: nn.Module, quant_input: Callable, hidden_states: torch.Tensor,
                              top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """:func:`experts_forward_w4a4` as transformers' eager loop, expert by expert (the reference).

    ``quant_input(module, x, expert, param)`` with ``expert`` an int: the image of expert
    ``expert``'s input ``x`` to the projection ``param``.
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
