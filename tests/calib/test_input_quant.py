"""W4A4 as served: after quantize(quantize_inputs=True) a linear computes with fake-quant weights
AND inputs (dynamic per-16 block scales under the static input scale), straight-through for both;
weight-only keeps full-precision inputs; a restored state computes the same."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nvfp4_dist as nd
from nvfp4_dist.calib.restore import clear_quantizer_state
from nvfp4_dist.calib.state import read_state, read_state_values
from nvfp4_dist.numerics import nvfp4


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 48)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _quantized(quantize_inputs: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = TwoLayer()
    data = torch.randn(6, 5, 64)
    nd.quantize(model, nd.QuantConfig(method="mse", quantize_inputs=quantize_inputs),
                lambda m: m(data), show_progress=False)
    return model


def _fq_weight(module):
    st = read_state_values(module, "weight")
    return nvfp4.fake_quant(module.weight.detach(), st["block_amax"], st["global_amax"])


@pytest.mark.parametrize("quantize_inputs", [True, False], ids=["w4a4", "w4a16"])
def test_linear_computes_with_quantized_input_and_weight(quantize_inputs):
    model = _quantized(quantize_inputs)
    fc = model.fc1
    st = read_state(fc, "weight")
    assert ("input_amax" in st) == quantize_inputs
    x = torch.randn(2, 7, 64) * 1.5  # 3-D [batch, seq, hidden]
    with torch.no_grad():
        got = fc(x)
    x_in = nvfp4.fake_quant_input(x, st["input_amax"]) if quantize_inputs else x
    assert torch.equal(got, F.linear(x_in, _fq_weight(fc), fc.bias))
    if quantize_inputs:
        assert not torch.equal(x_in, x)  # the input really is quantized
        # keyword input, and a full-model forward that chains the quantized layers
        with torch.no_grad():
            assert torch.equal(fc(input=x), got)
            h = torch.relu(got)
            want = F.linear(nvfp4.fake_quant_input(h, read_state(model.fc2, "weight")["input_amax"]),
                            _fq_weight(model.fc2), model.fc2.bias)
            assert torch.equal(model(x), want)


def test_straight_through_for_input_and_weight():
    """Gradients are those of the images: d x = dy @ fq(W), d W = dy^T fq(x)."""
    model = _quantized(True)
    fc = model.fc1
    x = (torch.randn(3, 4, 64) * 2).requires_grad_()
    dy = torch.randn(3, 4, 32)
    fc(x).backward(dy)
    x_img = nvfp4.fake_quant_input(x.detach(), read_state(fc, "weight")["input_amax"])
    assert torch.allclose(x.grad, dy @ _fq_weight(fc), rtol=1e-6, atol=1e-6)
    assert torch.allclose(fc.weight.grad, dy.reshape(-1, 32).t() @ x_img.reshape(-1, 64), rtol=1e-5, atol=1e-5)
    # an input without requires_grad still trains the weight, through the quantized input
    fc.weight.grad = None
    fc(x.detach()).backward(dy)
    assert torch.allclose(fc.weight.grad, dy.reshape(-1, 32).t() @ x_img.reshape(-1, 64), rtol=1e-5, atol=1e-5)


def test_restored_state_quantizes_inputs_the_same():
    model = _quantized(True)
    fresh = TwoLayer()
    nd.init_quantizer_state(fresh, nd.QuantConfig(method="mse", quantize_inputs=True))
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.isnan(fresh(x)).all()  # NaN state until loaded: fails loudly
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), model(x))
    clear_quantizer_state(fresh)  # plain model again: full-precision inputs and weights
    with torch.no_grad():
        assert torch.equal(fresh(x), F.linear(torch.relu(F.linear(x, fresh.fc1.weight, fresh.fc1.bias)),
                                              fresh.fc2.weight, fresh.fc2.bias))


def _small_moe(experts_impl="grouped_mm"):
    from transformers import AutoConfig, AutoModelForCausalLM

    from nvfp4_dist.models.tiny import seeded_init_

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                               max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32, intermediate_size=64, norm_topk_prob=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    seeded_init_(model, 0)
    model.set_experts_implementation(experts_impl)
    return model.eval()


@pytest.mark.parametrize("quantize_inputs", [True, False], ids=["w4a4", "w4a16"])
def test_fused_experts_quantize_each_experts_inputs_with_its_scale(quantize_inputs):
    """Expert e computes act(fq_in(x_e; a_e) fq(W_gu[e])^T) then fq_in(., a'_e) fq(W_d[e])^T with
    its own static input amaxes a_e, a'_e (what the engines' per-expert input scales mean);
    weight-only keeps the module's own forward."""
    model = _small_moe()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=quantize_inputs),
                lambda m: m(input_ids=ids), show_progress=False)
    experts = model.model.layers[0].mlp.experts
    assert ("forward" in vars(experts)) == quantize_inputs
    gu, down = read_state_values(experts, "gate_up_proj"), read_state_values(experts, "down_proj")
    if quantize_inputs:
        assert gu["input_amax"].shape == (4,) and len(set(down["input_amax"].tolist())) == 4  # per expert
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 64, generator=gen)
    top_k = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=gen)
    with torch.no_grad():
        got = experts(hidden, top_k, weights)
    w_gu = torch.stack([nvfp4.fake_quant(experts.gate_up_proj[e].detach(), gu["block_amax"][e], gu["global_amax"][e])
                        for e in range(4)])
    w_d = torch.stack([nvfp4.fake_quant(experts.down_proj[e].detach(), down["block_amax"][e], down["global_amax"][e])
                       for e in range(4)])
    want = torch.zeros_like(hidden)
    for t in range(10):
        for j in range(2):
            e = int(top_k[t, j])
            x = hidden[t:t + 1]
            x = nvfp4.fake_quant_input(x, gu["input_amax"][e]) if quantize_inputs else x
            gate, up = F.linear(x, w_gu[e]).chunk(2, dim=-1)
            h = F.silu(gate) * up
            h = nvfp4.fake_quant_input(h, down["input_amax"][e]) if quantize_inputs else h
            want[t] += (F.linear(h, w_d[e]) * weights[t, j])[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    if quantize_inputs:  # gradients flow straight through to the hidden states and the weights
        h = hidden.clone().requires_grad_()
        experts(h, top_k, weights).sum().backward()
        assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
        assert experts.gate_up_proj.grad is not None and experts.down_proj.grad.abs().sum() > 0
        clear_quantizer_state(model)
        assert "forward" not in vars(experts)
