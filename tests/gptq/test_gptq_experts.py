"""GPTQ on MoE experts, real ranks (gloo on CPU): every live expert is quantized with its own full
Hessian (summed over the ranks holding a replica of it), dead experts fall back to the MSE
scales and keep their weights, and the results do not depend on the layout:

* Megatron SequentialMLP experts, 2 ranks with the calibration data split: EP=2 (each rank holds
  half the experts, the dispatcher brings them every rank's tokens) == EP=1 (every rank holds
  every expert; statistics summed over the expert-data-parallel pair), bit for bit;
* transformers fused 3-D experts (Qwen3-MoE), 2 data-parallel ranks each calibrating on half the
  data == one process on all of it, bit for bit (Hessians summed over the data-parallel group).

Both use the builders of tests/moe (the float64 calibration forward for Megatron, as the EP
scale-search test does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from harness import run_ranks

pytestmark = pytest.mark.distributed

_MOE_TESTS = str(Path(__file__).resolve().parents[1] / "moe")
DEAD = {0: (2, 3)}  # layer 0: experts 2 and 3 receive no token (both on EP rank 1 at EP=2)


def _records(result, original: dict) -> dict:
    """slot name -> (W', block_amax, method, tokens, changed) of this rank's slots."""
    from nvfp4_dist.parallel.access import local_shards, local_weight

    out = {}
    with local_shards(result.model):
        for slot in result.slots:
            state = result.states[slot.name]
            w = local_weight(slot).detach().clone()
            out[slot.name] = dict(weight=w.cpu(), block_amax=state.block_amax().cpu(), method=state.method.value,
                                  tokens=state.tokens, changed=not torch.equal(w, original[slot.name]))
    return out


def _quantize_recording(model, config, loop, ctx):
    """quantize(), and every slot's weight before GPTQ wrote W' into it."""
    from nvfp4_dist import quantize
    from nvfp4_dist.calib.discover import discover
    from nvfp4_dist.parallel.access import local_shards, local_weight

    with local_shards(model):
        before = {s.name: local_weight(s).detach().clone() for s in discover(model, config, ctx).slots}
    return quantize(model, config, loop, ctx=ctx, show_progress=False), before


def _megatron_worker() -> dict:
    import torch.distributed as dist

    from nvfp4_dist import QuantConfig
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import megatron_forward_loop
    from nvfp4_dist.models.megatron_moe import build_megatron_moe_gpt
    from nvfp4_dist.parallel.invariance import float64_forward

    sys.path.insert(0, _MOE_TESTS)
    from moe_testutil import small_moe, tokens
    from test_megatron_moe import _patch_megatron_router

    _patch_megatron_router()
    device = init_distributed(timeout_s=120).device
    hf = small_moe(dead=DEAD)
    data = tokens(8, 16).chunk(dist.get_world_size())[dist.get_rank()]
    out = {}
    for ep in (1, 2):
        ctx = init_megatron(1, ep=ep, data_split=True)
        model = build_megatron_moe_gpt(hf, device=device)
        loop = float64_forward(megatron_forward_loop(data, batch_size=2))
        result, before = _quantize_recording(model, QuantConfig(method="gptq"), loop, ctx)
        local = _records(result, before)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged = {}
        for part in gathered:
            merged.update(part)
        out[ep] = dict(records=merged, local=sorted(n for n in local if ".local_experts." in n))
    return out


def test_megatron_experts_ep2_equals_ep1():
    pytest.importorskip("megatron.core")
    runs = run_ranks(_megatron_worker, 2)
    ep1, ep2 = runs[0][1]["records"], runs[0][2]["records"]
    assert set(ep1) == set(ep2)
    experts = [n for n in ep1 if ".local_experts." in n]
    assert len(experts) == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    # EP=2: each rank held (and quantized) its own half of the experts
    assert {int(n.split(".")[-2]) for n in runs[1][2]["local"]} == {2, 3}
    for name, ref in ep1.items():
        got = ep2[name]
        assert got["method"] == ref["method"] and got["tokens"] == ref["tokens"], name
        assert torch.equal(got["weight"], ref["weight"]), f"{name}: W' differs between EP=1 and EP=2"
        assert torch.equal(got["block_amax"], ref["block_amax"]), f"{name}: scales differ"
    dead = {f"decoder.layers.0.mlp.experts.local_experts.{g}.{fc}" for g in DEAD[0]
            for fc in ("linear_fc1", "linear_fc2")}
    for name in experts:
        rec = ep1[name]
        if name in dead:  # no token: weight-only MSE scales, the weight kept as it was
            assert rec["method"] == "mse" and rec["tokens"] == 0 and not rec["changed"], name
        else:
            assert rec["method"] == "gptq" and rec["tokens"] > 0 and rec["changed"], name


def _hf_worker() -> dict | None:
    import torch.distributed as dist

    from nvfp4_dist import QuantConfig
    from nvfp4_dist.launch import init_distributed
    from nvfp4_dist.parallel.context import SINGLE_PROCESS, ParallelContext

    sys.path.insert(0, _MOE_TESTS)
    from moe_testutil import forward_loop, small_moe, tokens

    device = init_distributed(timeout_s=120).device
    config = QuantConfig(method="gptq", quantize_inputs=False)
    ids = tokens(8, 16).to(device)
    single, before = _quantize_recording(small_moe(dead=DEAD).to(device), config, forward_loop(ids),
                                         SINGLE_PROCESS)
    share = ids.chunk(dist.get_world_size())[dist.get_rank()]
    split, _ = _quantize_recording(small_moe(dead=DEAD).to(device), config, forward_loop(share),
                                   ParallelContext(dp=dist.group.WORLD))
    keys = {s.name: s.stats_key for s in single.slots}
    return dict(single=_records(single, before), split=_records(split, before), keys=keys) \
        if dist.get_rank() == 0 else None


def test_hf_fused_experts_data_parallel_equals_one_process():
    out = run_ranks(_hf_worker, 2)[0]
    single, split = out["single"], out["split"]
    experts = [n for n in single if ".experts." in n]
    assert len(experts) == 2 * 4 * 2  # layers x experts x (gate_up, down)
    for name, ref in single.items():
        got = split[name]
        assert got["method"] == ref["method"] and got["tokens"] == ref["tokens"], name
        assert torch.equal(got["weight"], ref["weight"]), f"{name}: W' differs from one process"
        assert torch.equal(got["block_amax"], ref["block_amax"]), f"{name}: scales differ"
    for name in experts:
        rec = single[name]
        if name.startswith("model.layers.0.") and int(name.split(".")[-2]) in DEAD[0]:
            assert rec["method"] == "mse" and rec["tokens"] == 0 and not rec["changed"], name
        else:  # each live expert: its weight compensated (GPTQ refuses anything but a full Hessian)
            assert rec["method"] == "gptq" and rec["changed"], name
    # ... and that Hessian its own: one statistics key per expert and projection
    assert len({out["keys"][n] for n in experts}) == len(experts)
