"""quantize()'s stages one at a time: composed by hand they give quantize()'s states; the states
are frozen; the report costs nothing until asked for; discovery refuses what it cannot handle."""

import dataclasses

import pytest
import torch
from torch import nn

import nvfp4_dist as nd
from nvfp4_dist.calib import pipeline, stages
from nvfp4_dist.calib.apply import apply_states
from nvfp4_dist.calib.discover import discover
from nvfp4_dist.calib.state import read_state
from nvfp4_dist.models.tiny import build_embedded, calibration_tokens
from nvfp4_dist.parallel.access import local_shards
from nvfp4_dist.parallel.context import SINGLE_PROCESS

CONFIG = nd.QuantConfig(method="local_hessian", dss=True)


def _loop(tokens):
    def forward_loop(model):
        for batch in tokens.split(4):
            model(batch)
    return forward_loop


@pytest.fixture(scope="module")
def tokens():
    return calibration_tokens(1024, 8, 32, seed=0)


def test_stages_by_hand_equal_quantize(tokens):
    reference = build_embedded("tiny-dense", seed=0)
    result = nd.quantize(reference, CONFIG, _loop(tokens), show_progress=False)

    model = build_embedded("tiny-dense", seed=0)
    inventory = discover(model, CONFIG, SINGLE_PROCESS)
    store = stages.observe(model, inventory, CONFIG, _loop(tokens))
    with local_shards(model):
        statistics = stages.reduce(inventory, store, True, SINGLE_PROCESS, torch.device("cpu"))
        searched = stages.search(inventory, statistics, CONFIG, show_progress=False)
    settled = stages.settle(inventory, searched, CONFIG, SINGLE_PROCESS)
    apply_states(model, inventory, settled.states, CONFIG)

    assert [s.name for s in inventory.slots] == [s.name for s in result.slots]
    for name, state in settled.states.items():
        want = result.states[name]
        for field in ("global_amax", "block_scale", "dss_beta_code", "input_amax"):
            assert torch.equal(getattr(state, field), getattr(want, field)), (name, field)
    x = tokens[:2]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


def test_states_are_frozen_and_settle_returns_new_ones(tokens):
    model = build_embedded("tiny-moe", seed=0)
    config = nd.QuantConfig(method="local_hessian")
    inventory = discover(model, config, SINGLE_PROCESS)
    store = stages.observe(model, inventory, config, _loop(tokens))
    with local_shards(model):
        statistics = stages.reduce(inventory, store, True, SINGLE_PROCESS, torch.device("cpu"))
        searched = stages.search(inventory, statistics, config, show_progress=False)
    some = next(iter(searched.values()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        some.input_amax = torch.zeros(())
    dead = [name for name, state in searched.items() if state.dead]
    assert dead  # tiny-moe has experts no token reaches
    settled = stages.settle(inventory, searched, config, SINGLE_PROCESS)
    for name in dead:
        assert searched[name].input_amax == 0  # the searched state is left as it was
        assert settled.states[name].input_amax > 0  # borrowed from the live siblings
        assert settled.states[name] is not searched[name]


def test_report_is_computed_only_when_asked_for(tokens, monkeypatch):
    calls = []
    error_sums = stages.error_sums
    monkeypatch.setattr(stages, "error_sums", lambda *a: calls.append(1) or error_sums(*a))
    model = build_embedded("tiny-dense", seed=0)
    result = nd.quantize(model, CONFIG, _loop(tokens), show_progress=False)
    assert calls == []  # no fake-quant of any weight for a report nobody asked for
    rows = result.layer_report()
    assert len(calls) == len(result.slots) == len(rows)
    assert result.layer_report() is rows  # cached
    assert "q_proj" in result.table() and len(calls) == len(result.slots)
    assert all(r.hessian_loss <= r.hessian_loss_max for r in rows)


class WithRouter(nn.Module):
    """A linear and a router-like module holding a 2-D weight that no adapter handles."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.randn(4, 32))
        self.embed = nn.Embedding(8, 32)  # embeddings are lookups: never reported

    def forward(self, x):
        return self.proj(x)


def test_unadapted_2d_weights_are_refused_by_name_unless_excluded():
    model = WithRouter()
    with pytest.raises(nd.LayoutError, match=r"no nvfp4_dist layout adapter handles:\n  gate \(Module\)"):
        nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=False, exclude=()), show_progress=False)
    assert not hasattr(model.proj, "weight_nvfp4_block_scale")  # refused before any work
    result = nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=False, exclude=("gate",)),
                         show_progress=False)
    assert [s.name for s in result.slots] == ["proj"]
    assert result.ignored == ("gate",)  # kept in high precision and listed for the export


@pytest.mark.parametrize("config, message", [
    (nd.QuantConfig(method="max", quantize_inputs=False, include=("nomatch*",)),
     r"include patterns \['nomatch\*'\] match no supported module"),
    (nd.QuantConfig(method="max", quantize_inputs=False, exclude=("*",)),
     r"exclude patterns \['\*'\] leave out every supported module"),
])
def test_a_run_that_quantizes_nothing_is_refused(config, message):
    model = build_embedded("tiny-dense", seed=0)
    with pytest.raises(nd.LayoutError, match=message):
        nd.quantize(model, config, show_progress=False)
    assert not any("_nvfp4_" in name for name, _ in model.named_buffers())


def test_quantize_records_the_layout_naming_and_context():
    model = build_embedded("tiny-dense", seed=0)
    result = nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    assert result.ctx is SINGLE_PROCESS and result.model is model
    key = "model.layers.0.input_layernorm.weight"
    spec = result.naming.passthrough(key, model.model.layers[0].input_layernorm, model.state_dict()[key])
    assert spec.outputs == ((key, slice(None)),) and spec.axis is None
    assert isinstance(result, pipeline.QuantResult)
    down = model.model.layers[0].mlp.down_proj
    assert read_state(down, "weight")["block_scale"].shape == (down.out_features, down.in_features // 16)
