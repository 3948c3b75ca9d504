"""NVFP4Hook in a Megatron-core training loop (real megatron-core, gloo, two processes, TP=2).

One worker run covers the lifecycle on the small Qwen3-style GPT:
* calibrate through ``get_forward_backward_func()`` (forward_only) gives quantizer state
  bit-identical to ``quantize()`` with a plain forward loop over the same microbatches, in eval
  mode, with the model's train mode restored after;
* QAT: two training iterations through Megatron's schedule + torch Adam: losses finite, weights
  changed, quantizer state unchanged; the weight gradient of one linear equals the gradient of the
  same loss with that weight replaced by the constant tensor fq(w) (and differs from the gradient
  at w itself, so the check can fail);
* export after QAT: our reader dequantizes the HF checkpoint to exactly the model's fake-quant
  weights gathered over TP; the Megatron distributed checkpoint carries the quantizer state;
* a Float16Module-wrapped model is unwrapped (its ``sharded_state_dict`` carries the state);
  two model chunks (virtual pipeline stages: a LayoutError) and gradient_accumulation_fusion
  (which bypasses the straight-through estimator: a ConfigError) are refused. Pipeline
  parallelism itself is supported: tests/distributed/test_pipeline_parallel.py.

DP=2 under Megatron's DistributedDataParallel (TP=1): each rank calibrates on its own half of the
microbatches, equal to one process calibrating on all of them; QAT keeps the replicas in sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from harness import patch_megatron_schedule_for_cpu as _patch_schedule_for_cpu, run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

SEQ, MBS, CALIB_MB = 16, 2, 4
GRAD_CHECKED = "decoder.layers.0.mlp.linear_fc2"


def _batches(tokens: torch.Tensor) -> list[dict]:
    """Microbatches as a training data iterator yields them: tokens and next-token labels."""
    return [{"tokens": t, "labels": torch.roll(t, -1, dims=1)} for t in tokens.split(MBS)]


def _forward_step(modes: list):
    """A Megatron ``forward_step_func``: GPT with labels -> per-token losses, mean loss func;
    ``modes`` records the model's training flag at every call."""
    from nvfp4_dist.models.megatron_gpt import causal_mask

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        modes.append(model.training)
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
        losses = model(tokens, positions, attention_mask=causal_mask(tokens.shape[1], "cpu"),
                       labels=batch["labels"])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return losses, loss_func

    return forward_step


def _fake_quant_records(slots, ctx) -> dict:
    """HF module name -> the forward's fake-quant weight of its rows, gathered over TP."""
    from nvfp4_dist.calib.apply import fake_quant_param
    from nvfp4_dist.parallel.access import local_weight
    from nvfp4_dist.parallel.reduce import gather_slot_tensor

    out = {}
    with torch.no_grad():
        for slot in slots:
            fq = fake_quant_param(slot.module, slot.param_name, local_weight(slot))
            whole = gather_slot_tensor(fq.contiguous(), slot.layout, ctx, elems_per_col=1)
            out.update({part.name: whole[part.rows].clone() for part in slot.parts()})
    return out


def _states(slots) -> dict:
    from nvfp4_dist.calib.state import read_state

    return {(s.name, k): v.detach().clone() for s in slots for k, v in read_state(s.module, s.param_name).items()}


