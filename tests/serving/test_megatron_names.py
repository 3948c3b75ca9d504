"""A Megatron model's ignore list under the HF names engines load: the MoE router
``decoder.layers.N.mlp.router`` is Qwen3-MoE's ``model.layers.N.mlp.gate``."""

from __future__ import annotations

import pytest
from torch import nn

megatron = pytest.importorskip("nvfp4_dist.parallel.megatron")


def test_router_and_head_map_to_hf_names():
    model = nn.Module()
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([nn.Module() for _ in range(2)])
    for layer in model.decoder.layers:
        layer.mlp = nn.Module()
        layer.mlp.router = nn.Linear(4, 2, bias=False)
    model.custom = nn.Linear(4, 4)
    names = ["decoder.layers.0.mlp.router", "decoder.layers.1.mlp.router", "custom"]
    assert megatron.hf_module_names(model, names) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate",
                                                      "custom"]
