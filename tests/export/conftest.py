"""Calibrated models and their exports, shared by the export tests (built once per session).

The tiny-dense runs keep CPU time small: ``max`` covers the whole model (every fused group,
W4A4); the searched methods cover a few layers (the torch reference search is the cost), which
also gives the export a non-trivial ignore list.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.export import export_checkpoint
from nvfp4_dist.models.tiny import build_embedded, calibration_tokens

FORMATS = ("modelopt", "compressed-tensors")

# name -> QuantConfig of a tiny-dense calibration run
CASES = {
    "max": QuantConfig(method="max"),
    "dss": QuantConfig(method="local_hessian", dss=True, include=("model.layers.0.self_attn.[qkv]_proj",)),
    "mse-w4a16": QuantConfig(method="mse", quantize_inputs=False, include=("model.layers.1.self_attn.o_proj",)),
}


def calibrate_tiny(config: QuantConfig):
    model = build_embedded("tiny-dense", seed=0)
    tokens = calibration_tokens(model.config.vocab_size, samples=4, seq_len=16, seed=0)

    def forward_loop(m):
        for batch in tokens.split(2):
            m(batch)

    result = quantize(model, config, forward_loop, show_progress=False)
    return model, result


@pytest.fixture(scope="session")
def tiny_runs():
    """name -> (model, QuantResult), calibrated lazily and once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = calibrate_tiny(CASES[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_exports(tiny_runs, tmp_path_factory):
    """(case, fmt) -> (model, result, export dir), exported lazily and once."""
    cache = {}

    def get(case, fmt):
        if (case, fmt) not in cache:
            model, result = tiny_runs(case)
            out = tmp_path_factory.mktemp("export") / f"{case}-{fmt}"
            # A small shard bound so that every export spans several files and an index.
            export_checkpoint(model, result, out, fmt=fmt, max_shard_size="1MB")
            cache[(case, fmt)] = (model, result, out)
        return cache[(case, fmt)]

    return get


class Block(nn.Module):
    """Plain modules with HF-style names: a fused q/k/v group, a layer whose input dimension is
    not a multiple of 16 (skipped) and an all-zero layer."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(32, 32, bias=False) for _ in range(3))
        self.odd = nn.Linear(20, 32)
        self.zero = nn.Linear(32, 16, bias=True)
        self.norm = nn.LayerNorm(32)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            self.zero.weight.zero_()

    def forward(self, x):
        h = self.norm(x)
        return self.zero(self.q_proj(h) + self.k_proj(h) + self.v_proj(h))


@pytest.fixture
def plain_run():
    """(model, result) of the plain Block, max calibration, weight-only (no data needed)."""
    model = Block()
    with pytest.warns(UserWarning, match="odd"):
        result = quantize(model, QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    return model, result


@pytest.fixture(params=list(CASES))
def case(request):
    """Every calibration case (tests narrow it with their own parametrize)."""
    return request.param


@pytest.fixture(params=FORMATS)
def fmt(request):
    """Both export formats."""
    return request.param


@pytest.fixture
def make_block():
    """The plain :class:`Block` model class, for tests that calibrate it their own way."""
    return Block
