"""A Megatron-core MoE GPT (SequentialMLP experts) built from a Hugging Face Qwen3-MoE model.

Attention, norms and embeddings convert as in :mod:`nvfp4_dist.models.megatron_gpt` (its
``hf_to_megatron`` with ``dense_mlp=False``). Every decoder layer's MLP is an MoE layer:

* router ``mlp.router.weight [E, hidden]`` = HF ``mlp.gate.weight``; softmax scores, top-k, the
  k chosen probabilities renormalised (Megatron: top-k of the logits then a softmax over them,
  the same choice and weights as HF's ``norm_topk_prob``); no load balancing, no aux loss.
* expert ``g`` (global index) lives on expert-parallel rank ``g // (E / ep)`` as
  ``mlp.experts.local_experts.{g % (E / ep)}`` with ``linear_fc1 = [gate_g; up_g]`` (rows of HF
  ``gate_up_proj[g]``, already in that order) and ``linear_fc2 = down_proj[g]``.
* tokens reach the experts through the all-gather dispatcher: collectives gloo and NCCL both
  carry, and no CUDA streams (megatron-core 0.16's all-to-all dispatcher creates one at
  construction, so it cannot be built on a CPU-only machine).

Every EP size gets the same full weights, so calibrations at EP=1 and EP=2 start from identical
numbers (the basis of the EP-invariance test).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ModelLoadError
from .megatron_gpt import (LAYER_PREFIX, check_pipeline_split, hf_to_megatron, load_converted_state, megatron_config,
                           stage_state)


def check_router_usable() -> None:
    """Raise when this megatron-core cannot run an MoE router: 0.16.x refers to
    ``moe_utils.te_general_gemm`` in every router forward but defines it only when
    TransformerEngine imports, so without TransformerEngine each routed forward raises NameError."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        from importlib.metadata import version

        raise ModelLoadError(
            f"megatron-core {version('megatron-core')} cannot route MoE tokens without "
            "TransformerEngine (its router forward reads moe_utils.te_general_gemm, which is only "
            "defined when transformer_engine imports); install transformer-engine, or a "
            "megatron-core release that defines te_general_gemm = None without it")


def _moe_fields(hf_config) -> dict:
    experts = getattr(hf_config, "num_experts", 0)
    if not experts or getattr(hf_config, "mlp_only_layers", []) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
        raise ModelLoadError("the Megatron MoE builder needs a Qwen3-MoE-style config with an MoE MLP "
                             "in every layer (num_experts > 0, decoder_sparse_step 1, no mlp_only_layers)")
    if not getattr(hf_config, "norm_topk_prob", True):
        raise ModelLoadError("norm_topk_prob=False routers are not converted (Megatron renormalises "
                             "the top-k probabilities)")
    return dict(num_moe_experts=experts, moe_router_topk=hf_config.num_experts_per_tok,
                moe_ffn_hidden_size=hf_config.moe_intermediate_size)


def megatron_moe_config(hf_config, tp: int, ep: int, dtype: torch.dtype = torch.float32, pp: int = 1):
    """The dense GPT config of :func:`megatron_config` with MoE layers as described above."""
    base = megatron_config(hf_config, tp, dtype=dtype, dense_mlp=False, pp=pp)
    return dataclasses.replace(
        base, **_moe_fields(hf_config), expert_model_parallel_size=ep,
        moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False)


def hf_to_megatron_moe(hf_state: dict[str, torch.Tensor], hf_config, tp_rank: int, tp_size: int,
                       ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """This (TP, EP) rank's Megatron MoE GPT state dict from a full HF Qwen3-MoE state dict."""
    moe = _moe_fields(hf_config)
    experts = moe["num_moe_experts"]
    if experts % ep_size:
        raise ModelLoadError(f"num_experts={experts} is not divisible by the expert-parallel size {ep_size}")
    if tp_size != 1:
        raise ModelLoadError("the Megatron MoE builder supports tensor-parallel size 1 (experts are "
                             "split by expert parallelism only)")
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in hf_state
    out = hf_to_megatron(hf_state, hf_config, tp_rank, tp_size, qk_layernorm=qk_norm, dense_mlp=False)
    local = experts // ep_size
    for i in range(hf_config.num_hidden_layers):
        hf, mg = f"model.layers.{i}.mlp.", f"{LAYER_PREFIX}.{i}.mlp."
        out[mg + "router.weight"] = hf_state[hf + "gate.weight"]
        for j in range(local):
            g = ep_rank * local + j
            out[mg + f"experts.local_experts.{j}.linear_fc1.weight"] = hf_state[hf + "experts.gate_up_proj"][g]
            out[mg + f"experts.local_experts.{j}.linear_fc2.weight"] = hf_state[hf + "experts.down_proj"][g]
    return out


def build_megatron_moe_gpt(hf_model: nn.Module, dtype: torch.dtype | None = None,
                           device: str | torch.device = "cpu") -> nn.Module:
    """A Megatron-core ``GPTModel`` with SequentialMLP MoE layers (local spec) holding this rank's
    experts of ``hf_model`` (under pipeline parallelism: this stage's layers); eval mode. Needs
    ``parallel_state`` initialised with the EP size (:func:`nvfp4_dist.launch.init_megatron` with
    ``ep=``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if not ps.model_parallel_is_initialized():
        raise ModelLoadError("megatron parallel_state is not initialised: call "
                             "nvfp4_dist.launch.init_megatron(tp=..., ep=...) first")
    check_router_usable()
    cfg = hf_model.config
    hf_state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in hf_state
    dtype = dtype or next(hf_model.parameters()).dtype
    tp, ep = ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_pipeline_split(cfg.num_hidden_layers, pp)
    config = megatron_moe_config(cfg, tp, ep, dtype, pp=pp)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    qk_layernorm=qk_norm, normalization="RMSNorm")
    rope = getattr(cfg, "rope_parameters", None) or {}
    model = GPTModel(config, spec, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                     position_embedding_type="rope",
                     rotary_base=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
                     share_embeddings_and_output_weights=bool(cfg.tie_word_embeddings),
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    full = hf_to_megatron_moe(hf_state, cfg, ps.get_tensor_model_parallel_rank(), tp,
                              ps.get_expert_model_parallel_rank(), ep)
    load_converted_state(model, stage_state(model, full))  # this pipeline stage's layers
    return model.to(device).eval()
