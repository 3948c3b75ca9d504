"""transformers fused experts: slots per expert, per-expert statistics, saved names."""

import tempfile

import pytest
import torch

import nvfp4_dist as nd
from nvfp4_dist.calib.discover import discover
from nvfp4_dist.calib.stages import observe
from nvfp4_dist.errors import LayoutError
from nvfp4_dist.parallel.context import SINGLE_PROCESS
from nvfp4_dist.parallel.hf_experts import saved_expert_names
from moe_testutil import capture_expert_inputs, forward_loop, small_moe, tokens

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _expert_slots(inv):
    return [s for s in inv.slots if s.moe is not None]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_every_expert_gets_slots_named_as_save_pretrained_writes(model_type):
    model = small_moe(model_type)
    inv = discover(model, nd.QuantConfig(), SINGLE_PROCESS)
    slots = _expert_slots(inv)
    # 2 layers x 4 experts x (gate_up, down)
    assert len(slots) == 16
    assert sorted((s.moe.family, s.moe.index) for s in slots) == sorted(
        (f"model.layers.{l}.mlp.experts.{p}", e) for l in range(2) for p in ("gate_up_proj", "down_proj")
        for e in range(4))
    for s in slots:
        assert s.expert == s.moe.index and s.fused_group == s.name and s.layout.global_shape == tuple(
            s.parameter().shape[1:])
    # The export names and rows are those of the tensors save_pretrained writes, value for value.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        from safetensors.torch import load_file
        saved = load_file(f"{tmp}/model.safetensors")
    exported = {}
    for s in slots:
        w = s.parameter().detach()[s.expert]
        for part in s.parts():
            exported[part.name + ".weight"] = w[part.rows]
    saved_experts = {k: v for k, v in saved.items() if ".experts." in k}
    assert sorted(exported) == sorted(saved_experts)
    for key, value in exported.items():
        assert torch.equal(value, saved_experts[key]), key
    leaf = {"qwen3_moe": {"gate_proj", "up_proj", "down_proj"}, "mixtral": {"w1", "w2", "w3"}}[model_type]
    assert {k.split(".")[-2] for k in exported} == leaf


def test_interleaved_default_parts_and_unchanged_save():
    model = small_moe()
    experts = model.model.layers[0].mlp.experts
    # A module transformers would save fused (no conversion for a bare module) keeps the defaults.
    assert saved_expert_names(experts, "", experts) is None
    experts.is_concatenated = False
    slots = discover(model, nd.QuantConfig(), SINGLE_PROCESS).slots
    gate_up = next(s for s in slots if s.name == "model.layers.0.mlp.experts.1.gate_up_proj")
    assert [p.name for p in gate_up.parts()] == ["model.layers.0.mlp.experts.1.gate_proj",
                                                 "model.layers.0.mlp.experts.1.up_proj"]


def test_transposed_experts_are_refused_with_the_fix():
    model = small_moe()
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(LayoutError, match=r"model\.layers\.1\.mlp\.experts.*exclude"):
        discover(model, nd.QuantConfig(), SINGLE_PROCESS)


def _independent_stats(model, ids, route_all=False):
    """Per (module, expert): float64 Hessian sums, token count and amax of the gate_up and
    down_proj inputs, from an explicit loop written like transformers' eager experts."""
    out = {}
    for name, calls in capture_expert_inputs(model, ids).items():
        mod = model.get_submodule(name)
        for hidden, top_k in calls:
            for e in range(mod.num_experts):
                if route_all:
                    token_idx = torch.arange(hidden.shape[0])
                else:
                    _, token_idx = torch.where(top_k.T == e)
                    token_idx = torch.sort(token_idx).values
                x = hidden[token_idx]
                gate, up = torch.nn.functional.linear(x, mod.gate_up_proj[e].detach()).chunk(2, dim=-1)
                act = mod.act_fn(gate) * up
                for param, inp in (("gate_up_proj", x), ("down_proj", act)):
                    key = f"{name}.{e}.{param}.input"
                    xb = inp.double().reshape(inp.shape[0], inp.shape[1] // 16, 16)
                    h = torch.einsum("tbi,tbj->bij", xb, xb)
                    prev = out.get(key, (0, 0, torch.zeros(())))
                    amax = inp.abs().amax() if inp.numel() else torch.zeros(())
                    out[key] = (prev[0] + h, prev[1] + inp.shape[0], torch.maximum(prev[2], amax))
    return out


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("route_all", [False, True])
def test_per_expert_hessians_equal_an_independent_loop(model_type, impl, route_all):
    model = small_moe(model_type, experts_impl=impl, dead={0: (3,)})
    ids = tokens()
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    policy = nd.DeadExpertPolicy.ROUTE_ALL if route_all else nd.DeadExpertPolicy.WEIGHT_ONLY
    config = nd.QuantConfig(dead_experts=policy)
    inv = discover(model, config, SINGLE_PROCESS)
    outputs = []

    def loop(m):
        outputs.append(m(input_ids=ids).logits)

    store = observe(model, inv, config, loop)
    # Observation leaves the model's computation untouched, bit for bit.
    assert torch.equal(outputs[0], ref_logits)
    expected = _independent_stats(model, ids, route_all)
    expert_keys = {s.stats_key for s in _expert_slots(inv)}
    assert set(expected) == expert_keys
    for key in expert_keys:
        h_sum, count, amax = expected[key]
        stats = store[key]
        assert stats.tokens == count, key
        if count == 0:
            assert stats.hessian_sum is None
            continue
        # fp32 accumulation vs the float64 loop: relative to the Hessian's scale.
        scale = h_sum.abs().max()
        assert (stats.hessian_sum.double() - h_sum).abs().max() <= 1e-5 * scale, key
        assert torch.allclose(stats.amax.double(), amax.double(), rtol=1e-6, atol=0), key
    dead_tokens = store["model.layers.0.mlp.experts.3.gate_up_proj.input"].tokens
    assert dead_tokens == (ids.numel() if route_all else 0)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_saved_names_are_asked_once_per_kind_of_module(model_type, monkeypatch):
    """transformers is asked for the first two experts modules of a kind (the second checks the
    derivation by layer index); the others' names follow, equal to what it would answer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nvfp4_dist.parallel import hf_experts
    from moe_testutil import SMALL

    extra = (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64)
             if model_type == "qwen3_moe" else dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**SMALL, "num_hidden_layers": 4},
                                                                  **extra))
    modules = [(n, m) for n, m in model.named_modules() if hf_experts.is_fused_experts(m)]
    truth = {n: saved_expert_names(model, n, m) for n, m in modules}
    asked = []
    real = hf_experts.saved_expert_names
    monkeypatch.setattr(hf_experts, "saved_expert_names", lambda *a: asked.append(a[1]) or real(*a))
    for n, m in modules:
        assert hf_experts._same_parts(hf_experts.saved_expert_names_by_layer(model, n, m), truth[n]), n
    assert asked == [modules[0][0], modules[1][0]]
    assert "layers.3." in truth[modules[3][0]][("down_proj", 0)][0].name
