"""quantize() on single-process models: discovery, statistics, fused groups, fake-quant, errors."""

import warnings

import pytest
import torch
from torch import nn

import nvfp4_dist as nd
from nvfp4_dist.calib.state import read_state, read_state_values
from nvfp4_dist.models.tiny import build_embedded, calibration_tokens
from nvfp4_dist.numerics import nvfp4


def _loop(tokens, batch=4):
    def forward_loop(model):
        for i in range(0, tokens.shape[0], batch):
            model(tokens[i:i + batch])
    return forward_loop


@pytest.fixture(scope="module")
def tiny_tokens():
    return calibration_tokens(1024, 8, 32, seed=0)


class TwoLayer(nn.Module):
    def __init__(self, cin=64, hidden=32, cout=48, odd=None):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, cout)
        self.odd = nn.Linear(hidden, odd) if odd else None
        self.unused = nn.Linear(cin, 16)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + (self.odd(h).sum() if self.odd is not None else 0)


def test_tiny_dense_slots_groups_and_forward(tiny_tokens):
    model = build_embedded("tiny-dense", seed=0)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = nd.quantize(model, nd.QuantConfig(method="local_hessian", dss=True),
                         _loop(tiny_tokens), show_progress=False)
    names = [s.name for s in result.slots]
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)
    assert "lm_head" in result.ignored
    # q/k/v and gate/up share one global amax each, equal to the max over the members
    layer = model.model.layers[0]
    qkv = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    g = [read_state(m, "weight")["global_amax"] for m in qkv]
    assert g[0] == g[1] == g[2] == max(m.weight.abs().amax() for m in qkv)
    gu = [read_state(m, "weight")["global_amax"] for m in (layer.mlp.gate_proj, layer.mlp.up_proj)]
    assert gu[0] == gu[1]
    assert read_state(layer.mlp.down_proj, "weight")["global_amax"] == layer.mlp.down_proj.weight.abs().amax()
    # weights untouched; the forward uses the fake-quant images
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
    x = torch.randn(3, 256)
    st = read_state_values(layer.mlp.gate_proj, "weight")
    fq = nvfp4.fake_quant(layer.mlp.gate_proj.weight, st["block_amax"], st["global_amax"], st["dss_beta"])
    x_in = nvfp4.fake_quant_input(x, st["input_amax"])  # W4A4: the input is quantized as served
    with torch.no_grad():
        assert torch.equal(layer.mlp.gate_proj(x), x_in @ fq.T)
    assert isinstance(layer.mlp.gate_proj.weight, nn.Parameter)
    # report: searched losses never above max calibration's
    for row in result.layer_report():
        assert row.tokens == tiny_tokens.numel()
        assert row.hessian_loss <= row.hessian_loss_max
    assert "q_proj" in result.table()
    # the state is held once: the module buffers share storage with the returned result's
    for slot in result.slots:
        st, buffers = result.states[slot.name], read_state(slot.module, slot.param_name)
        assert buffers["block_scale"].data_ptr() == st.block_scale.data_ptr()
        assert buffers["dss_beta_code"].data_ptr() == st.dss_beta_code.data_ptr()


def test_hessian_matches_an_independent_computation(tiny_tokens):
    model = build_embedded("tiny-dense", seed=0)
    captured = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    from nvfp4_dist.calib.discover import discover
    from nvfp4_dist.calib.stages import observe
    from nvfp4_dist.parallel.context import SINGLE_PROCESS

    cfg = nd.QuantConfig()
    inv = discover(model, cfg, SINGLE_PROCESS)
    store = observe(model, inv, cfg, _loop(tiny_tokens))
    handle.remove()
    x = torch.cat(captured).double()
    xb = x.reshape(x.shape[0], -1, 16)
    expected = torch.einsum("nbi,nbj->bij", xb, xb) / x.shape[0]
    stats = store["model.layers.1.mlp.down_proj"]
    assert stats.tokens == x.shape[0]
    assert torch.allclose(stats.hessian().double(), expected, rtol=1e-5, atol=1e-7)
    assert stats.amax == x.abs().amax().float()
    # q/k/v read one input: a single statistics entry feeds all three
    assert "model.layers.0.self_attn.qkv.input" in store and "model.layers.0.self_attn.q_proj" not in store


def test_straight_through_gradient_reaches_weights():
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(16, 64)
    nd.quantize(model, nd.QuantConfig(method="mse", quantize_inputs=False), show_progress=False)
    model.train()
    model(x).square().mean().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0


def test_odd_input_dim_is_skipped_or_refused():
    torch.manual_seed(0)
    model = TwoLayer(hidden=24)  # fc2 has cin=24
    x = torch.randn(8, 64)
    with pytest.warns(UserWarning, match="fc2"):
        result = nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    assert "fc2" in result.ignored and "fc2" not in [s.name for s in result.slots]
    model(x)
    with pytest.raises(nd.LayoutError, match="fc2"):
        nd.quantize(TwoLayer(hidden=24), nd.QuantConfig(method="max", include=("fc2",), quantize_inputs=False),
                    show_progress=False)


