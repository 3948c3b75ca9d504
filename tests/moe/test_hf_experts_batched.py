"""Fused experts observed and searched a whole projection at a time: the same statistics as the
per-expert observer (float64 sums to float64 rounding, counts and amax exactly) and the same
states as the per-slot search, bit for bit."""

import functools

import pytest
import torch

import nvfp4_dist as nd
from nvfp4_dist.calib import batched, stages
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
    # experts in chunks: one per chunk, and two per gate_up chunk (dead expert 3 beside live 2)
    chunked = []
    for budget in (1, 2 * 64 * 4 * batched._SEARCH_BYTES_PER_BLOCK):
        monkeypatch.setattr(stages, "search_stacked", functools.partial(batched.search_stacked, budget=budget))
        chunked.append(stages.search(inv, stats, config, show_progress=False))
    monkeypatch.setattr(stages, "search_stacked", lambda *a, **k: {})
    per_slot = stages.search(inv, stats, config, show_progress=False)
    assert list(stacked) == list(per_slot) == [s.name for s in inv.slots]
    for states in (stacked, *chunked):
        for name, want in per_slot.items():
            got = states[name]
            assert (got.method, got.tokens, got.dead, got.empty_blocks) == (
                want.method, want.tokens, want.dead, want.empty_blocks), name
            for field in ("global_amax", "block_scale", "dss_beta_code", "input_amax"):
                a, b = getattr(got, field), getattr(want, field)
                assert (a is None) == (b is None), (name, field)
                if a is not None:
                    assert a.shape == b.shape and torch.equal(a, b), (name, field)
    # the experts' states are views of one stacked tensor per projection (nothing held twice)
    for field in ("global_amax", "block_scale", "dss_beta_code", "input_amax"):
        values = [getattr(stacked[f"model.layers.1.mlp.experts.{e}.gate_up_proj"], field) for e in range(4)]
        if values[0] is not None:
            assert len({v.untyped_storage().data_ptr() for v in values if v is not None}) == 1, field
    assert stacked["model.layers.0.mlp.experts.3.down_proj"].dead
    if method == "local_hessian":
        assert stacked["model.layers.1.mlp.experts.2.down_proj"].empty_blocks == 1  # of 2


def test_quantize_keeps_each_stacked_result_once():
    """The experts' quantizer buffers hold each expert's state (beta 1.0 in a dead expert's), and
    those of a projection whose experts all have one are the stacked search results themselves:
    no second copy of the block amaxes and betas."""
    model = small_moe(dead={0: (3,)})
    result = nd.quantize(model, nd.QuantConfig(method="local_hessian", dss=True), forward_loop(tokens()),
                         show_progress=False)
    for layer in (0, 1):
        experts = model.model.layers[layer].mlp.experts
        for pname in ("gate_up_proj", "down_proj"):
            for suffix in ("global_amax", "block_scale", "dss_beta_code"):
                buf = getattr(experts, f"{pname}_nvfp4_{suffix}")
                for e in range(4):
                    state = getattr(result.states[f"model.layers.{layer}.mlp.experts.{e}.{pname}"], suffix)
                    if state is None:  # the dead expert under DSS: the neutral beta
                        assert (layer, e, suffix) == (0, 3, "dss_beta_code")
                        assert bool((buf[e] == 100).all())  # beta 1.0 in hundredths
                        continue
                    assert torch.equal(buf[e], state), (layer, pname, suffix, e)
                    if layer == 1:  # every expert live: the buffer is the stacked result
                        assert state.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr(), (
                            pname, suffix, e)


@pytest.mark.parametrize("impl", ["grouped_mm", "eager", "batched_mm"])
def test_down_inputs_are_the_forwards_own_activations_where_it_gates_once(impl, monkeypatch):
    """Under transformers' grouped_mm the observer takes the activations the forward computed
    (no second GEMM); the eager loop and batched_mm's token order get them recomputed. Every
    implementation gives the same statistics, and the gate function is the class's again after."""
    from nvfp4_dist.parallel import hf_experts

    recomputed = []
    original = hf_experts.grouped_activations
    monkeypatch.setattr(hf_experts, "grouped_activations",
                        lambda *a, **k: recomputed.append(1) or original(*a, **k))
    ids = tokens()
    reference = small_moe(dead={0: (3,)})
    reference.set_experts_implementation("eager")
    model = small_moe(dead={0: (3,)})
    model.set_experts_implementation(impl)
    _, want = _stats(reference, nd.QuantConfig(), ids)
    recomputed.clear()
    inv, got = _stats(model, nd.QuantConfig(), ids)
    assert bool(recomputed) == (impl != "grouped_mm"), impl
    for slot in inv.slots:
        if slot.moe is None or want[slot.stats_key].tokens == 0:
            continue
        a, b = got[slot.stats_key], want[slot.stats_key]
        assert a.tokens == b.tokens and torch.equal(a.amax, b.amax), slot.name
        assert (a.hessian_sum - b.hessian_sum).abs().max() <= 1e-12 * b.hessian_sum.abs().max(), slot.name
    for layer in model.model.layers:
        assert "_apply_gate" not in vars(layer.mlp.experts)
