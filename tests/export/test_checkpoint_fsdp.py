"""Quantizer state through torch DCP with FSDP2 (real FSDP2, gloo, two processes).

The state buffers are DTensors sharded like their weights, so DCP reshards them like parameters:
a single process's state saved and restored into a 2-rank FSDP2 model (1 -> 2); FSDP2 state
saved at 2 ranks, restored into a fresh 2-rank FSDP2 model (2 -> 2) and into a plain model in
one process (2 -> 1). Every restore is bit-identical in state, fake-quant weights and fake-quant
forward logits.
"""

from __future__ import annotations

import pytest
import torch

from checkpoint_testutil import differences, slot_records
from harness import run_ranks

from nvfp4_dist.parallel.context import SINGLE_PROCESS

pytestmark = pytest.mark.distributed

CONFIG = dict(method="local_hessian", dss=True)


def _quantized_single_process():
    from small_model import small_hf_model, small_tokens

    from nvfp4_dist import QuantConfig, quantize

    model, tokens = small_hf_model(), small_tokens()
    result = quantize(model, QuantConfig(**CONFIG), lambda m: [m(b) for b in tokens.split(2)],
                      ctx=SINGLE_PROCESS, show_progress=False)
    return model, result


def _logits(model):
    from small_model import small_tokens

    with torch.no_grad():
        return model(small_tokens()[:2]).logits


def _fsdp_worker(single_dir: str, fsdp_dir: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    from small_model import small_hf_model, small_tokens

    from nvfp4_dist import QuantConfig, init_quantizer_state, load_dcp_checkpoint, quantize
    from nvfp4_dist.launch import init_distributed, shard_fsdp2
    from nvfp4_dist.parallel.fsdp import fsdp_context

    init_distributed(timeout_s=120)
    config, tokens = QuantConfig(**CONFIG), small_tokens()

    restored = shard_fsdp2(small_hf_model())  # 1 -> 2
    inv = init_quantizer_state(restored, config)
    load_dcp_checkpoint(restored, single_dir)
    from_single = dict(records=slot_records(inv.slots, fsdp_context(restored)), logits=_logits(restored))

    model = shard_fsdp2(small_hf_model())  # every rank all the data: equal to one process
    ctx = fsdp_context(model, data_split=False)
    result = quantize(model, config, lambda m: [m(b) for b in tokens.split(2)], ctx=ctx, show_progress=False)
    state = model.model.layers[0].mlp.down_proj.weight_nvfp4_block_scale
    sharded = isinstance(state, DTensor) and state.to_local().shape[0] < state.shape[0]
    original = dict(records=slot_records(result.slots, ctx), logits=_logits(model))
    dcp.save(get_model_state_dict(model), checkpoint_id=fsdp_dir)

    again = shard_fsdp2(small_hf_model())  # 2 -> 2
    inv = init_quantizer_state(again, config)
    load_dcp_checkpoint(again, fsdp_dir)
    return dict(from_single=from_single, original=original, sharded=sharded, rank=dist.get_rank(),
                again=dict(records=slot_records(inv.slots, fsdp_context(again)), logits=_logits(again)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("dcp")
    model, result = _quantized_single_process()
    dcp.save(model.state_dict(), checkpoint_id=str(root / "single"))
    single = dict(records=slot_records(result.slots, SINGLE_PROCESS), logits=_logits(model))
    return single, run_ranks(_fsdp_worker, 2, str(root / "single"), str(root / "fsdp")), root


def _same(ref: dict, got: dict) -> None:
    assert differences(ref["records"], got["records"]) == []
    assert torch.equal(ref["logits"], got["logits"]), "fake-quant forward logits differ"


def test_single_process_state_restores_into_fsdp2(runs):
    single, ranks, _ = runs
    assert len(single["records"]) == 2 * 7
    for rank in ranks:
        _same(single, rank["from_single"])


def test_fsdp2_state_is_sharded_and_restores_at_two_ranks(runs):
    single, ranks, _ = runs
    for rank in ranks:
        assert rank["sharded"], "FSDP2 quantizer state should be a DTensor sharded like its weight"
        _same(single, rank["original"])  # data replicated on both ranks: equal to one process
        _same(rank["original"], rank["again"])


def test_fsdp2_state_restores_in_one_process(runs):
    from small_model import small_hf_model

    from nvfp4_dist import QuantConfig, init_quantizer_state, load_dcp_checkpoint

    single, _, root = runs
    model = small_hf_model()
    inv = init_quantizer_state(model, QuantConfig(**CONFIG))
    load_dcp_checkpoint(model, str(root / "fsdp"))
    _same(single, dict(records=slot_records(inv.slots, SINGLE_PROCESS), logits=_logits(model)))
