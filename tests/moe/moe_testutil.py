"""Small transformers MoE models for the MoE tests (seeded, CPU, a few ms per forward)."""

from __future__ import annotations

import torch

from nvfp4_dist.models.tiny import make_dead_experts, seeded_init_

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=64)


def small_moe(model_type: str = "qwen3_moe", experts_impl: str = "grouped_mm", seed: int = 0,
              dead: dict | None = None, num_experts: int = 4):
    """A 2-layer MoE causal LM (hidden 64, 4 experts, top-2, expert intermediate 32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "qwen3_moe":
        extra = dict(num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=32,
                     intermediate_size=64, norm_topk_prob=True)
    else:
        extra = dict(num_local_experts=num_experts, num_experts_per_tok=2, intermediate_size=32)
    cfg = AutoConfig.for_model(model_type, **SMALL, **extra)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    seeded_init_(model, seed)
    if dead is not None:
        make_dead_experts(model, dead)
    model.set_experts_implementation(experts_impl)
    return model.eval()


def tokens(samples: int = 4, seq_len: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (samples, seq_len), generator=gen)


def forward_loop(ids: torch.Tensor, batch: int = 2):
    def loop(model):
        for start in range(0, ids.shape[0], batch):
            model(input_ids=ids[start:start + batch])
    return loop


def capture_expert_inputs(model, ids: torch.Tensor, batch: int = 2) -> dict:
    """experts-module name -> list of (hidden_states, top_k_index) the module received."""
    seen: dict = {}
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts"):
            def hook(mod, args, kwargs, name=name):
                seen.setdefault(name, []).append((args[0].detach().clone(), args[1].clone()))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        forward_loop(ids, batch)(model)
    for h in handles:
        h.remove()
    return seen
