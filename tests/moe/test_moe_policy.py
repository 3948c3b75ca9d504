"""moe.py on its own: routed token sets, the dead-expert input amax, the experts summary."""

import torch
from torch import nn

from nvfp4_dist.layout.slots import ExpertInfo, ShardLayout, WeightSlot
from nvfp4_dist.calib.state import SlotState
from nvfp4_dist.kernels.types import Method
from nvfp4_dist.calib.moe import UNOBSERVED_INPUT_AMAX, dead_input_amax, summarize_experts
from nvfp4_dist.parallel.routing import routed_tokens
from nvfp4_dist.parallel.context import SINGLE_PROCESS


def test_routed_tokens_follow_top_k_and_skip_sentinels():
    top_k = torch.tensor([[0, 2], [2, 1], [4, 0], [1, 2]])  # 4 = an expert-parallel sentinel (E = 4)
    rows = routed_tokens(top_k, 4)
    assert [r.tolist() for r in rows] == [[0, 2], [1, 3], [0, 1, 3], []]
    every = routed_tokens(top_k, 4, route_all=True)
    assert [r.tolist() for r in every] == [[0, 1, 2, 3]] * 4


def _slot(name, family=None, index=0, count=3):
    moe = None if family is None else ExpertInfo(index=index, count=count, family=family)
    return WeightSlot(name=name, module=nn.Identity(), param_name="weight", layout=ShardLayout.whole((16, 16)),
                      fused_group=name, stats_key=name, moe=moe)


def _state(amax, dead=False, method=Method.LOCAL_HESSIAN):
    return SlotState(global_amax=torch.ones(()), block_scale=torch.ones(16, 1, dtype=torch.uint8), method=method,
                     input_amax=torch.tensor(amax), tokens=0 if dead else 5, dead=dead)


def test_dead_input_amax_borrows_from_the_family_then_the_model():
    slots = [_slot("dense", None),
             _slot("l0.e0.up", "l0.up", 0), _slot("l0.e1.up", "l0.up", 1), _slot("l0.e2.up", "l0.up", 2),
             _slot("l0.e0.down", "l0.down", 0), _slot("l0.e1.down", "l0.down", 1),
             _slot("l0.e2.down", "l0.down", 2),
             _slot("l1.e0.up", "l1.up", 0), _slot("l1.e1.up", "l1.up", 1), _slot("l1.e2.up", "l1.up", 2)]
    states = {"dense": _state(7.0),
              "l0.e0.up": _state(2.0), "l0.e1.up": _state(3.0), "l0.e2.up": _state(0.0, dead=True),
              "l0.e0.down": _state(11.0), "l0.e1.down": _state(5.0), "l0.e2.down": _state(0.0, dead=True),
              # a layer whose experts are all dead borrows the model's largest live input amax
              "l1.e0.up": _state(0.0, dead=True), "l1.e1.up": _state(0.0, dead=True),
              "l1.e2.up": _state(0.0, dead=True)}
    out = dead_input_amax(slots, states, SINGLE_PROCESS)
    assert {k: float(v) for k, v in out.items()} == {
        "l0.e2.up": 3.0, "l0.e2.down": 11.0, "l1.e0.up": 11.0, "l1.e1.up": 11.0, "l1.e2.up": 11.0}


def test_dead_input_amax_without_any_observation_is_the_documented_constant():
    slots = [_slot("e0", "f", 0, 2), _slot("e1", "f", 1, 2)]
    states = {"e0": _state(0.0, dead=True), "e1": _state(0.0, dead=True)}
    out = dead_input_amax(slots, states, SINGLE_PROCESS)
    assert all(float(v) == UNOBSERVED_INPUT_AMAX for v in out.values()) and len(out) == 2


def test_summary_counts_names_dead_experts_and_flags_missing_ones():
    slots = [_slot("m.l0.experts.0.up", "m.l0.experts.up", 0), _slot("m.l0.experts.2.up", "m.l0.experts.up", 2),
             _slot("dense", None)]
    states = {"m.l0.experts.0.up": _state(1.0),
              "m.l0.experts.2.up": _state(0.0, dead=True, method=Method.MSE), "dense": _state(1.0)}
    summary = summarize_experts(slots, states, SINGLE_PROCESS)
    assert [r.name for r in summary.records] == ["m.l0.experts.0.up", "m.l0.experts.2.up"]
    assert [r.index for r in summary.dead] == [2]
    assert summary.missing() == {"m.l0.experts.up": [1]}
    text = summary.format()
    assert "MISSING m.l0.experts.up: experts [1]" in text
    assert "dead expert 2 of m.l0.experts: no calibration token; weight-only scales for up (mse)" in text