def test_non_finite_weights_are_reported_all_at_once():
    model = TwoLayer()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
        model.fc2.weight[1, 1] = float("inf")
    with pytest.raises(nd.LayoutError) as err:
        nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    assert "fc1" in str(err.value) and "fc2" in str(err.value)


def test_all_zero_weight_gets_valid_scales():
    model = TwoLayer()
    with torch.no_grad():
        model.fc2.weight.zero_()
    x = torch.randn(8, 64)
    nd.quantize(model, nd.QuantConfig(method="local_hessian", exclude=("unused",)), lambda m: m(x),
                show_progress=False)
    st = read_state_values(model.fc2, "weight")
    scale = nvfp4.scale_fp8(st["block_amax"], st["global_amax"]).float()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(model.fc2(torch.relu(model.fc1(x))), model.fc2.bias.expand(8, 48))


def test_unreached_weight_falls_back_to_mse_and_is_reported():
    model = TwoLayer()
    x = torch.randn(8, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = nd.quantize(model, nd.QuantConfig(method="local_hessian", quantize_inputs=False),
                             lambda m: m(x), show_progress=False)
    assert result.dead == ["unused"]
    assert any("unused" in str(w.message) for w in caught)
    st = result.states["unused"]
    assert st.method is nd.Method.MSE and st.tokens == 0 and st.input_amax is None
    assert "dead" in result.table()


def test_unreached_dense_weight_is_refused_for_w4a4():
    """An input scale needs data: a dense layer no calibration token reached is refused by name
    under W4A4 (MoE experts have their documented dead-expert policy instead)."""
    model = TwoLayer()
    x = torch.randn(8, 64)
    with pytest.raises(nd.CalibrationError, match=r"no calibration token reached unused: .*--weight-only"):
        nd.quantize(model, nd.QuantConfig(method="local_hessian"), lambda m: m(x), show_progress=False)
    with pytest.raises(nd.CalibrationError, match=r"no calibration token reached fc1, fc2, unused"):
        nd.quantize(TwoLayer(), nd.QuantConfig(method="max"), lambda m: None, show_progress=False)


def test_config_errors():
    with pytest.raises(nd.ConfigError, match="dss"):
        nd.QuantConfig(method="mse", dss=True)
    with pytest.raises(nd.ConfigError, match="method"):
        nd.QuantConfig(method="best")
    with pytest.raises(nd.ConfigError, match="forward_loop"):
        nd.quantize(TwoLayer(), nd.QuantConfig(method="local_hessian"))


def test_overflowing_calibration_forward_is_refused_by_name():
    """A finite but huge weight overflows the forward; the run stops naming the layers whose
    statistics went non-finite, instead of writing NaN input scales."""
    model = nn.Sequential()
    model.add_module("up", nn.Linear(16, 32, bias=False))
    model.add_module("down", nn.Linear(32, 16, bias=False))
    with torch.no_grad():
        model.up.weight[0, 0] = 3e38
    x = torch.full((4, 16), 2.0)
    with pytest.raises(nd.CalibrationError, match=r"non-finite inputs .*: down\b"):
        nd.quantize(model, nd.QuantConfig(method="local_hessian"), lambda m: m(x), show_progress=False)


def test_a_sibling_zeroed_by_a_huge_shared_scale_is_refused():
    """One 1e30 in k_proj would set q/k/v's shared global scale so high that q_proj and v_proj
    quantize to zero: refused with their names instead of exported silently."""
    model = build_embedded("tiny-dense", seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = 1e30
    with pytest.raises(nd.CalibrationError, match=r"(?s)self_attn.q_proj .*self_attn.v_proj"):
        nd.quantize(model, nd.QuantConfig(method="mse", quantize_inputs=False), show_progress=False)


def test_inputs_that_are_always_zero_fall_back_to_the_weight_only_search():
    """A linear whose inputs are always zero has an all-zero Hessian: every scale ties under the
    Hessian objective, which would pick the smallest and zero the weight. It is searched with
    the MSE objective instead; so are single blocks whose inputs are always zero."""
    from nvfp4_dist.kernels.dispatch import search_block_scales

    torch.manual_seed(0)
    weight = torch.randn(32, 64) * 0.02
    expected = search_block_scales(weight, weight.abs().amax(), "mse").block_amax
    x = torch.randn(64, 64)
    x[:, 16:32] = 0.0  # block 1 of every token is zero
    for inputs, empty in ((torch.zeros(8, 64), 4), (x, 1)):
        model = nn.Sequential()
        model.add_module("fc", nn.Linear(64, 32, bias=False))
        with torch.no_grad():
            model.fc.weight.copy_(weight)
        result = nd.quantize(model, nd.QuantConfig(method="local_hessian", dss=True),
                             lambda m, inputs=inputs: m(inputs), show_progress=False)
        state = result.states["fc"]
        assert state.empty_blocks == empty
        assert torch.equal(state.block_amax()[:, 1], expected[:, 1])
        if empty == 4:  # the whole weight: searched weight-only, like a weight no token reached
            assert state.method.value == "mse" and torch.equal(state.block_amax(), expected)
        else:
            assert state.method.value == "local_hessian"
            assert torch.equal(state.dss_beta()[:, 1], torch.ones(32))
        assert result.layer_report()[0].rel_error < 0.2
