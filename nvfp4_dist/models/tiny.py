"""Embedded default models: small, seeded, offline (no download).

``tiny-dense`` is a Qwen3-style causal LM built from ``tiny_dense.json``. Its weights are drawn
here, parameter by parameter in name order from one seeded generator (not by transformers'
initialisers, which change between releases), so the same seed gives the same weights on every
machine and for every parallel layout built from them. Linear weights are N(0, 0.02^2) scaled by a
log-normal factor per input channel, so that activation-aware methods have something to find.

``tiny-moe`` is a Qwen3-MoE-style model (8 experts, top-2, from ``tiny_moe.json``) seeded the same
way, then given dead experts by construction (:func:`make_dead_experts`).
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from torch import nn

EMBEDDED_MODELS = ("tiny-dense", "tiny-moe")
_CONFIG_FILES = {"tiny-dense": "tiny_dense.json", "tiny-moe": "tiny_moe.json"}
# tiny-moe: decoder layer -> experts no token is routed to.
TINY_MOE_DEAD_EXPERTS = {0: (7,), 1: (3,)}
# Value of the router-only bias channel (other embedding entries are ~N(0, 0.02^2)). After RMSNorm
# it is >= 7 for every token of the default calibration data, so a dead expert's logit sits > 6
# below the second-best live logit (the live logits spread ~0.2).
_BIAS_CHANNEL_VALUE = 1.0


def embedded_config_dict(name: str) -> dict:
    """The HF config.json content of an embedded model."""
    text = resources.files(__package__).joinpath(_CONFIG_FILES[name]).read_text()
    return json.loads(text)


def embedded_config(name: str):
    from transformers import AutoConfig

    cfg = embedded_config_dict(name)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    return AutoConfig.for_model(model_type, **cfg)


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Deterministic weights: norms 1, biases 0, matrices N(0, std^2) * channel scales."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1:
            p.copy_(torch.ones_like(p) if "norm" in name else torch.zeros_like(p))
            continue
        w = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        if "embed" not in name and p.dim() >= 2:
            channel = torch.exp(0.5 * torch.randn(p.shape[-1], generator=gen))
            w = w * channel
        p.copy_(w.to(p.dtype))
    return model


def build_embedded(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An embedded model (eval mode) with seeded weights."""
    from transformers import AutoModelForCausalLM

    if name not in _CONFIG_FILES:
        raise KeyError(f"unknown embedded model {name!r}; choose one of {', '.join(_CONFIG_FILES)}")
    model = AutoModelForCausalLM.from_config(embedded_config(name), dtype=dtype)
    seeded_init_(model, seed)
    if name == "tiny-moe":
        make_dead_experts(model, TINY_MOE_DEAD_EXPERTS)
    return model.eval()


@torch.no_grad()
def make_dead_experts(model: nn.Module, dead: dict[int, tuple[int, ...]]) -> nn.Module:
    """Route no token to the ``dead[layer]`` experts of a Qwen3-MoE model.

    Hidden channel 0 becomes a router-only bias channel: every token embedding holds the same
    positive value there; nothing writes it (row 0 of o_proj and of every expert's down_proj is
    zero), so it stays exactly constant in the residual stream; nothing but the routers reads it
    (input_layernorm weight 0 hides it from attention, column 0 of gate_up_proj from the
    experts). Each router weighs it by 0 for live experts and by -1 for dead ones: a dead expert's
    logit is its live-style logit minus >= 7, so it never makes the top-k, while routing among the
    live experts is the seeded one.
    """
    model.get_input_embeddings().weight[:, 0] = _BIAS_CHANNEL_VALUE
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.weight[0, :] = 0.0
        layer.input_layernorm.weight[0] = 0.0
        layer.mlp.experts.gate_up_proj[:, :, 0] = 0.0
        layer.mlp.experts.down_proj[:, 0, :] = 0.0
        router = layer.mlp.gate.weight  # [num_experts, hidden]
        router[:, 0] = 0.0
        router[list(dead.get(index, ())), 0] = -1.0
    return model


def calibration_tokens(vocab_size: int, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Seeded synthetic calibration token ids ``[samples, seq_len]`` (int64)."""
    gen = torch.Generator().manual_seed(seed + 1)
    # Zipf-like frequencies, as in natural text: a few tokens are common, most are rare.
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    return torch.multinomial(probs / probs.sum(), samples * seq_len, replacement=True,
                             generator=gen).reshape(samples, seq_len)
