"""A small Qwen3-style HF model for the distributed tests (the embedded tiny-dense, scaled down
so that the reference searches of four methods at three layouts fit the CI budget).

Shapes are chosen so that TP=4 still gives every rank whole 16-channel blocks: hidden 64
(o_proj input 64 / 4 = 16), intermediate 128 (down_proj input 128 / 4 = 32), 4 query heads in
2 groups of head_dim 16.
"""

from __future__ import annotations

import torch

from nvfp4_dist.models.tiny import calibration_tokens, seeded_init_

VOCAB = 256


def small_hf_model(seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attention_bias=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return seeded_init_(model, seed).eval()


def small_tokens(samples: int = 8, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return calibration_tokens(VOCAB, samples, seq_len, seed)
