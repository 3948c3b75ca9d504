"""Layout arithmetic of the distributed adapters, in one process (no process group needed)."""

from __future__ import annotations

import types

import pytest
import torch

from nvfp4_dist.layout.slots import ShardLayout, WeightSlot
from nvfp4_dist.errors import LayoutError
from nvfp4_dist.parallel.context import ParallelContext, check_groups
from nvfp4_dist.parallel.invariance import float64_forward

megatron = pytest.importorskip("nvfp4_dist.parallel.megatron")
from nvfp4_dist.models.megatron_gpt import interleave_qkv  # noqa: E402


def _attn_config(heads=4, groups=2, hn=16):
    return types.SimpleNamespace(kv_channels=hn, num_query_groups=groups, num_attention_heads=heads)


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (8, 1)])
def test_qkv_export_rows_invert_the_interleave(heads, groups):
    hn, hidden = 16, 32
    q = torch.randn(heads * hn, hidden)
    k, v = torch.randn(groups * hn, hidden), torch.randn(groups * hn, hidden)
    fused = interleave_qkv(q, k, v, groups)
    parts = megatron.qkv_export_parts("model.layers.3.self_attn", _attn_config(heads, groups, hn))
    assert [p.name for p in parts] == [f"model.layers.3.self_attn.{x}_proj" for x in "qkv"]
    for part, original in zip(parts, (q, k, v)):
        assert torch.equal(fused[part.rows], original)
    rows = torch.cat([p.rows for p in parts])
    assert torch.equal(rows.sort().values, torch.arange(fused.shape[0]))  # a partition of the rows


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_glu_export_rows_follow_the_per_rank_halves(tp):
    ffn, hidden = 64, 8
    gate, up = torch.randn(ffn, hidden), torch.randn(ffn, hidden)
    fc1 = torch.cat([torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))])
    parts = megatron.glu_export_parts("model.layers.0.mlp", 2 * ffn, tp)
    assert torch.equal(fc1[parts[0].rows], gate) and torch.equal(fc1[parts[1].rows], up)


def test_hf_names_of_gpt_modules():
    cfg = types.SimpleNamespace(**vars(_attn_config()), gated_linear_unit=True)
    linear = types.SimpleNamespace(config=cfg, output_size=256)
    assert megatron.hf_export_parts("decoder.layers.1.self_attention.linear_proj", linear)[0].name == \
        "model.layers.1.self_attn.o_proj"
    assert megatron.hf_export_parts("module.decoder.layers.0.mlp.linear_fc2", linear)[0].name == \
        "model.layers.0.mlp.down_proj"
    assert megatron.hf_export_parts("output_layer", linear)[0].name == "lm_head"
    assert megatron.hf_export_parts("something.else", linear) == ()
    assert megatron.hf_state_key("decoder.layers.2.pre_mlp_layernorm.weight") == \
        "model.layers.2.post_attention_layernorm.weight"
    assert megatron.hf_state_key("embedding.word_embeddings.weight") == "model.embed_tokens.weight"


def test_row_parallel_shard_must_hold_whole_blocks(monkeypatch):
    monkeypatch.setattr(megatron, "tp_rank_size", lambda module: (1, 4))
    monkeypatch.setattr(megatron, "check_context_group", lambda name, module, ctx: "tp")
    module = types.SimpleNamespace(output_size=64, input_size=96)  # 96 / 4 = 24 channels per rank
    with pytest.raises(LayoutError, match=r"layers\.0\.mlp\.linear_fc2.*24 channels per rank.*multiple of 16"):
        megatron.row_layout("layers.0.mlp.linear_fc2", module, ParallelContext())
    module.input_size = 128
    layout = megatron.row_layout("layers.0.mlp.linear_fc2", module, ParallelContext())
    assert (layout.shard_axis, layout.offset, layout.local_shape) == (1, (0, 32), (64, 32))


def test_a_sharded_slot_needs_its_group_in_the_context():
    layout = ShardLayout.split((64, 32), 0, 1, 2, "tp")
    slot = WeightSlot(name="x.linear_qkv", module=torch.nn.Linear(32, 32), param_name="weight",
                      layout=layout, fused_group="x", stats_key="x")
    with pytest.raises(LayoutError, match=r"x\.linear_qkv \(group 'tp'\)"):
        check_groups([slot], ParallelContext())
    check_groups([slot], ParallelContext(groups={"tp": object()}))


def test_float64_forward_restores_dtypes_even_when_the_loop_raises():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def loop(m):
        seen.append({p.dtype for p in m.parameters()})
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        float64_forward(loop)(model)
    assert seen == [{torch.float64}]
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, before[key])
