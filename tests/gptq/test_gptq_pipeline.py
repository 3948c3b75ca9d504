"""quantize(method="gptq") end to end in one process: config, the written weights, the state,
sequential mode (one layer group's full Hessians at a time), the refusal of channel splits
outside tensor parallelism, and a quality check on the embedded tiny-dense."""

from __future__ import annotations

import warnings

import pytest
import torch

from small_model import small_hf_model, small_tokens

from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.calib import stages
from nvfp4_dist.calib.discover import Inventory, discover
from nvfp4_dist.calib.pipeline import layer_groups
from nvfp4_dist.cli import build_parser
from nvfp4_dist.errors import ConfigError, LayoutError
from nvfp4_dist.kernels.gptq import block_hessians
from nvfp4_dist.kernels.types import Method
from nvfp4_dist.layout.roles import GroupRole
from nvfp4_dist.layout.slots import ShardLayout, WeightSlot
from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.parallel.context import SINGLE_PROCESS


def _loop(tokens):
    return lambda model: [model(tokens[i:i + 4]) for i in range(0, tokens.shape[0], 4)]


def _full_hessians(model, config, loop) -> dict[str, torch.Tensor]:
    """slot name -> the normalised full input Hessian GPTQ uses (one-shot: the unquantized
    model's), observed on ``model`` (left unchanged): quantize() keeps only the 16x16 diagonal
    blocks once a key's factor is taken."""
    inventory = discover(model, config, SINGLE_PROCESS)
    store = stages.observe(model, inventory, config, loop)
    return {s.name: store[s.stats_key].full_hessian() for s in inventory.slots}


def _out_err(w, q, h):
    d = w.double() - q.double()
    return float(torch.einsum("ri,ij,rj->", d, h, d))


def test_config_and_cli():
    c = QuantConfig(method="gptq")
    assert c.method is Method.GPTQ and c.needs_hessian and c.needs_full_hessian
    assert c.gptq_scales is Method.LOCAL_HESSIAN and c.gptq_scale_timing.value == "group" and c.gptq_damp == 0.01
    QuantConfig(method="gptq", gptq_scales="local_hessian", gptq_scale_timing="before", gptq_sequential=True)
    with pytest.raises(ConfigError, match="gptq_scales"):
        QuantConfig(method="gptq", gptq_scales="max")
    with pytest.raises(ConfigError, match="dss"):
        QuantConfig(method="gptq", dss=True)
    with pytest.raises(ConfigError, match="gptq_sequential"):
        QuantConfig(method="mse", gptq_sequential=True)
    with pytest.raises(ConfigError, match="gptq_damp"):
        QuantConfig(method="gptq", gptq_damp=-1.0)
    with pytest.raises(ConfigError, match="gptq_scale_timing"):
        QuantConfig(method="gptq", gptq_scale_timing="later")
    parser = build_parser()
    args = parser.parse_args(["quantize", "--model", "tiny-dense", "--method", "gptq", "--format", "modelopt",
                              "--out", "/tmp/x"])
    assert args.method == "gptq"


@pytest.fixture(scope="module")
def small_run():
    model = small_hf_model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = small_tokens()
    hessians = _full_hessians(small_hf_model(), QuantConfig(method="gptq"), _loop(tokens))
    result = quantize(model, QuantConfig(method="gptq"), _loop(tokens), ctx=SINGLE_PROCESS, show_progress=False)
    return model, original, result, tokens, hessians


def test_weights_hold_gptq_result_and_state_reproduces_q(small_run):
    model, original, result, tokens, hessians = small_run
    for slot in result.slots:
        state = result.states[slot.name]
        assert state.method is Method.GPTQ
        w = slot.module.weight.detach()
        assert not torch.equal(w, original[slot.name + ".weight"]), slot.name  # W' was written
        assert torch.equal(slot.module.weight_nvfp4_block_scale, state.block_scale)
        h = hessians[slot.name]
        assert h.shape == (w.shape[1], w.shape[1])
        # what the run keeps: the diagonal blocks of that Hessian
        assert torch.equal(result.statistics.of(slot).hessian(), block_hessians(h))
        q = nvfp4.fake_quant(w, state.block_amax(), state.global_amax)
        # GPTQ lowers the layer output error against the original weight vs RTN of the same weight
        w0 = original[slot.name + ".weight"]
        rtn = nvfp4.fake_quant(w0, stages.search_block_scales(w0, state.global_amax, Method.MSE).block_amax,
                               state.global_amax)
        assert _out_err(w0, q, h) < _out_err(w0, rtn, h), slot.name
    # the forward computes with the fake-quant image of W' (the state), global amax unchanged
    slot = result.slots[0]
    assert float(result.states[slot.name].global_amax) > 0
    with torch.no_grad():
        model(tokens[:2])


