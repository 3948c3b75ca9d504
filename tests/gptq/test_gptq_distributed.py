"""GPTQ under sharded layouts, real ranks (gloo on CPU): no weight gather; results equal one
process bit for bit.

* FSDP2 (rows sharded), every rank feeding all the data: gathered W', fake-quant weights and
  the fake-quant forward's logits equal the single-process run's; also with ``gptq_sequential``
  (one forward loop: the fully_shard-ed layers run alone on cached inputs);
* Megatron TP=2 and TP=4 (4 ranks): column-parallel linears update their rows, row-parallel
  ones sweep their input channels in rank order, each rank first applying the scaled errors the
  earlier ranks relay to it (parallel/reduce.ErrorRelay) under the full Hessian its observer
  gathered; gathered W' and fake-quant weights equal TP=1 bit for bit (float64 calibration
  forward, as the TP-invariance tests do), one-shot and sequential;
* Megatron TP=2 x DP=2 with the data split: Hessians summed over the DP ranks, results equal
  one process on all the data.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from small_model import small_hf_model, small_tokens

pytestmark = pytest.mark.distributed


def _whole(result, ctx):
    """(W', fake-quant, method, block amax, global amax) of every exported module (a slot's rows
    of a part), gathered whole along the shard axis (Megatron's fused fc1 interleaves gate/up
    rows per TP rank)."""
    from nvfp4_dist.numerics import nvfp4
    from nvfp4_dist.parallel.access import local_shards, local_weight
    from nvfp4_dist.parallel.reduce import gather_slot_tensor

    out = {}
    with local_shards(result.model):
        for slot in result.slots:
            state = result.states[slot.name]
            w = local_weight(slot).detach()
            fq = nvfp4.fake_quant(w, state.block_amax(), state.global_amax)
            w, fq = gather_slot_tensor(w.clone(), slot.layout, ctx), gather_slot_tensor(fq, slot.layout, ctx)
            bamax = gather_slot_tensor(state.block_amax(), slot.layout, ctx, elems_per_col=16)
            for part in slot.parts():
                out[part.name] = (w[part.rows].cpu(), fq[part.rows].cpu(), state.method.value,
                                  bamax[part.rows].cpu(), state.global_amax.cpu())
    return out


def _same(a: dict, b: dict) -> bool:
    """The same W', fake-quant weights, block and global amax (the state every export writes),
    and GPTQ for every module."""
    return set(a) == set(b) and all(a[k][2] == b[k][2] == "gptq" and all(
        torch.equal(a[k][i], b[k][i]) for i in (0, 1, 3, 4)) for k in a)


def _fsdp2_worker() -> dict | None:
    import torch.distributed as dist

    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.launch import init_distributed, shard_fsdp2
    from nvfp4_dist.parallel.context import SINGLE_PROCESS
    from nvfp4_dist.parallel.fsdp import fsdp_context

    device = init_distributed(timeout_s=120).device
    tokens = small_tokens().to(device)

    loops = []

    def loop(model):
        loops.append(1)
        for i in range(0, tokens.shape[0], 2):
            model(tokens[i:i + 2])

    out = {}
    for name, config in (("plain", QuantConfig(method="gptq")),
                         ("sequential", QuantConfig(method="gptq", gptq_sequential=True,
                                                    gptq_scales="local_hessian"))):
        ref = small_hf_model().to(device)
        ref_result = quantize(ref, config, loop, ctx=SINGLE_PROCESS, show_progress=False)
        with torch.no_grad():
            ref_logits = ref(tokens).logits
        model = shard_fsdp2(small_hf_model().to(device))
        ctx = fsdp_context(model, data_split=False)
        loops.clear()
        result = quantize(model, config, loop, ctx=ctx, show_progress=False)
        n_loops = len(loops)  # sequential: one loop, the fully_shard-ed layers then run alone
        local_rows = all(s.layout.local_shape[0] < s.layout.global_shape[0] for s in result.slots)
        got = _whole(result, ctx)
        with torch.no_grad():
            logits = model(tokens).logits
        out[name] = dict(same=_same(got, _whole(ref_result, SINGLE_PROCESS)),
                         same_logits=torch.equal(logits, ref_logits), local_rows=local_rows,
                         n=len(got), loops=n_loops)
    return out if dist.get_rank() == 0 else None


def test_fsdp2_two_ranks_equal_one_process():
    out = run_ranks(_fsdp2_worker, 2)[0]
    for name, r in out.items():
        assert r["local_rows"] and r["n"] > 0 and r["loops"] == 1, name
        assert r["same"], f"{name}: W' or fake-quant weights differ from one process"
        assert r["same_logits"], f"{name}: the fake-quant forward differs from one process"


def _megatron_worker(plan) -> dict | None:
    """Each ``(tp, data_split)`` of ``plan`` on 4 ranks: every linear of the small Megatron GPT
    (column- and row-parallel) quantized with GPTQ, float64 calibration forward."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
    from nvfp4_dist.parallel.invariance import float64_forward

    info = init_distributed(timeout_s=120)
    hf = small_hf_model()
    tokens = small_tokens()
    out = {}
    for tp, data_split, options in plan:
        ctx = init_megatron(tp, timeout_s=120, data_split=data_split)
        data = tokens
        if data_split:  # each data-parallel rank calibrates on its own contiguous share
            data = tokens.chunk(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
        model = build_megatron_gpt(hf, device=info.device)
        loop = float64_forward(megatron_forward_loop(data, batch_size=2))
        result = quantize(model, QuantConfig(method="gptq", **options), loop, ctx=ctx, show_progress=False)
        key = (tp, data_split, tuple(sorted(options.items())))
        out[key] = _whole(result, ctx)
        out[key + ("axes",)] = sorted({(s.name.rsplit(".", 1)[-1], s.layout.shard_axis) for s in result.slots})
        out[key + ("tokens",)] = {s.name: result.states[s.name].tokens for s in result.slots}
    return out if dist.get_rank() == 0 else None


_SEQ = (("gptq_scale_timing", "before"), ("gptq_scales", "local_hessian"), ("gptq_sequential", True))


@pytest.fixture(scope="module")
def megatron_runs():
    pytest.importorskip("megatron.core")
    seq = dict(_SEQ)
    plan = [(1, False, {}), (2, False, {}), (4, False, {}), (2, True, {}), (1, False, seq), (4, False, seq)]
    return run_ranks(_megatron_worker, 4, plan)[0]


def test_megatron_tp1_tp2_tp4_bit_identical(megatron_runs):
    """TP=2 and TP=4 (column-parallel rows; row-parallel columns swept in rank order with the
    errors relayed between ranks) give W', the fake-quant weights, hence every export, of TP=1
    bit for bit; so does the sequential mode with local-Hessian scales chosen before the sweep."""
    for options in ((), _SEQ):
        ref = megatron_runs[(1, False, options)]
        assert len(ref) == 14  # q/k/v, o, gate/up, down of both layers
        for tp in (2, 4) if not options else (4,):
            axes = megatron_runs[(tp, False, options, "axes")]
            assert axes == [("linear_fc1", 0), ("linear_fc2", 1), ("linear_proj", 1), ("linear_qkv", 0)]
            got = megatron_runs[(tp, False, options)]
            bad = [k for k in ref if not _same({k: ref[k]}, {k: got[k]})]
            assert set(got) == set(ref) and not bad, f"TP={tp} {options}: differ from TP=1: {bad}"


def test_megatron_hessians_summed_over_data_parallel_ranks(megatron_runs):
    """TP=2 x DP=2 with the data split between the DP ranks: statistics summed over DP (token
    counts add up to the whole data's) and GPTQ's results equal TP=1 on all the data."""
    whole, split = megatron_runs[(1, False, ())], megatron_runs[(2, True, ())]
    tokens = megatron_runs[(2, True, (), "tokens")]
    assert set(tokens.values()) == set(megatron_runs[(1, False, (), "tokens")].values()) == {8 * 16}
    bad = [k for k in whole if not _same({k: whole[k]}, {k: split[k]})]
    assert not bad, f"TP=2 x DP=2 (data split) differs from one process on all the data: {bad}"
