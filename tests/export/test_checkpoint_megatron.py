"""Quantizer state through megatron-core's dist_checkpointing (real megatron-core, gloo, two
processes): saved at one TP/EP layout, restored into a fresh model at another, bit for bit.

* GPT: ``local_hessian`` + DSS at TP=2, saved; restored at TP=1 (block amax, DSS betas, global
  and input amax, fake-quant weights gathered per HF module: identical); that TP=1 model (two
  data-parallel replicas) saved again and restored at TP=2 through the plain Megatron flow, whose
  fake-quant forward gives the original logits.
* a checkpoint without quantizer state, or with DSS betas the model does not expect, is
  refused by ``load_megatron_checkpoint`` before any read, naming the keys.
* MoE SequentialMLP: local_hessian + DSS at EP=2 with dead experts (weight-only, beta 1.0, so the
  stacked expert tensors are fully covered), restored at EP=1: every expert's
  state identical under its global index, and the checkpoint's keys carry no local index.
* CLI ``--save-dist-ckpt``: the TP=2 run's checkpoint restored at TP=1 equals its HF export.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from checkpoint_testutil import allow_megatron_save_in_worker, differences, slot_records  # noqa: E402
from harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

GPT_CONFIG = dict(method="local_hessian", dss=True)


def _logits(model, tokens):
    from nvfp4_dist.models.megatron_gpt import causal_mask

    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=causal_mask(tokens.shape[1], "cpu")).clone()


def _gpt_worker(root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from small_model import small_hf_model, small_tokens

    from nvfp4_dist import QuantConfig, init_quantizer_state, load_megatron_checkpoint, quantize
    from nvfp4_dist.errors import ExportError
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
    from nvfp4_dist.parallel.invariance import float64_forward

    allow_megatron_save_in_worker()
    init_distributed(timeout_s=120)
    hf, tokens = small_hf_model(), small_tokens()
    config = QuantConfig(**GPT_CONFIG)
    tp2_dir, tp1_dir, plain_dir = f"{root}/tp2", f"{root}/tp1", f"{root}/plain"
    for path in (tp2_dir, tp1_dir, plain_dir):
        os.makedirs(path, exist_ok=True)

    ctx = init_megatron(2, timeout_s=120, data_split=False)
    model = build_megatron_gpt(hf)
    result = quantize(model, config, float64_forward(megatron_forward_loop(tokens, 2)), ctx=ctx,
                      show_progress=False)
    original = slot_records(result.slots, ctx)
    logits = _logits(model, tokens[:2])
    dist_checkpointing.save(model.sharded_state_dict(), tp2_dir)
    metadata = {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(tp2_dir).items()}

    ctx = init_megatron(1, timeout_s=120, data_split=False)
    fresh = build_megatron_gpt(hf)
    inv = init_quantizer_state(fresh, config, ctx)
    load_megatron_checkpoint(fresh, tp2_dir)
    at_tp1 = slot_records(inv.slots, ctx)
    no_dss = build_megatron_gpt(hf)
    init_quantizer_state(no_dss, QuantConfig(method="local_hessian"), ctx)
    try:
        load_megatron_checkpoint(no_dss, tp2_dir)
        mismatch = None
    except ExportError as exc:
        mismatch = str(exc)
    dist_checkpointing.save(fresh.sharded_state_dict(), tp1_dir)  # TP=1 x DP=2: replicas write once
    dist_checkpointing.save(build_megatron_gpt(hf).sharded_state_dict(), plain_dir)  # no quantizer state
    try:
        load_megatron_checkpoint(no_dss, plain_dir)
        stateless = None
    except ExportError as exc:
        stateless = str(exc)

    ctx = init_megatron(2, timeout_s=120, data_split=False)
    again = build_megatron_gpt(hf)
    inv = init_quantizer_state(again, config, ctx)
    again.load_state_dict(dist_checkpointing.load(again.sharded_state_dict(), tp1_dir))  # the usual flow
    return dict(original=original, at_tp1=at_tp1, at_tp2=slot_records(inv.slots, ctx), metadata=metadata,
                mismatch=mismatch, stateless=stateless, same_logits=torch.equal(_logits(again, tokens[:2]), logits),
                rank=dist.get_rank())


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return run_ranks(_gpt_worker, 2, str(tmp_path_factory.mktemp("gpt_ckpt")))


def test_tp2_checkpoint_restores_bit_identical_state_at_tp1_and_back(gpt):
    for run in gpt:
        original = run["original"]
        assert len(original) == 2 * 7  # every HF linear of both layers
        assert all(set(r) == {"global_amax", "block_scale", "dss_beta_code", "input_amax", "fq"} for r in original.values())
        assert any(bool((r["dss_beta_code"] != 100).any()) for r in original.values())  # beta != 1.0
        assert differences(original, run["at_tp1"]) == []
        assert differences(original, run["at_tp2"]) == []
        assert run["same_logits"], "the restored TP=2 model's fake-quant forward differs from the original"


def test_checkpoint_holds_state_sharded_like_the_weights(gpt):
    meta = gpt[0]["metadata"]
    # The layer axis Megatron prepends, whole rows, cin / 16 columns; per-tensor state per layer.
    assert meta["decoder.layers.mlp.linear_fc1.weight_nvfp4_block_scale"] == (2, 256, 4)
    assert meta["decoder.layers.mlp.linear_fc1.weight_nvfp4_dss_beta_code"] == (2, 256, 4)
    assert meta["decoder.layers.self_attention.linear_proj.weight_nvfp4_block_scale"] == (2, 64, 4)
    assert meta["decoder.layers.self_attention.linear_qkv.weight_nvfp4_global_amax"] == (2,)
    assert meta["decoder.layers.mlp.linear_fc2.weight_nvfp4_input_amax"] == (2,)
    assert sum("_nvfp4_" in k for k in meta) == 4 * 4


def test_checkpoint_without_state_is_refused_before_reading(gpt):
    message = gpt[0]["stateless"]
    assert message is not None, "a checkpoint without quantizer state must not load into a prepared model"
    assert "decoder.layers.mlp.linear_fc2.weight_nvfp4_{block_scale,global_amax,input_amax}" in message
    assert "save it after nvfp4_dist.quantize()" in message


def test_missing_dss_betas_in_the_model_are_named(gpt):
    message = gpt[0]["mismatch"]
    assert message is not None, "loading DSS state into a model prepared without DSS must fail"
    assert "decoder.layers.mlp.linear_fc1.weight_nvfp4_{dss_beta_code}" in message
    assert "dss=True" in message


# ---------------------------------------------------------------------------------- MoE

DEAD = {0: (2, 3)}


def _moe_worker(root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe"))
    from moe_testutil import small_moe, tokens
    from test_megatron_moe import _patch_megatron_router

    from nvfp4_dist import QuantConfig, init_quantizer_state, load_megatron_checkpoint, quantize
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import megatron_forward_loop
    from nvfp4_dist.models.megatron_moe import build_megatron_moe_gpt

    allow_megatron_save_in_worker()
    _patch_megatron_router()
    init_distributed(timeout_s=120)
    hf = small_moe(dead=DEAD)
    config = QuantConfig(method="local_hessian", dss=True)  # dead experts: weight-only, beta 1.0
    data = tokens(4, 16).chunk(dist.get_world_size())[dist.get_rank()]

    def _all(obj) -> list:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def merged(records: dict) -> dict:  # EP=2: each rank holds its own experts
        return {name: record for part in _all(records) for name, record in part.items()}

    ctx = init_megatron(1, ep=2, data_split=True)
    model = build_megatron_moe_gpt(hf)
    result = quantize(model, config, megatron_forward_loop(data, batch_size=2), ctx=ctx, show_progress=False)
    original = merged(slot_records(result.slots, ctx))
    dist_checkpointing.save(model.sharded_state_dict(), root)
    metadata = {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(root).items()}
    singleton = sorted(k for k in _stored_keys(model.sharded_state_dict(metadata={"singleton_local_shards": True}))
                       if "_nvfp4_" in k and ".experts." in k)

    ctx = init_megatron(1, ep=1, data_split=True)
    fresh = build_megatron_moe_gpt(hf)
    inv = init_quantizer_state(fresh, config, ctx)
    load_megatron_checkpoint(fresh, root)
    return dict(original=original, restored=slot_records(inv.slots, ctx), metadata=metadata,
                singleton=sorted(set().union(*_all(singleton))), dead=result.dead)


def _stored_keys(sharded: dict) -> list[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    keys = []
    for entry in sharded.values():
        if isinstance(entry, ShardedTensorFactory):
            keys += [piece.key for piece in entry.build()]
        elif hasattr(entry, "key"):
            keys.append(entry.key)
    return keys


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return run_ranks(_moe_worker, 2, str(tmp_path_factory.mktemp("moe_ckpt")))


def test_ep2_checkpoint_restores_every_expert_at_ep1(moe):
    original = moe[0]["original"]
    experts = [n for n in original if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert len(moe[0]["dead"]) == 2 * 2  # the dead experts' weight-only state travels too
    dead = [n for n in experts if ".layers.0." in n and any(f".experts.{g}." in n for g in DEAD[0])]
    assert len(dead) == 2 * 3 and all(bool((original[n]["dss_beta_code"] == 100).all())
                                      for n in dead)  # beta 1.0
    for run in moe:
        assert differences(original, run["restored"]) == []


def test_expert_state_keys_are_global(moe):
    meta = moe[0]["metadata"]
    ours = {k: v for k, v in meta.items() if "_nvfp4_" in k}
    assert not any("local_experts" in k for k in ours)
    # Megatron names a SequentialMLP's experts "<mlp>.experts.experts.<fc>" with the layer and the
    # global expert index as prepended axes: EP ranks wrote disjoint expert ranges of one tensor.
    assert ours["decoder.layers.mlp.experts.experts.linear_fc1.weight_nvfp4_block_scale"] == (2, 4, 64, 4)
    assert ours["decoder.layers.mlp.experts.experts.linear_fc2.weight_nvfp4_block_scale"] == (2, 4, 64, 2)
    assert ours["decoder.layers.mlp.experts.experts.linear_fc2.weight_nvfp4_global_amax"] == (2, 4)
    assert ours["decoder.layers.mlp.experts.experts.linear_fc1.weight_nvfp4_input_amax"] == (2, 4)
    assert ours["decoder.layers.mlp.experts.experts.linear_fc2.weight_nvfp4_dss_beta_code"] == (2, 4, 64, 2)
    # Megatron's singleton_local_shards layout names every expert by its global index instead.
    singleton = moe[0]["singleton"]
    assert "decoder.layers.1.mlp.experts.experts.3.linear_fc2.weight_nvfp4_block_scale" in singleton
    assert {k.split(".experts.experts.")[1].split(".")[0] for k in singleton} == {"0", "1", "2", "3"}


# ---------------------------------------------------------------------------------- CLI

CLI_ARGS = ["quantize", "--model", "tiny-dense", "--method", "max", "--weight-only", "--calib-samples", "4",
            "--seq-len", "16", "--no-progress", "--format", "modelopt"]


def _cli_worker(out: str, ckpt: str) -> dict:
    from nvfp4_dist import QuantConfig, init_quantizer_state, load_megatron_checkpoint
    from nvfp4_dist.cli import main
    from nvfp4_dist.launch import init_megatron
    from nvfp4_dist.models.loading import load_model
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt

    allow_megatron_save_in_worker()
    code = main([*CLI_ARGS, "--backend", "megatron", "--tp", "2", "--out", out, "--save-dist-ckpt", ckpt])
    ctx = init_megatron(1, timeout_s=120)
    fresh = build_megatron_gpt(load_model("tiny-dense", seed=0).model)
    inv = init_quantizer_state(fresh, QuantConfig(method="max", quantize_inputs=False), ctx)
    load_megatron_checkpoint(fresh, ckpt)
    return dict(code=code, records=slot_records(inv.slots, ctx))


def test_cli_saves_a_dist_checkpoint_that_restores_the_export_at_tp1(tmp_path):
    """``--backend megatron --tp 2 --save-dist-ckpt``: restored at TP=1, the fake-quant weights
    are the HF export's dequantized weights, module for module."""
    from nvfp4_dist.export.reader import read_dequantized

    out, ckpt = tmp_path / "export", tmp_path / "ckpt"
    runs = run_ranks(_cli_worker, 2, str(out), str(ckpt))
    exported = read_dequantized(out)
    for run in runs:
        assert run["code"] == 0
        assert set(run["records"]) == set(exported)
        assert [n for n, r in run["records"].items() if not torch.equal(r["fq"], exported[n])] == []


def test_cli_save_dist_ckpt_needs_megatron(tmp_path, capsys, monkeypatch):
    import nvfp4_dist.inputs
    from nvfp4_dist.cli import main

    monkeypatch.setattr(nvfp4_dist.inputs, "_cuda_usable", lambda: True)  # the check after Megatron's CUDA one

    assert main([*CLI_ARGS, "--out", str(tmp_path / "o"), "--save-dist-ckpt", str(tmp_path / "c")]) == 2
    assert "--backend megatron" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    args = [*CLI_ARGS, "--backend", "megatron", "--out", str(tmp_path / "o"), "--save-dist-ckpt", str(tmp_path / "taken")]
    assert main(args) == 2
    assert "not an empty directory" in capsys.readouterr().err
