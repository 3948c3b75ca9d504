"""The per-expert checks and state of fused experts, computed a 3-D parameter at a time: a bad
value still names its one expert slot, and the weight amax, the buffers and the refusals are
those of the expert-by-expert computation."""

import pytest
import torch

import nvfp4_dist as nd
from nvfp4_dist.calib import stages
from nvfp4_dist.calib.discover import discover
from nvfp4_dist.calib.state import SUFFIXES, read_state
from nvfp4_dist.parallel.access import local_weight
from nvfp4_dist.parallel.context import SINGLE_PROCESS
from moe_testutil import forward_loop, small_moe, tokens


def test_a_nan_in_one_expert_names_that_expert_only():
    model = small_moe(num_experts=6)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[4, 3, 7] = float("nan")
        model.model.layers[0].mlp.experts.gate_up_proj[2, 0, 0] = float("-inf")
        model.model.layers[0].mlp.experts.gate_up_proj[2, 5, 9] = float("inf")
    with pytest.raises(nd.LayoutError) as err:
        nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    lines = [line.strip() for line in str(err.value).splitlines()[1:-1]]
    assert lines == ["model.layers.0.mlp.experts.2.gate_up_proj: 2 non-finite values",
                     "model.layers.1.mlp.experts.4.down_proj: 1 non-finite values"]


def test_non_finite_statistics_name_the_expert():
    model = small_moe(num_experts=4)
    config = nd.QuantConfig(method="local_hessian")
    inv = discover(model, config, SINGLE_PROCESS)
    store = stages.observe(model, inv, config, forward_loop(tokens()))
    live = next(k for k, s in sorted(store.items()) if ".experts." in k and s.hessian_sum is not None)
    assert store[live].hessian_sum._base is not None  # a view of the projection's stacked sums
    stages.reduce(inv, store, True, SINGLE_PROCESS, torch.device("cpu"))  # finite: passes
    store[live].hessian_sum[0, 1, 1] = float("nan")
    with pytest.raises(nd.CalibrationError, match=r"non-finite inputs .* for: " + live.removesuffix(".input")
                       + r"\. Fix"):
        stages.reduce(inv, store, True, SINGLE_PROCESS, torch.device("cpu"))


def test_expert_weight_amax_and_buffers_match_the_per_expert_values():
    model = small_moe(num_experts=4, dead={0: [1]})
    with torch.no_grad():  # one expert slice with a negative extreme: amax = |min|
        model.model.layers[0].mlp.experts.down_proj[3, 2, 5] = -7.5
    config = nd.QuantConfig(method="local_hessian", dss=True)
    result = nd.quantize(model, config, forward_loop(tokens()), show_progress=False)
    assert result.experts.dead  # a dead expert: no beta of its own, the fill 1.0 in the buffer
    experts = [s for s in result.slots if s.expert is not None]
    assert experts
    for slot in experts:
        w = local_weight(slot)
        assert torch.equal(result.statistics.weight_amax[slot.name], w.abs().amax().float())
        state, stored = result.states[slot.name], read_state(slot.module, slot.param_name, slot.expert)
        assert set(stored) == set(SUFFIXES)
        for suffix in SUFFIXES:
            want = getattr(state, suffix)
            if want is None:  # weight-only expert under DSS: beta 1.0, the identity
                assert suffix == "dss_beta_code" and bool((stored[suffix] == 100).all())  # beta 1.0
            else:
                assert torch.equal(stored[suffix], want), (slot.name, suffix)
    assert torch.equal(result.statistics.weight_amax["model.layers.0.mlp.experts.3.down_proj"],
                       torch.tensor(7.5))
