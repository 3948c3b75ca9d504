"""quantize() on transformers dense families beyond the embedded Qwen3: Llama."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nvfp4_dist as nd
from nvfp4_dist.calib.state import read_state


def test_llama_slots_fused_groups_and_forward():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, 128, (2, 16))
    before = model(tokens).logits
    result = nd.quantize(model, nd.QuantConfig(method="local_hessian"), lambda m: m(tokens),
                         show_progress=False)
    names = sorted(s.name.rsplit(".", 1)[-1] for s in result.slots)
    assert names == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    g = {n: read_state(getattr(attn, n), "weight")["global_amax"] for n in ("q_proj", "k_proj", "v_proj")}
    assert g["q_proj"] == g["k_proj"] == g["v_proj"]
    assert read_state(mlp.gate_proj, "weight")["global_amax"] == read_state(mlp.up_proj, "weight")["global_amax"]
    after = model(tokens).logits
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.2  # quantized, and still the same model
