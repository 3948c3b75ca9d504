"""Embedded default models: small, seeded, offline (no download).

``tiny-dense`` is a Qwen3-style causal LM built from ``tiny_dense.json``. Its weights are drawn
here, parameter by parameter in name order from one seeded generator (not by transformers'
initialisers, which change between releases), so the same seed gives the same weights on every
machine and for every parallel layout built from them. Linear weights are N(0, 0.02^2) scaled by a
log-normal factor per input channel, so that activation-aware methods have something to find.
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from torch import nn

EMBEDDED_MODELS = ("tiny-dense",)
_CONFIG_FILES = {"tiny-dense": "tiny_dense.json"}


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
    return model.eval()


def calibration_tokens(vocab_size: int, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Seeded synthetic calibration token ids ``[samples, seq_len]`` (int64)."""
    gen = torch.Generator().manual_seed(seed + 1)
    # Zipf-like frequencies, as in natural text: a few tokens are common, most are rare.
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    return torch.multinomial(probs / probs.sum(), samples * seq_len, replacement=True,
                             generator=gen).reshape(samples, seq_len)
