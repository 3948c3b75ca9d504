"""GPTQ's sequential mode on cached layer inputs (nvfp4_dist/calib/layerwise.py): one forward
loop stopped at the first decoder layer, then each layer alone; the same states and W' as the
full-forward sequential mode bit for bit (CPU), the KV cache never replayed, and the fallbacks
to the full-forward path where running a layer alone is not valid."""

from __future__ import annotations

import warnings

import pytest
import torch

from small_model import small_hf_model, small_tokens

from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.calib import layerwise
from nvfp4_dist.calib.pipeline import layer_groups
from nvfp4_dist.parallel.context import SINGLE_PROCESS


def _counting_loop(tokens, calls, batch=4, **kwargs):
    def loop(model):
        calls.append(1)
        for i in range(0, tokens.shape[0], batch):
            model(tokens[i:i + batch], **kwargs)
    return loop


def _full_forward_only(monkeypatch):
    """The full-forward sequential path (one forward loop per layer group), for reference."""
    monkeypatch.setattr(layerwise, "decoder_stack", lambda model, inventory: ("reference run", None))


def _small_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nvfp4_dist.models.tiny import seeded_init_

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return seeded_init_(AutoModelForCausalLM.from_config(config, dtype=torch.float32), 3).eval()


def _tiny_dense():
    from nvfp4_dist.models.tiny import build_embedded

    return build_embedded("tiny-dense")


# (model builder, vocab, include patterns): the small Qwen3 whole with its lm_head (a module
# outside the decoder layers: one more full forward loop), tiny-dense and a 3-layer Llama on a
# few linears per layer (each layer's inputs still pass the quantized linears of the earlier ones)
CASES = {
    "qwen3+lm_head": (small_hf_model, 256, ("*proj", "lm_head")),
    "tiny-dense": (_tiny_dense, 1024, ("*.mlp.up_proj",)),
    "llama": (_small_llama, 256, ("*.mlp.down_proj", "*.self_attn.v_proj")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_inputs_equal_full_forward_bit_for_bit(case, monkeypatch):
    build, vocab, include = CASES[case]
    from nvfp4_dist.models.tiny import calibration_tokens

    tokens = calibration_tokens(vocab, 8, 16, 0)
    config = QuantConfig(method="gptq", gptq_sequential=True, include=include, exclude=())
    runs = {}
    for mode in ("cached", "full"):
        if mode == "full":
            _full_forward_only(monkeypatch)
        calls = []
        model = build()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning in either mode
            result = quantize(model, config, _counting_loop(tokens, calls), ctx=SINGLE_PROCESS, show_progress=False)
        runs[mode] = (model, result, len(calls))
    (cached, r_cached, n_cached), (full, r_full, n_full) = runs["cached"], runs["full"]
    groups = layer_groups(r_full.inventory)
    outside = int(any(layerwise.layer_index(n) is None for n in r_full.inventory.modules))
    assert n_full == len(groups) >= 2 and n_cached == 1 + outside, (n_full, n_cached)
    assert [s.name for s in r_cached.slots] == [s.name for s in r_full.slots]
    for slot in r_full.slots:
        a, b = r_cached.states[slot.name], r_full.states[slot.name]
        assert a.method == b.method and a.tokens == b.tokens, slot.name
        for field in ("block_scale", "global_amax", "input_amax"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (slot.name, field)
        assert torch.equal(cached.get_submodule(slot.name).weight, slot.module.weight), slot.name  # W'
        assert torch.equal(r_cached.statistics.of(slot).hessian(), r_full.statistics.of(slot).hessian())
    with torch.no_grad():
        assert torch.equal(cached(tokens).logits, full(tokens).logits)


def test_recording_stops_at_the_first_layer_and_drops_the_kv_cache():
    model = small_hf_model()
    tokens = small_tokens()
    later = []
    model.model.layers[1].register_forward_pre_hook(lambda *a: later.append(1))
    calls, autocast = layerwise.record_inputs(model, model.model.layers[0],
                                              _counting_loop(tokens, [], batch=2, use_cache=True))
    assert not later and autocast is None and len(calls) == 4  # nothing past layer 0 ran
    with torch.no_grad():
        embeddings = model.model.embed_tokens(tokens[:2])
    assert torch.equal(calls[0].args[0], embeddings)
    kwargs = calls[0].kwargs
    assert kwargs["use_cache"] is False and kwargs["cache"] is None
    assert "position_embeddings" in kwargs and "forward" not in vars(model)  # the model's forward restored
    # replaying a layer twice gives the same output: no cache grows between calls
    inputs = layerwise.CachedInputs(calls, autocast)
    layer = model.model.layers[0]
    with torch.no_grad():
        first = layer(*calls[0].args, **calls[0].kwargs)
        assert torch.equal(layer(*calls[0].args, **calls[0].kwargs), first)
    inputs.advance(layer)
    assert torch.equal(inputs.calls[0].args[0], first)


def test_loop_reading_outputs_falls_back_to_full_forwards():
    """A loop that uses the model's outputs cannot be stopped at the first layer: warned, and the
    full-forward path runs (one loop per layer group after the recording attempt)."""
    tokens = small_tokens()
    calls = []

    def loop(model):
        calls.append(1)
        for i in range(0, tokens.shape[0], 4):
            model(tokens[i:i + 4]).logits.sum()

    with pytest.warns(UserWarning, match="uses the model's outputs"):
        result = quantize(small_hf_model(), QuantConfig(method="gptq", gptq_sequential=True), loop,
                          ctx=SINGLE_PROCESS, show_progress=False)
    assert len(calls) == 1 + len(layer_groups(result.inventory))


def test_decoder_stack_found_or_refused_with_a_reason():
    from transformers import AutoModelForCausalLM, Qwen3Config

    from nvfp4_dist.calib.discover import discover

    model = small_hf_model()
    inventory = discover(model, QuantConfig(method="gptq"), SINGLE_PROCESS)
    prefix, stack = layerwise.decoder_stack(model, inventory)
    assert prefix == "model.layers" and stack is model.model.layers
    lm_head_only = discover(model, QuantConfig(method="gptq", include=("lm_head",), exclude=()), SINGLE_PROCESS)
    assert layerwise.decoder_stack(model, lm_head_only) == (
        "no module of the inventory lies in a numbered decoder layer", None)
    # alternating sliding-window / full attention: each kind gets its own mask
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, use_sliding_window=True,
                         sliding_window=8, max_window_layers=1, layer_types=["full_attention", "sliding_attention"])
    mixed = AutoModelForCausalLM.from_config(config)
    reason, stack = layerwise.decoder_stack(mixed, discover(mixed, QuantConfig(method="gptq"), SINGLE_PROCESS))
    assert stack is None and "different attention masks" in reason


def test_autocast_of_the_loop_is_recorded_and_replayed():
    """The layers run outside forward_loop: an autocast the loop entered is re-entered there."""
    model = small_hf_model()
    tokens = small_tokens()

    def loop(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(tokens[:2])

    calls, autocast = layerwise.record_inputs(model, model.model.layers[0], loop)
    assert autocast == ("cpu", torch.bfloat16) and len(calls) == 1
    layer = model.model.layers[0]
    with torch.no_grad():
        plain = layer(*calls[0].args, **calls[0].kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = layer(*calls[0].args, **calls[0].kwargs)
    inputs = layerwise.CachedInputs(calls, autocast)
    inputs.advance(layer)
    assert torch.equal(inputs.calls[0].args[0], expected) and not torch.equal(expected, plain)
