"""torch FSDP2 (``fully_shard``) on an HF model: quantize() on DTensor shards, 2 real ranks.

* every rank feeds all the calibration data, no DP reduce (``fsdp_context(data_split=False)``):
  bit-identical to one process, scales and fake-quant forward logits alike;
* the search phase never unshards, gathers or materialises a weight: FSDPModule.unshard,
  DTensor.full_tensor and every all-gather are counted between the end of the calibration
  forward and the first state write, and the tensors handed to the search are checked to be
  this rank's rows;
* the default context (data split over the mesh, each rank half the data): Hessians equal to
  one process with all the data up to fp32 summation order, differing scales only near-ties.
"""

from __future__ import annotations

import pytest
import torch

from fsdp_testutil import METHODS, _fq_whole, _Spy
from harness import run_ranks
from small_model import small_tokens

from nvfp4_dist.kernels.reference import block_loss
from nvfp4_dist.numerics import nvfp4

pytestmark = pytest.mark.distributed

def _fsdp1_run(config, loop, tokens, device, ref_fq, ref_logits) -> dict:
    """FSDP1 (flat parameters, ``use_orig_params=True``) through the summon_full_params fallback,
    every rank feeding all the data: compared with the single-process run."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from small_model import small_hf_model

    from nvfp4_dist import ParallelContext, quantize
    from nvfp4_dist.parallel.access import local_shards

    model = FSDP(small_hf_model().to(device), device_id=device, use_orig_params=True)
    result = quantize(model, config, loop, ctx=ParallelContext(), show_progress=False)
    with local_shards(model):
        fq = {s.name.replace("_fsdp_wrapped_module.", ""): v for s, v in
              zip(result.slots, _fq_whole(result, ParallelContext()).values())}
    with torch.no_grad():
        logits = model(tokens).logits
    return dict(same_fq=set(fq) == set(ref_fq) and all(torch.equal(fq[k], ref_fq[k]) for k in fq),
                same_logits=torch.equal(logits, ref_logits))


def _fsdp_runs(methods: list[str]) -> dict:
    """Worker: per method, one process's reference (rank 0 computes it with no collective), FSDP2
    with replicated data, FSDP2 with the default context (data split)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from small_model import small_hf_model

    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.launch import init_distributed, shard_fsdp2
    from nvfp4_dist.parallel.context import SINGLE_PROCESS
    from nvfp4_dist.parallel.registry import detect_context
    from nvfp4_dist.parallel.fsdp import fsdp_context

    device = init_distributed(timeout_s=120).device
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = small_tokens().to(device)
    spy = _Spy()

    def loop_over(data):
        return lambda model: [model(data[i:i + 2]) for i in range(0, data.shape[0], 2)]

    out = {}
    for name in methods:
        config = QuantConfig(**METHODS[name])
        ref = small_hf_model().to(device)
        spy.searched.clear()
        ref_result = quantize(ref, config, loop_over(tokens), ctx=SINGLE_PROCESS, show_progress=False)
        ref_hessians = {s.name: h for s, (_, h) in zip(ref_result.slots, spy.searched)}
        with torch.no_grad():
            ref_logits = ref(tokens).logits

        model = shard_fsdp2(small_hf_model().to(device))
        ctx = fsdp_context(model, data_split=False)
        spy.calls.clear()
        spy.searched.clear()
        result = quantize(model, config, loop_over(tokens), ctx=ctx, show_progress=False)
        search_calls = list(spy.calls)
        local_rows_ok = all(shape == tuple(s.layout.local_shape) and s.layout.local_shape[0] < s.layout.global_shape[0]
                            for s, (shape, _) in zip(result.slots, spy.searched))
        state = result.slots[0].module.weight_nvfp4_block_scale
        state_sharded = isinstance(state, DTensor) and tuple(state.to_local().shape)[0] < state.shape[0]
        spy.calls.clear()
        spy.active = True  # the spy must see the gathers a forward does, or it proves nothing
        with torch.no_grad():
            logits = model(tokens).logits  # fake-quant forward: gathers the scale buffers only
        spy.active = False
        forward_calls = list(spy.calls)
        fq = _fq_whole(result, ctx)

        split_model = shard_fsdp2(small_hf_model().to(device))
        share = tokens.chunk(world)[rank]
        spy.searched.clear()
        split = quantize(split_model, config, loop_over(share), show_progress=False)
        split_ctx = detect_context(split_model)
        split_hessians = {s.name: h for s, (_, h) in zip(split.slots, spy.searched)}
        ref_fq = _fq_whole(ref_result, SINGLE_PROCESS)
        fsdp1 = _fsdp1_run(config, loop_over(tokens), tokens, device, ref_fq, ref_logits)
        out[name] = dict(
            search_calls=search_calls, forward_calls=forward_calls, local_rows_ok=local_rows_ok, state_sharded=state_sharded,
            same_fq=set(fq) == set(ref_fq) and all(torch.equal(fq[k], ref_fq[k]) for k in fq),
            same_logits=torch.equal(logits, ref_logits),
            ref_fq={k: v.cpu() for k, v in ref_fq.items()},
            split_fq={k: v.cpu() for k, v in _fq_whole(split, split_ctx).items()},
            ref_hessians={k: v.cpu() for k, v in ref_hessians.items() if v is not None},
            split_hessians={k: v.cpu() for k, v in split_hessians.items() if v is not None},
            weights={s.name: s.module.weight.detach().cpu() for s in ref_result.slots},
            fsdp1=fsdp1)
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_fsdp_runs, 2, list(METHODS))[0]


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_bit_identical_to_one_process(runs, method):
    r = runs[method]
    assert r["same_fq"], "gathered fake-quant weights differ from the single-process run"
    assert r["same_logits"], "fake-quant forward under FSDP2 differs from the single-process one"
    assert r["state_sharded"], "quantizer state should be a DTensor sharded like the weight"


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp1_summon_fallback_matches_one_process(runs, method):
    assert runs[method]["fsdp1"] == dict(same_fq=True, same_logits=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_search_touches_local_shards_only(runs, method):
    r = runs[method]
    assert r["search_calls"] == [], f"gather/unshard during the search phase: {r['search_calls']}"
    assert "full_tensor" in r["forward_calls"] and len(r["forward_calls"]) > 1, r["forward_calls"]
    assert r["local_rows_ok"], "a search saw more than this rank's rows"


@pytest.mark.parametrize("method", ["local_hessian", "dss"])
def test_data_split_hessians_and_near_ties(runs, method):
    r = runs[method]
    differing = 0
    for name, h_ref in r["ref_hessians"].items():
        h_split = r["split_hessians"][name]
        torch.testing.assert_close(h_split, h_ref, rtol=1e-5, atol=1e-6 * h_ref.abs().max().item())
        w, fq_ref, fq_split = r["weights"][name], r["ref_fq"][name], r["split_fq"][name]
        loss_ref = block_loss(nvfp4.blocks(w - fq_ref), h_ref)
        loss_split = block_loss(nvfp4.blocks(w - fq_split), h_ref)
        changed = (nvfp4.blocks(fq_ref) != nvfp4.blocks(fq_split)).any(-1)
        differing += int(changed.sum())
        gap = (loss_split - loss_ref).abs()[changed]
        assert bool((gap <= 1e-5 * loss_ref[changed].abs().clamp_min(1e-30)).all()), name
    assert r["ref_hessians"], "no Hessian was recorded"


@pytest.mark.parametrize("method", ["max", "mse"])
def test_data_split_weight_only_methods_identical(runs, method):
    r = runs[method]
    for name, fq in r["ref_fq"].items():
        assert torch.equal(r["split_fq"][name], fq), name
