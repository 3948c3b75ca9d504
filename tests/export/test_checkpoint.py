"""Quantizer state in a plain ``state_dict`` and the checkpoint errors (one process).

* a dense HF model (local_hessian + DSS) and an HF fused-experts MoE with dead experts: the
  ``state_dict`` of the quantized model loads into a fresh model prepared by
  ``init_quantizer_state``, whose fake-quant forward is then bit-identical;
* loads whose quantizer keys do not match the model (no state, DSS betas or input amaxes missing
  or extra) raise ExportError naming the keys and the fix, with ``strict=False`` too, and so do
  the DCP and Megatron loaders before reading anything;
* the Megatron sharded-entry derivation, on hand-made ShardedTensors (layout arithmetic only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from checkpoint_testutil import differences, slot_records

from nvfp4_dist import ExportError, QuantConfig, init_quantizer_state, load_dcp_checkpoint, quantize
from nvfp4_dist.parallel.context import SINGLE_PROCESS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe"))

DSS = QuantConfig(method="local_hessian", dss=True)


def _dense():
    from small_model import small_hf_model, small_tokens

    return small_hf_model(), small_tokens()


def _moe():
    from moe_testutil import small_moe, tokens

    return small_moe(dead={0: (2, 3)}), tokens(4, 16)


def _quantized(build, config):
    model, tokens = build()
    result = quantize(model, config, lambda m: [m(b) for b in tokens.split(2)], ctx=SINGLE_PROCESS,
                      show_progress=False)
    return model, result, tokens


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens[:2]).logits


@pytest.fixture(scope="module")
def dense():
    return _quantized(_dense, DSS)


@pytest.mark.parametrize("build", [_dense, _moe], ids=["dense", "moe-experts"])
def test_state_dict_round_trip_restores_identical_fake_quant(build, dense, tmp_path):
    model, result, tokens = dense if build is _dense else _quantized(build, DSS)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh, _ = build()
    inv = init_quantizer_state(fresh, DSS)
    # placeholders until loaded: NaN amaxes, code 0 (no scale, no beta) for the one-byte block state
    assert all((buf == 0).all() if buf.dtype == torch.uint8 else torch.isnan(buf).all()
               for name, buf in fresh.named_buffers() if "_nvfp4_" in name)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert differences(slot_records(result.slots, SINGLE_PROCESS), slot_records(inv.slots, SINGLE_PROCESS)) == []
    assert torch.equal(_logits(fresh, tokens), _logits(model, tokens))
    assert not torch.equal(_logits(fresh, tokens), _logits(build()[0], tokens))  # fake-quant is on


def test_dss_run_gives_every_slot_a_beta():
    """Weight-only-calibrated slots of a DSS run carry beta = 1.0 (bitwise neutral), so every
    slot has the same keys (a stacked Megatron tensor must be fully covered)."""
    model, result, _ = _quantized(_moe, DSS)
    dead = [s for s in result.slots if result.states[s.name].dead]
    assert dead and all(result.states[s.name].dss_beta() is None for s in dead)
    for slot in dead:
        beta = getattr(slot.module, f"{slot.param_name}_nvfp4_dss_beta_code")[slot.expert]
        assert bool((beta == 100).all())  # beta 1.0 in hundredths


def _load_error(state: dict, config: QuantConfig, strict: bool = True) -> str:
    fresh, _ = _dense()
    init_quantizer_state(fresh, config)
    with pytest.raises(ExportError) as info:
        fresh.load_state_dict(state, strict=strict)
    return str(info.value)


@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_without_state_names_missing_keys(strict):
    message = _load_error(_dense()[0].state_dict(), DSS, strict)
    assert "model.layers.0.mlp.down_proj.weight_nvfp4_{block_scale,dss_beta_code,global_amax,input_amax}" in message
    assert "save it after nvfp4_dist.quantize()" in message and "dss=False" not in message


def test_dss_mismatch_names_the_betas(dense):
    state = dense[0].state_dict()
    message = _load_error(state, QuantConfig(method="local_hessian"))
    assert "model.layers.1.mlp.down_proj.weight_nvfp4_{dss_beta_code}" in message and "dss=True" in message
    no_betas = {k: v for k, v in state.items() if not k.endswith("_nvfp4_dss_beta_code")}
    message = _load_error(no_betas, DSS)
    assert "model.layers.1.mlp.down_proj.weight_nvfp4_{dss_beta_code}" in message and "dss=False" in message


def test_input_amax_mismatch_names_w4a4(dense):
    message = _load_error(dense[0].state_dict(), QuantConfig(method="local_hessian", dss=True, quantize_inputs=False))
    assert "self_attn.v_proj.weight_nvfp4_{input_amax}" in message and "quantize_inputs=True" in message


def test_dcp_loader_checks_the_checkpoint_first(tmp_path):
    import torch.distributed.checkpoint as dcp

    plain, _ = _dense()
    dcp.save(plain.state_dict(), checkpoint_id=str(tmp_path))
    fresh, _ = _dense()
    init_quantizer_state(fresh, DSS)
    with pytest.raises(ExportError, match=r"(?s)DCP checkpoint.*self_attn\.k_proj\.weight_nvfp4_\{block_scale"):
        load_dcp_checkpoint(fresh, str(tmp_path))


# ---------------------------------------------------------------------- Megatron layout arithmetic


def _module_with_state(rows: int, cin: int) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(rows, cin, device="meta"))
    module.register_buffer("weight_nvfp4_block_scale", torch.zeros(rows, cin // 16, dtype=torch.uint8))
    module.register_buffer("weight_nvfp4_global_amax", torch.zeros(()))
    return module


@pytest.mark.parametrize("axis", [0, 1])
def test_sharded_entries_follow_the_weight(axis):
    """TP rank 1 of 2 (rows or input channels split), DP rank 1, under a prepended layer axis:
    block state split like the weight with cin / 16 columns; per-tensor state keeps the layer
    axis only and is a main replica on TP rank 0 alone."""
    pytest.importorskip("megatron.core")
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from nvfp4_dist import add_quantizer_sharded_state

    rows, cin = (8, 32) if axis == 0 else (16, 16)
    module = _module_with_state(rows, cin)
    weight = ShardedTensor.from_rank_offsets("layers.fc.weight", module.weight, (0, 3, 4), (axis + 1, 1, 2),
                                             replica_id=(0, 0, 1), prepend_axis_num=1)
    sharded = add_quantizer_sharded_state(module, {"weight": weight})
    block, scalar = sharded["weight_nvfp4_block_scale"], sharded["weight_nvfp4_global_amax"]
    assert block.key == "layers.fc.weight_nvfp4_block_scale" and block.data is module.weight_nvfp4_block_scale
    assert block.global_shape == (4, 16, 2)  # [layers, rows, cin / 16] either way
    assert block.global_offset == ((3, 8, 0) if axis == 0 else (3, 0, 1))
    assert block.replica_id == (0, 0, 1)
    assert (scalar.global_shape, scalar.global_offset, scalar.local_shape) == ((4,), (3,), ())
    assert scalar.replica_id == (0, 1, 1)


class _TPRowSplit(nn.Linear):
    """A stand-in Megatron linear: its rows are TP rank 1's half of a [16, 32] weight."""

    def __init__(self):
        super().__init__(32, 8, bias=False)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        return {f"{prefix}weight": ShardedTensor.from_rank_offsets(f"{prefix}weight", self.weight, (0, 1, 2),
                                                                   replica_id=(0, 0, 0))}