def test_fused_siblings_share_the_full_hessian(small_run):
    _, _, result, _, hessians = small_run
    keys = {s.name: s.stats_key for s in result.slots}
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert keys[q] == keys[k] and torch.equal(hessians[q], hessians[k])
    # factorised once for both, the full sum then dropped: the statistics keep the 16x16 blocks
    kept = result.statistics.inputs[keys[q]]
    assert not kept.full and kept.hessian_sum.shape == (hessians[q].shape[0] // 16, 16, 16)


def test_sequential_layer_by_layer():
    tokens = small_tokens()
    plain = quantize(small_hf_model(), QuantConfig(method="gptq"), _loop(tokens), ctx=SINGLE_PROCESS,
                     show_progress=False)
    calls = []

    def counting(model):
        calls.append(1)
        _loop(tokens)(model)

    model = small_hf_model()
    seq = quantize(model, QuantConfig(method="gptq", gptq_sequential=True), counting, ctx=SINGLE_PROCESS,
                   show_progress=False)
    groups = layer_groups(seq.inventory)
    # one forward loop, stopped at layer 0; the layers then run alone on the cached inputs
    # (tests/gptq/test_layerwise.py: bit for bit the one-loop-per-group path)
    assert len(calls) == 1 and len(groups) == 2
    for slot in seq.slots:
        # one layer group's full Hessians at a time: afterwards only their diagonal blocks remain
        assert not seq.statistics.of(slot).full and seq.statistics.of(slot).full_hessian() is None
        h_plain = plain.statistics.of(slot).hessian()
        h_seq = seq.statistics.of(slot).hessian()
        assert torch.equal(seq.statistics.of(slot).blocks_only().hessian(), h_seq)
        if ".layers.0." in slot.name:
            if "q_proj" in slot.name:  # layer 0's inputs are the embeddings' in both runs
                assert torch.equal(h_seq, h_plain)
            if "down_proj" not in slot.name and "o_proj" not in slot.name:
                assert torch.equal(seq.states[slot.name].block_amax(), plain.states[slot.name].block_amax())
        else:  # layer 1 saw the outputs of the quantized layer 0
            assert not torch.equal(h_seq, h_plain), slot.name
        assert seq.states[slot.name].method is Method.GPTQ


def test_channel_split_outside_tensor_parallel_refused_by_name():
    """Megatron's dense row-parallel linears (split over TP) run GPTQ in rank order
    (tests/gptq/test_gptq_distributed.py); weights split along cin over another group (expert
    tensor parallel, FSDP2 Shard(1)) have no whole-input observer and are refused by name."""
    layer = torch.nn.Linear(32, 8, bias=False)

    def slot(name, role):
        return WeightSlot(name=name, module=layer, param_name="weight", stats_key=name, fused_group=name,
                          layout=ShardLayout.split((8, 64), 1, 0, 2, role))

    dense = Inventory((slot("decoder.layers.3.mlp.linear_fc2", GroupRole.TP),), {})
    stages.check_gptq_layouts(dense, QuantConfig(method="gptq"))
    expert = Inventory((slot("decoder.layers.1.mlp.experts.local_experts.2.linear_fc2", GroupRole.ETP),), {})
    with pytest.raises(LayoutError, match=r"not supported.*local_experts\.2\.linear_fc2"):
        stages.check_gptq_layouts(expert, QuantConfig(method="gptq"))
    stages.check_gptq_layouts(expert, QuantConfig(method="local_hessian"))


def test_tiny_dense_quality():
    """Embedded tiny-dense, layer 0's up_proj (fast): GPTQ cuts the layer output error of the
    MSE scale search by more than 40% and lowers the model's logit error."""
    import copy

    from nvfp4_dist.models.tiny import build_embedded, calibration_tokens

    tokens = calibration_tokens(1024, 16, 32, 0)
    evaluation = calibration_tokens(1024, 8, 32, 7)
    reference = build_embedded("tiny-dense")
    with torch.no_grad():
        ref_logits = reference(evaluation).logits
    include = ("model.layers.0.mlp.up_proj",)
    errors, logit_errors = {}, {}
    original = {n: p.detach().clone() for n, p in reference.named_parameters()}
    config = QuantConfig(method="gptq", include=include, quantize_inputs=False)
    hessians = _full_hessians(copy.deepcopy(reference), config, _loop(tokens))
    for method in ("gptq", "mse"):
        model = copy.deepcopy(reference)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = quantize(model, QuantConfig(method=method, include=include, quantize_inputs=False),
                         _loop(tokens), ctx=SINGLE_PROCESS, show_progress=False)
        errors[method] = sum(
            _out_err(original[s.name + ".weight"],
                     nvfp4.fake_quant(s.module.weight.detach(), r.states[s.name].block_amax(),
                                      r.states[s.name].global_amax), hessians[s.name])
            for s in r.slots)
        with torch.no_grad():
            logit_errors[method] = float((model(evaluation).logits - ref_logits).square().mean())
    assert errors["gptq"] < 0.6 * errors["mse"], errors
    assert logit_errors["gptq"] < logit_errors["mse"], logit_errors
