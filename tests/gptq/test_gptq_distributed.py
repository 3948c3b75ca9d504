"""GPTQ under sharded layouts, 2 real ranks (gloo on CPU): each rank updates its own rows with
the full Hessian, no weight gather; results equal one process bit for bit.

* FSDP2 (rows sharded), every rank feeding all the data: gathered W', fake-quant weights and
  the fake-quant forward's logits equal the single-process run's; also with ``gptq_sequential``;
* Megatron column-parallel (TP=2, the column-parallel linears): gathered W' and fake-quant
  weights equal TP=1 (float64 calibration forward, as the TP-invariance tests do);
* Megatron row-parallel under TP=2: refused with a LayoutError naming the layer.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from small_model import small_hf_model, small_tokens

pytestmark = pytest.mark.distributed


def _whole(result, ctx):
    """(W', fake-quant, method) of every exported module (a slot's rows of a part), gathered
    whole along the shard axis (Megatron's fused fc1 interleaves gate/up rows per TP rank)."""
    from nvfp4_dist.numerics import nvfp4
    from nvfp4_dist.parallel.access import local_shards, local_weight
    from nvfp4_dist.parallel.reduce import gather_slot_tensor

    out = {}
    with local_shards(result.model):
        for slot in result.slots:
            state = result.states[slot.name]
            w = local_weight(slot).detach()
            fq = nvfp4.fake_quant(w, state.block_amax, state.global_amax)
            w, fq = gather_slot_tensor(w.clone(), slot.layout, ctx), gather_slot_tensor(fq, slot.layout, ctx)
            for part in slot.parts():
                out[part.name] = (w[part.rows].cpu(), fq[part.rows].cpu(), state.method.value)
    return out


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
                                    and a[k][2] == b[k][2] == "gptq" for k in a)


def _fsdp2_worker() -> dict | None:
    import torch.distributed as dist

    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.launch import init_distributed, shard_fsdp2
    from nvfp4_dist.parallel.context import SINGLE_PROCESS
    from nvfp4_dist.parallel.fsdp import fsdp_context

    device = init_distributed(timeout_s=120).device
    tokens = small_tokens().to(device)

    def loop(model):
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
        result = quantize(model, config, loop, ctx=ctx, show_progress=False)
        local_rows = all(s.layout.local_shape[0] < s.layout.global_shape[0] for s in result.slots)
        got = _whole(result, ctx)
        with torch.no_grad():
            logits = model(tokens).logits
        out[name] = dict(same=_same(got, _whole(ref_result, SINGLE_PROCESS)),
                         same_logits=torch.equal(logits, ref_logits), local_rows=local_rows,
                         n=len(got))
    return out if dist.get_rank() == 0 else None


def test_fsdp2_two_ranks_equal_one_process():
    out = run_ranks(_fsdp2_worker, 2)[0]
    for name, r in out.items():
        assert r["local_rows"] and r["n"] > 0, name
        assert r["same"], f"{name}: W' or fake-quant weights differ from one process"
        assert r["same_logits"], f"{name}: the fake-quant forward differs from one process"


def _megatron_worker() -> dict | None:
    import torch.distributed as dist

    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.errors import LayoutError
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
    from nvfp4_dist.parallel.invariance import float64_forward

    info = init_distributed(timeout_s=120)
    hf = small_hf_model()
    tokens = small_tokens()
    config = QuantConfig(method="gptq", include=("*linear_qkv", "*linear_fc1"))
    out = {}
    for tp in (1, 2):
        ctx = init_megatron(tp, timeout_s=120, data_split=False)
        model = build_megatron_gpt(hf, device=info.device)
        loop = float64_forward(megatron_forward_loop(tokens, batch_size=2))
        result = quantize(model, config, loop, ctx=ctx, show_progress=False)
        out[tp] = _whole(result, ctx)
        out[f"sharded{tp}"] = all(s.layout.shard_axis == (0 if tp == 2 else None) for s in result.slots)
    model = build_megatron_gpt(hf, device=info.device)
    try:
        quantize(model, QuantConfig(method="gptq"), megatron_forward_loop(tokens, batch_size=2), ctx=ctx,
                 show_progress=False)
        out["refusal"] = None
    except LayoutError as exc:
        out["refusal"] = str(exc)
    return out if dist.get_rank() == 0 else None


def test_megatron_column_parallel_equals_tp1_and_row_parallel_refused():
    pytest.importorskip("megatron.core")
    out = run_ranks(_megatron_worker, 2)[0]
    assert out["sharded2"] and out["sharded1"]
    assert len(out[1]) >= 4 and _same(out[1], out[2]), "TP=2 column-parallel GPTQ differs from TP=1"
    assert out["refusal"] is not None and "not supported yet" in out["refusal"]
    assert "linear_proj" in out["refusal"] and "linear_fc2" in out["refusal"]