class _Wrapper(nn.Module):
    """Megatron's Float16Module / DDP shape: delegates to ``module`` under the inner keys."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def sharded_state_dict(self, prefix="", *args, **kwargs):
        return self.module.sharded_state_dict(prefix, *args, **kwargs)


@pytest.mark.parametrize("wrapped", [False, True], ids=["module", "wrapper"])
def test_quantize_wraps_sharded_state_dict_and_deepcopy_keeps_it_bound(wrapped):
    import copy

    pytest.importorskip("megatron.core")
    model = _Wrapper(_TPRowSplit()) if wrapped else _TPRowSplit()
    quantize(model, QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    sharded = model.sharded_state_dict(prefix="m.")
    assert sorted(sharded) == ["m.weight", "m.weight_nvfp4_block_scale", "m.weight_nvfp4_global_amax"]
    assert sharded["m.weight_nvfp4_block_scale"].global_offset == (8, 0)
    assert sharded["m.weight_nvfp4_global_amax"].replica_id == (0, 1, 0)  # TP rank 1: not written
    clone = copy.deepcopy(model)
    inner = clone.module if wrapped else clone
    assert clone.sharded_state_dict()["weight_nvfp4_block_scale"].data is inner.weight_nvfp4_block_scale


def _first_release_state(model: nn.Module) -> dict:
    """``model``'s state dict as the first release wrote it: fp32 ``_nvfp4_block_amax`` /
    ``_nvfp4_dss_beta`` in place of the one-byte codes."""
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("_nvfp4_block_scale", "_nvfp4_block_amax").replace("_nvfp4_dss_beta_code", "_nvfp4_dss_beta")
        legacy[key] = value.float() if "_nvfp4_" in key else value
    return legacy


def test_first_release_fp32_state_is_refused_by_name(dense, tmp_path):
    """A checkpoint of the first release does not load as if its fp32 amaxes were codes: the
    state dict load and the DCP loader (before reading) refuse it, naming a key."""
    import torch.distributed.checkpoint as dcp

    legacy = _first_release_state(dense[0])
    message = _load_error(legacy, DSS, strict=False)
    assert "fp32 format of earlier nvfp4_dist versions" in message and "_nvfp4_block_amax" in message
    dcp.save(legacy, checkpoint_id=str(tmp_path))
    fresh, _ = _dense()
    init_quantizer_state(fresh, DSS)
    with pytest.raises(ExportError, match=r"DCP checkpoint .* fp32 format of earlier nvfp4_dist versions"):
        load_dcp_checkpoint(fresh, str(tmp_path))