def _weight_grad(schedule, model, batches, step) -> tuple[torch.Tensor, list]:
    for p in model.parameters():
        p.grad = None
    losses = schedule(forward_step_func=step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
             seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    return model.get_submodule(GRAD_CHECKED).weight.grad.clone(), losses


def _gradient_check(schedule, model, batches, step) -> dict:
    """The checked linear's weight gradient under QAT (straight-through), and of the same loss
    with the weight set to the constant fq(w) (fake-quant off on that linear only), and at w;
    leaves the QAT gradients on the parameters and returns the QAT pass's losses too. W4A4: the
    linear's input stays fake-quantized in every pass (only the weight's fake-quant is off)."""
    from nvfp4_dist.calib.apply import fake_quant_activation, fake_quant_param, install_fake_quant, remove_fake_quant

    linear = model.get_submodule(GRAD_CHECKED)
    qat, losses = _weight_grad(schedule, model, batches, step)
    qat_grads = {n: p.grad for n, p in model.named_parameters()}
    w = linear.weight.detach().clone()
    with torch.no_grad():
        fq = fake_quant_param(linear, "weight", linear.weight)
    remove_fake_quant(linear)
    amax = getattr(linear, "weight_nvfp4_input_amax", None)
    inputs = None if amax is None else linear.register_forward_pre_hook(
        lambda mod, args: (fake_quant_activation(args[0], amax), *args[1:]))
    try:
        with torch.no_grad():
            linear.weight.copy_(fq)
        at_fq, _ = _weight_grad(schedule, model, batches, step)
        with torch.no_grad():
            linear.weight.copy_(w)
        at_w, _ = _weight_grad(schedule, model, batches, step)
    finally:
        with torch.no_grad():
            linear.weight.copy_(w)
        if inputs is not None:
            inputs.remove()
        install_fake_quant(linear, ["weight"])
    for n, p in model.named_parameters():  # the optimizer steps on the QAT gradients
        p.grad = qat_grads[n]
    return dict(qat=qat, at_fq=at_fq, at_w=at_w, fq_differs=not torch.equal(fq, w)), losses


def _worker(root: str) -> dict:
    from checkpoint_testutil import allow_megatron_save_in_worker, differences, slot_records
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from small_model import small_hf_model, small_tokens

    from nvfp4_dist import ConfigError, NVFP4Hook, QuantConfig, quantize
    from nvfp4_dist.errors import LayoutError
    from nvfp4_dist.export.reader import read_dequantized
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
    from nvfp4_dist.parallel.access import local_weight

    _patch_schedule_for_cpu()
    allow_megatron_save_in_worker()
    init_distributed(timeout_s=120)
    ctx = init_megatron(2, timeout_s=120)
    hf = small_hf_model()
    tokens = small_tokens(samples=CALIB_MB * MBS, seq_len=SEQ)
    config = QuantConfig(method="local_hessian")
    out = {}

    # Calibration through Megatron's schedule vs. quantize() with a plain loop, same microbatches.
    model = build_megatron_gpt(hf).train()
    modes: list = []
    hook = NVFP4Hook(config, calib_microbatches=CALIB_MB, export_dir=f"{root}/hf", hf_config=hf.config.to_dict(),
                     dist_ckpt_dir=f"{root}/dist", show_progress=False)
    result = hook.calibrate([model], iter(_batches(tokens)), _forward_step(modes), seq_length=SEQ,
                            micro_batch_size=MBS)
    out["calib_modes"], out["mode_after"] = list(modes), model.training
    reference = build_megatron_gpt(hf)
    ref_result = quantize(reference, config, megatron_forward_loop(tokens, MBS), ctx=ctx, show_progress=False)
    out["calib_differences"] = differences(slot_records(ref_result.slots, ctx), slot_records(result.slots, ctx))
    out["calib_tokens"] = sorted({state.tokens for state in result.states.values()})

    # QAT: two iterations of Megatron's schedule + Adam.
    schedule = get_forward_backward_func()
    state_before = _states(result.slots)
    weights_before = {s.name: local_weight(s).detach().clone() for s in result.slots}
    train = _batches(small_tokens(samples=2 * MBS, seq_len=SEQ, seed=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = _forward_step([])
    out["grads"], losses = _gradient_check(schedule, model, train, step)  # iteration 1's backward
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses += schedule(forward_step_func=step, data_iterator=iter(train), model=[model],
                       num_microbatches=len(train), seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    optimizer.step()
    out["losses"] = torch.stack([d["lm loss"] for d in losses])
    out["changed"] = [s.name for s in result.slots if not torch.equal(local_weight(s), weights_before[s.name])]
    state_after = _states(result.slots)
    out["state_unchanged"] = (state_before.keys() == state_after.keys()
                              and all(torch.equal(v, state_after[k]) for k, v in state_before.items()))

    # Export after QAT: HF checkpoint == the forward's fake-quant weights; dist checkpoint with state.
    try:
        hook.export([reference])
        out["other_model"] = None
    except ConfigError as exc:
        out["other_model"] = str(exc)
    hook.export([model])
    out["fq"] = _fake_quant_records(result.slots, ctx)
    out["exported"] = read_dequantized(f"{root}/hf") if ps.get_tensor_model_parallel_rank() == 0 else None
    out["dist_keys"] = sorted(k for k in dist_checkpointing.load_tensors_metadata(f"{root}/dist") if "_nvfp4_" in k)

    # Wrappers and refusals.
    inner = build_megatron_gpt(hf)
    wrapped = Float16Module(dataclasses.replace(inner.config, bf16=True), inner)
    f16 = NVFP4Hook(QuantConfig(method="max"), calib_microbatches=1, show_progress=False).calibrate(
        wrapped, iter(_batches(tokens)), _forward_step([]), seq_length=SEQ, micro_batch_size=MBS)
    out["wrapped_inner"] = all(any(s.module is m for m in inner.modules()) for s in f16.slots)
    out["wrapped_state_keys"] = sum("_nvfp4_" in k for k in wrapped.sharded_state_dict())
    refusals = []
    fused = build_megatron_gpt(hf)
    fused.get_submodule(GRAD_CHECKED).gradient_accumulation_fusion = True  # as the config would set it
    for chunks in ([model, reference], [fused]):
        try:
            NVFP4Hook(config, show_progress=False).calibrate(chunks, iter(()), step, seq_length=SEQ,
                                                             micro_batch_size=MBS)
            refusals.append(None)
        except (ConfigError, LayoutError) as exc:
            refusals.append(type(exc).__name__ + ": " + str(exc))
    out["refusals"] = refusals
    return out


def _ddp_worker(root: str) -> dict:
    """TP=1 x DP=2 with Megatron's DistributedDataParallel: each data-parallel rank calibrates on its
    own half of the microbatches; QAT gradients through DDP's main_grad buffers + torch Adam."""
    from checkpoint_testutil import differences, slot_records
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from small_model import small_hf_model, small_tokens

    from nvfp4_dist import NVFP4Hook, QuantConfig, quantize
    from nvfp4_dist.export.reader import read_dequantized
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
    from nvfp4_dist.parallel.access import local_weight
    from nvfp4_dist.parallel.megatron import megatron_context

    _patch_schedule_for_cpu()
    init_distributed(timeout_s=120)
    init_megatron(1, timeout_s=120)
    hf = small_hf_model()
    tokens = small_tokens(samples=CALIB_MB * MBS, seq_len=SEQ)
    config = QuantConfig(method="max")  # input amax is MAX-reduced over DP: exact under any split
    out = {}

    model = build_megatron_gpt(hf).train()
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    model.config.finalize_model_grads_func = finalize_model_grads  # as Megatron's training sets it up
    model.config.no_sync_func = ddp.no_sync
    rank, half = ps.get_data_parallel_rank(), CALIB_MB // 2
    hook = NVFP4Hook(config, calib_microbatches=half, export_dir=f"{root}/hf", hf_config=hf.config.to_dict())
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)  # the hook logs its report table on rank 0
    logger = logging.getLogger("nvfp4_dist.integrations.megatron")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):  # progress on
            result = hook.calibrate([ddp], iter(_batches(tokens)[rank * half:(rank + 1) * half]),
                                    _forward_step([]), seq_length=SEQ, micro_batch_size=MBS)
    finally:
        logger.removeHandler(handler)
    out["printed"] = printed.getvalue()
    reference = build_megatron_gpt(hf)
    ref_ctx = megatron_context(data_split=False)  # every rank sees all the data
    ref_result = quantize(reference, config, megatron_forward_loop(tokens, MBS), ctx=ref_ctx, show_progress=False)
    out["calib_differences"] = differences(slot_records(ref_result.slots, ref_ctx), slot_records(result.slots, ref_ctx))
    out["calib_tokens"] = sorted({state.tokens for state in result.states.values()})
    out["state_keys"] = sum("_nvfp4_" in k for k in ddp.sharded_state_dict())

    state_before = _states(result.slots)
    weights_before = {s.name: local_weight(s).detach().clone() for s in result.slots}
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    schedule = get_forward_backward_func()
    train = _batches(small_tokens(samples=2 * MBS, seq_len=SEQ, seed=2 + rank))  # DP ranks: own data
    losses = []
    for _ in range(2):
        ddp.zero_grad_buffer()
        optimizer.zero_grad(set_to_none=True)
        losses += schedule(forward_step_func=_forward_step([]), data_iterator=iter(train), model=[ddp],
                           num_microbatches=len(train), seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        for p in ddp.parameters():  # DDP reduced the gradients into main_grad (over DP)
            p.grad = p.main_grad
        optimizer.step()
    out["losses"] = torch.stack([d["lm loss"] for d in losses])
    out["weights"] = {s.name: local_weight(s).detach().clone() for s in result.slots}
    out["changed"] = [n for n, w in out["weights"].items() if not torch.equal(w, weights_before[n])]
    state_after = _states(result.slots)
    out["state_unchanged"] = all(torch.equal(v, state_after[k]) for k, v in state_before.items())
    hook.export([ddp])
    out["fq"] = _fake_quant_records(result.slots, ref_ctx)
    out["exported"] = read_dequantized(f"{root}/hf") if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(_worker, 2, str(tmp_path_factory.mktemp("hook")))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_ranks(_ddp_worker, 2, str(tmp_path_factory.mktemp("hook_ddp")))


def test_calibration_through_the_schedule_equals_quantize_with_a_plain_loop(runs):
    for run in runs:
        assert run["calib_differences"] == []
        assert run["calib_tokens"] == [CALIB_MB * MBS * SEQ]  # every microbatch observed, once
        assert run["calib_modes"] == [False] * CALIB_MB, "calibration must run in eval mode"
        assert run["mode_after"] is True, "the model's training mode must be restored"


def test_qat_weight_gradient_is_the_straight_through_gradient(runs):
    for run in runs:
        g = run["grads"]
        assert g["fq_differs"]
        assert torch.equal(g["qat"], g["at_fq"]), (g["qat"] - g["at_fq"]).abs().max()
        assert not torch.equal(g["at_fq"], g["at_w"]), "the check cannot tell fq(w) from w"


def test_qat_trains_weights_and_keeps_the_calibrated_scales(runs):
    for run in runs:
        assert torch.isfinite(run["losses"]).all() and run["losses"].numel() == 2 * 2  # 2 iterations x 2 mb
        assert len(run["changed"]) == 2 * 4, run["changed"]  # every quantized linear of both layers
        assert run["state_unchanged"]


def test_export_after_qat_dequantizes_to_the_fake_quant_weights(runs):
    exported, fq = runs[0]["exported"], runs[0]["fq"]
    assert set(exported) == set(fq) and len(fq) == 2 * 7
    bad = [name for name in fq if not torch.equal(exported[name], fq[name])]
    assert bad == []
    assert len(runs[0]["dist_keys"]) == 4 * 3  # global, block and input amax of 4 linears (layer-stacked)
    assert runs[0]["other_model"] is not None and "not the one calibrate() quantized" in runs[0]["other_model"]


def test_wrapped_model_is_unwrapped_and_keeps_state_in_its_checkpoint(runs):
    for run in runs:
        assert run["wrapped_inner"]
        assert run["wrapped_state_keys"] == 2 * 4 * 3


def test_model_chunks_and_fused_wgrad_are_refused(runs):
    for run in runs:
        chunks, fused = run["refusals"]
        assert chunks is not None and chunks.startswith("LayoutError: virtual pipeline parallelism (2 model chunk(s)")
        assert fused is not None and fused.startswith("ConfigError: ")
        assert f"gradient_accumulation_fusion is on in ['{GRAD_CHECKED}']" in fused


def test_ddp_data_parallel_calibration_equals_all_data_in_one_process(ddp_runs):
    for run in ddp_runs:
        assert run["calib_differences"] == []
        assert run["calib_tokens"] == [CALIB_MB * MBS * SEQ]  # both ranks' halves, summed over DP
        assert run["state_keys"] == 2 * 4 * 3  # DDP's sharded_state_dict carries the state
    table, silent = ddp_runs[0]["printed"], ddp_runs[1]["printed"]
    assert "decoder.layers.1.mlp.linear_fc2" in table and "rel.err" in table, "rank 0 logs the report"
    assert silent == ""


def test_ddp_qat_keeps_replicas_in_sync_and_exports_the_fake_quant_weights(ddp_runs):
    first, second = ddp_runs
    for run in ddp_runs:
        assert torch.isfinite(run["losses"]).all() and run["losses"].numel() == 2 * 2
        assert len(run["changed"]) == 2 * 4 and run["state_unchanged"]
    assert not torch.equal(first["losses"], second["losses"])  # the ranks trained on different data
    assert all(torch.equal(w, second["weights"][n]) for n, w in first["weights"].items())
    exported, fq = first["exported"], first["fq"]
    assert set(exported) == set(fq) and all(torch.equal(exported[n], fq[n]) for n in fq)


def test_hook_options_are_checked_up_front():
    from torch import nn

    from nvfp4_dist import ConfigError, NVFP4Hook

    with pytest.raises(ConfigError, match="needs hf_config"):
        NVFP4Hook(export_dir="out")
    with pytest.raises(ConfigError, match="calib_microbatches=0"):
        NVFP4Hook(calib_microbatches=0)
    with pytest.raises(ConfigError, match="export format 'gguf'"):
        NVFP4Hook(export_format="gguf")
    with pytest.raises(ConfigError, match="call hook.calibrate"):
        NVFP4Hook().export([nn.Linear(16, 16)])
