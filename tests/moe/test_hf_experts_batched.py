"""Fused experts observed and searched a whole projection at a time: the same statistics as the
per-expert observer (float64 sums to float64 rounding, counts and amax exactly) and the same
states as the per-slot search, bit for bit."""

import pytest
import torch

import nvfp4_dist as nd
from nvfp4_dist.calib import stages
from nvfp4_dist.calib.discover import discover
from nvfp4_dist.layout.stats import StatsStore
from nvfp4_dist.parallel.context import SINGLE_PROCESS
from nvfp4_dist.parallel.hf_experts import grouped_rows
from nvfp4_dist.parallel.routing import routed_tokens
from moe_testutil import forward_loop, small_moe, tokens


@pytest.mark.parametrize("route_all", [False, True])
def test_grouped_rows_are_the_routed_rows_in_expert_order(route_all):
    top_k = torch.tensor([[1, 3], [0, 1], [3, 5], [-1, 1]])  # 5 and -1: sentinels of a 4-expert layer
    rows, offsets, row_expert = grouped_rows(top_k, 4, route_all)
    expected = routed_tokens(top_k, 4, route_all)
    for e, want in enumerate(expected):
        assert torch.equal(rows[offsets[e]:offsets[e + 1]], want)
        assert torch.all(row_expert[offsets[e]:offsets[e + 1]] == e)
    assert torch.all(row_expert[offsets[4]:] == 4)  # sentinels last, outside every expert


def _stats(model, config, ids, full=False):
    inv = discover(model, config, SINGLE_PROCESS)
    if not full:
        return inv, stages.observe(model, inv, config, forward_loop(ids))
    # a full-Hessian store takes the former expert-by-expert observer (GPTQ's path)
    store = StatsStore(full_hessian=True)
    handles = []
    for module, adapter, slots in inv.modules.values():
        handles += adapter.observe(module, list(slots), store, with_hessian=True)
    with torch.no_grad():
        forward_loop(ids)(model)
    for h in handles:
        h.remove()
    return inv, store


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_stacked_statistics_equal_the_per_expert_observer(model_type):
    model = small_moe(model_type, dead={0: (3,)})
    ids = tokens()
    config = nd.QuantConfig()
    inv, store = _stats(model, config, ids)
    _, full = _stats(model, config, ids, full=True)
    experts = [s for s in inv.slots if s.moe is not None]
    for slot in experts:
        got, want = store[slot.stats_key], full[slot.stats_key]
        assert got.tokens == want.tokens, slot.name
        assert torch.equal(got.amax, want.amax), slot.name
        if want.tokens == 0:
            assert got.hessian_sum is None and torch.equal(got.amax, torch.zeros(()))
            continue
        # the diagonal blocks of the full float64 X^T X: the same exact products, another order
        nb = want.cin // 16
        blocks = want.hessian_sum.reshape(nb, 16, nb, 16).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        assert got.hessian_sum.dtype == torch.float64
        assert (got.hessian_sum - blocks).abs().max() <= 1e-13 * blocks.abs().max(), slot.name
        assert torch.equal(got.hessian(), want.hessian()), slot.name
    assert store["model.layers.0.mlp.experts.3.gate_up_proj.input"].tokens == 0


@pytest.mark.parametrize("method,dss", [("max", False), ("mse", False), ("local_hessian", False),
                                        ("local_hessian", True)])
def test_stacked_search_equals_the_per_slot_search(method, dss, monkeypatch):
    """Dead experts (MSE), an expert whose inputs are zero on one block column (MSE there) and the
    live ones: every state field the same bits."""
    model = small_moe(dead={0: (3,)})
    with torch.no_grad():  # up rows 0..15 of layer 1's expert 2 zero: its down input's block 0 is empty
        model.model.layers[1].mlp.experts.gate_up_proj[2, 32:48, :] = 0.0
    config = nd.QuantConfig(method=method, dss=dss)
    inv = discover(model, config, SINGLE_PROCESS)
    store = stages.observe(model, inv, config, forward_loop(tokens()))
    stats = stages.reduce(inv, store, True, SINGLE_PROCESS, torch.device("cpu"))
    stacked = stages.search(inv, stats, config, show_progress=False)
    monkeypatch.setattr(stages, "search_stacked", lambda *a, **k: {})
    per_slot = stages.search(inv, stats, config, show_progress=False)
    assert list(stacked) == list(per_slot) == [s.name for s in inv.slots]
    for name, want in per_slot.items():
        got = stacked[name]
        assert (got.method, got.tokens, got.dead, got.empty_blocks) == (
            want.method, want.tokens, want.dead, want.empty_blocks), name
        for field in ("global_amax", "block_amax", "dss_beta", "input_amax"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert torch.equal(a, b), (name, field)
    assert stacked["model.layers.0.mlp.experts.3.down_proj"].dead
    if method == "local_hessian":
        assert stacked["model.layers.1.mlp.experts.2.down_proj"].empty_blocks == 1  # of 2
