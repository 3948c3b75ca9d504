"""NVFP4Hook restarts: QAT interrupted at TP=2 and resumed at TP=1 continues as the uninterrupted
run; re-calibration mid-training (real megatron-core, gloo, two processes per run).

Run A (TP=2, DP=1; one model under Megatron's DistributedDataParallel, plain SGD, fixed data):
calibrate, train 2 steps, save the Megatron distributed checkpoint (the interruption point: the
state an interrupted run would have saved, bit for bit, since every step is deterministic), train
step 3, export: the UNINTERRUPTED run. Then, on the same model, re-calibrate on other data.

Run B (new processes, TP=1, DP=2; a model built from OTHER weights, so everything comes from
the checkpoint): ``hook.resume`` (no calibration), train step 3 (each data-parallel rank one of
the step's two microbatches, DDP averages the gradients), export: the RESUMED run.

What must hold:
* the quantizer state (block / global / input amaxes, and so the exported FP8 block scales and
  FP32 global / input scales) is bit-identical: it is loaded, never trained;
* the step-3 losses and the trained weights agree within a measured tolerance, not bitwise: TP=2
  sums each row-parallel matmul as two partial sums plus an all-reduce and averages the two
  microbatches' gradients inside one rank, TP=1 x DP=2 sums the full matmul and averages over
  the DP all-reduce; both are fp32 with other summation orders. Measured on this model (one SGD
  step, lr 0.05, which moves the weights by ~7% of their magnitude): the step-3 losses came out
  bit-equal, the trained quantized weights differ in the last bits of 15% of their elements,
  by at most 6.7e-8 relative to the weight's max |w| (7.5e-9 absolute), the embedding and
  output layer by at most 1.3e-7; with lr 0.5, 8.3e-7 (losses 1.7e-7). The test bounds both at
  REL_TOL = 1e-6 (a few fp32 ulps of the largest weight). An exported FP4 code whose weight sits
  within that distance of a rounding boundary may move to the NEIGHBOURING E2M1 level: none did
  (0 of 73728); the test allows at most 0.1% of the codes, never further than one level;
* the forward after the resume is the fake-quant one (the losses equal the uninterrupted run's
  fake-quant losses; the same model without its quantizer state, ``clear_quantizer_state``,
  computes another loss), the straight-through backward is installed (the trained weights
  match), and the export after the resume equals the model's fake-quant weights exactly;
* resuming the Megatron way (``prepare_resume`` + ``dist_checkpointing.load(model.sharded_state_dict())``
  + ``load_state_dict``) gives the same state and weights as ``resume``; a config with other
  DSS / weight-only settings than the checkpoint's is refused, naming the keys;
* re-calibration after QAT steps equals ``quantize()`` of a fresh model holding the current
  weights (bit-identical state), replaces the fake-quant hooks (no second set), keeps exactly one
  set of quantizer entries in ``sharded_state_dict``, and the export writes the new scales.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from harness import run_ranks  # noqa: E402
from test_megatron_hook import MBS, SEQ, _batches, _fake_quant_records, _forward_step, _patch_schedule_for_cpu  # noqa: E402

pytestmark = pytest.mark.distributed

CALIB_MB, LR = 4, 0.05
REL_TOL = 1e-6  # trained weights and losses, TP=2 vs TP=1 x DP=2 (see the module docstring)
MAX_MOVED_CODES = 1e-3  # fraction of FP4 codes allowed to move to the neighbouring level
N_SLOTS, N_SUFFIXES = 2 * 4, 3  # quantized linears (2 layers x 4), buffers each (global, block, input amax)


def _config():
    from nvfp4_dist import QuantConfig

    return QuantConfig(method="local_hessian")


def _step_batches(step: int) -> list[dict]:
    """The fixed data of training step ``step``: two microbatches."""
    from small_model import small_tokens

    return _batches(small_tokens(samples=2 * MBS, seq_len=SEQ, seed=10 + step))


def _ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    model.config.finalize_model_grads_func = finalize_model_grads  # as Megatron's training sets it up
    model.config.no_sync_func = ddp.no_sync
    return ddp


def _train_step(ddp, optimizer, batches) -> torch.Tensor:
    """One iteration: Megatron's schedule over ``batches``, DDP's reduced grads, an SGD step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(forward_step_func=_forward_step([]), data_iterator=iter(batches),
                                         model=[ddp], num_microbatches=len(batches), seq_length=SEQ,
                                         micro_batch_size=MBS, forward_only=False)
    for p in ddp.parameters():
        p.grad = p.main_grad
    optimizer.step()
    # The schedule divides the loss it reports by the number of microbatches, in place.
    return torch.stack([d["lm loss"] for d in losses]) * len(batches)


def _loss(model, batch) -> torch.Tensor:
    from nvfp4_dist.models.megatron_gpt import causal_mask

    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    return model(tokens, positions, attention_mask=causal_mask(tokens.shape[1], "cpu"), labels=batch["labels"]).mean()


def _weights(slots, ctx) -> dict:
    """HF module name -> the high-precision weight of its rows, gathered over TP."""
    from nvfp4_dist.parallel.access import local_weight
    from nvfp4_dist.parallel.reduce import gather_slot_tensor

    out = {}
    with torch.no_grad():
        for slot in slots:
            whole = gather_slot_tensor(local_weight(slot).detach().contiguous(), slot.layout, ctx, elems_per_col=1)
            out.update({part.name: whole[part.rows].clone() for part in slot.parts()})
    return out


def _hook_counts(slots) -> dict:
    return {s.name: (len(s.module._forward_pre_hooks), len(s.module._forward_hooks)) for s in slots}


def _state_entries(model) -> int:
    return sum("_nvfp4_" in k for k in model.sharded_state_dict())


def _uninterrupted_worker(root: str) -> dict:
    from checkpoint_testutil import allow_megatron_save_in_worker, differences, slot_records
    from small_model import small_hf_model, small_tokens

    from nvfp4_dist import NVFP4Hook, quantize
    from nvfp4_dist.calib.checkpoint import save_megatron_checkpoint
    from nvfp4_dist.export.reader import read_dequantized
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
    from nvfp4_dist.parallel.megatron import megatron_context

    _patch_schedule_for_cpu()
    allow_megatron_save_in_worker()
    init_distributed(timeout_s=120)
    init_megatron(2, timeout_s=120)
    hf = small_hf_model()
    model = build_megatron_gpt(hf).train()
    ddp = _ddp(model)
    hook = NVFP4Hook(_config(), calib_microbatches=CALIB_MB, export_dir=f"{root}/uninterrupted",
                     hf_config=hf.config.to_dict(), show_progress=False)
    result = hook.calibrate([ddp], iter(_batches(small_tokens(samples=CALIB_MB * MBS, seq_len=SEQ))),
                            _forward_step([]), seq_length=SEQ, micro_batch_size=MBS)
    ctx = result.ctx
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    out = {"losses": [_train_step(ddp, optimizer, _step_batches(step)) for step in (1, 2)]}
    save_megatron_checkpoint(model, f"{root}/ckpt")  # the interrupted run's checkpoint; inner keys, as Megatron saves
    out["at_save"] = _weights(result.slots, ctx)
    out["losses"].append(_train_step(ddp, optimizer, _step_batches(3)))
    hook.export([ddp])
    out["state"] = slot_records(result.slots, ctx)
    out["weights"] = _weights(result.slots, ctx)

    # Re-calibration after 3 QAT steps, on other data: as a first calibration of these weights.
    hooks_before, entries_before = _hook_counts(result.slots), _state_entries(ddp)
    tokens = small_tokens(samples=CALIB_MB * MBS, seq_len=SEQ, seed=7)
    hook.export_dir = f"{root}/recalibrated"
    again = hook.calibrate([ddp], iter(_batches(tokens)), _forward_step([]), seq_length=SEQ, micro_batch_size=MBS)
    reference = build_megatron_gpt(hf)
    with torch.no_grad():
        for (name, p), (ref_name, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
            assert name == ref_name
            q.copy_(p)
    ref_result = quantize(reference, _config(), megatron_forward_loop(tokens, MBS), ctx=megatron_context(True),
                          show_progress=False)
    out["recal_differences"] = differences(slot_records(ref_result.slots, ctx), slot_records(again.slots, ctx))
    out["recal_changed"] = differences(out["state"], slot_records(again.slots, ctx))
    out["recal_hooks"] = (hooks_before, _hook_counts(again.slots))
    out["recal_entries"] = (entries_before, _state_entries(ddp))
    out["recal_losses"] = _train_step(ddp, optimizer, _step_batches(4))  # QAT goes on with the new state
    hook.export([ddp])
    out["recal_fq"] = _fake_quant_records(again.slots, ctx)
    out["recal_exported"] = read_dequantized(f"{root}/recalibrated") if torch.distributed.get_rank() == 0 else None
    return out


def _resumed_worker(root: str) -> dict:
    from checkpoint_testutil import differences, slot_records
    from megatron.core import dist_checkpointing
    from small_model import small_hf_model

    from nvfp4_dist import ExportError, NVFP4Hook, QuantConfig
    from nvfp4_dist.calib.restore import clear_quantizer_state
    from nvfp4_dist.export.reader import read_dequantized
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt

    _patch_schedule_for_cpu()
    init_distributed(timeout_s=120)
    init_megatron(1, timeout_s=120)
    hf = small_hf_model(seed=1)  # other weights than the checkpoint's: all of them are loaded
    model = build_megatron_gpt(hf).train()
    ddp = _ddp(model)
    hook = NVFP4Hook(_config(), export_dir=f"{root}/resumed", hf_config=small_hf_model().config.to_dict(),
                     show_progress=False)
    result = hook.resume([ddp], f"{root}/ckpt")
    ctx = result.ctx
    out = {"slots": sorted(s.name for s in result.slots), "hooks": _hook_counts(result.slots),
           "entries": _state_entries(ddp), "at_load": _weights(result.slots, ctx)}
    loaded = slot_records(result.slots, ctx)

    # The Megatron way: prepare, then Megatron's load of the model's sharded_state_dict.
    other = build_megatron_gpt(small_hf_model(seed=2))
    prepared = NVFP4Hook(_config(), show_progress=False)
    prepared.prepare_resume([other])
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), f"{root}/ckpt"))
    out["megatron_way"] = differences(loaded, slot_records(prepared.result.slots, ctx))
    batch = _step_batches(3)[0]
    with torch.no_grad():
        fake_quant_loss = _loss(other, batch)
        out["removed"] = clear_quantizer_state(other)
        out["losses_fq_plain"] = (fake_quant_loss, _loss(other, batch), _state_entries(other))
    refusals = []
    for config in (QuantConfig(method="local_hessian", dss=True), QuantConfig(quantize_inputs=False)):
        try:
            NVFP4Hook(config, show_progress=False).resume([build_megatron_gpt(hf)], f"{root}/ckpt")
            refusals.append(None)
        except ExportError as exc:
            refusals.append(str(exc))
    unloaded = NVFP4Hook(_config(), show_progress=False)
    unloaded.prepare_resume([build_megatron_gpt(hf)])  # and no load
    try:
        unloaded.result
        refusals.append(None)
    except ExportError as exc:
        refusals.append(str(exc))
    out["refusals"] = refusals

    rank = torch.distributed.get_rank()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    out["loss"] = _train_step(ddp, optimizer, _step_batches(3)[rank:rank + 1])  # DP: one microbatch each
    hook.export([ddp])
    out["state"] = slot_records(result.slots, ctx)
    out["weights"] = _weights(result.slots, ctx)
    out["fq"] = _fake_quant_records(result.slots, ctx)
    out["exported"] = read_dequantized(f"{root}/resumed") if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    uninterrupted = run_ranks(_uninterrupted_worker, 2, root)
    resumed = run_ranks(_resumed_worker, 2, root)  # new processes, another TP size
    return dict(root=Path(root), uninterrupted=uninterrupted, resumed=resumed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_quantizer_state_after_the_resume_at_another_tp_size_is_bit_identical(runs):
    ref = runs["uninterrupted"][0]["state"]
    for run in runs["resumed"]:
        assert len(run["slots"]) == N_SLOTS
        assert run["entries"] == N_SLOTS * N_SUFFIXES  # DDP's sharded_state_dict carries the state
        assert all(pre == 1 and post == 1 for pre, post in run["hooks"].values()), run["hooks"]
        assert run["megatron_way"] == []
        state = run["state"]
        assert set(state) == set(ref)
        bad = [f"{n}.{k}" for n, t in ref.items() for k, v in t.items() if k != "fq" and not torch.equal(v, state[n][k])]
        assert bad == []
    weights = runs["uninterrupted"][0]["at_save"]  # the checkpoint's weights arrive exactly
    assert all(torch.equal(w, runs["resumed"][0]["at_load"][n]) for n, w in weights.items())


def test_resumed_training_continues_as_the_uninterrupted_run(runs):
    ref = runs["uninterrupted"][0]
    step3 = ref["losses"][2]  # [microbatch 0, microbatch 1] of step 3, one TP=2 rank
    assert all(torch.equal(r["losses"][2], step3) for r in runs["uninterrupted"])
    for rank, run in enumerate(runs["resumed"]):
        assert _rel(run["loss"], step3[rank:rank + 1]) <= REL_TOL, (run["loss"], step3)
        for name, w in ref["weights"].items():
            assert _rel(run["weights"][name], w) <= REL_TOL, (name, _rel(run["weights"][name], w))
    first, second = runs["resumed"]
    assert all(torch.equal(w, second["weights"][n]) for n, w in first["weights"].items())  # replicas in sync
    assert not torch.equal(ref["losses"][1], step3)  # the steps trained on different data
    for run in runs["resumed"]:  # rank 0's microbatch of step 3 on the Megatron-way-resumed model
        fake_quant, plain, entries = run["losses_fq_plain"]
        assert _rel(fake_quant, step3[0]) <= REL_TOL and not torch.equal(fake_quant, plain)
        assert run["removed"] == N_SLOTS * N_SUFFIXES and entries == 0


def test_export_after_the_resume_equals_the_uninterrupted_export(runs):
    from export_testutil import export_contents

    from nvfp4_dist.export.reader import CheckpointReader, e2m1_values

    resumed, exported = runs["resumed"][0], runs["resumed"][0]["exported"]
    assert set(exported) == set(resumed["fq"]) and all(torch.equal(exported[n], resumed["fq"][n]) for n in exported)

    ours = export_contents(runs["root"] / "resumed")
    ref = export_contents(runs["root"] / "uninterrupted")
    assert set(ours) == set(ref)
    reader = CheckpointReader(runs["root"] / "resumed")
    modules = reader.quantized_modules()
    assert len(modules) == 2 * 7
    codes = {f"{m}.weight" for m in modules}
    assert all(ours[k] == ref[k] for k in ours if k not in codes and not k.endswith(".safetensors")
               and ("scale" in k or k.endswith(".json") or k == "shard metadata")), "scales / configs differ"
    moved, total = 0, 0
    grid = torch.tensor(sorted({v * s for v in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0) for s in (1, -1)}))
    other = CheckpointReader(runs["root"] / "uninterrupted")
    for key in sorted(codes):
        a, b = e2m1_values(reader.tensor(key)), e2m1_values(other.tensor(key))
        level = torch.searchsorted(grid, a) - torch.searchsorted(grid, b)
        assert level.abs().max() <= 1, key  # at most the neighbouring E2M1 level
        moved, total = moved + int((level != 0).sum()), total + level.numel()
    assert moved <= MAX_MOVED_CODES * total, (moved, total)
    plain = [k for k in ours if k not in codes and "scale" not in k and k.endswith(("weight", "bias"))]
    assert plain  # embeddings, norms, the output layer: trained, not quantized
    for key in plain:
        a, b = (torch.frombuffer(bytearray(t[2]), dtype=t[0]).reshape(t[1]) for t in (ours[key], ref[key]))
        assert _rel(a, b) <= REL_TOL, (key, _rel(a, b))


def test_recalibration_mid_training_replaces_the_state_and_the_export_uses_it(runs):
    for run in runs["uninterrupted"]:
        assert run["recal_differences"] == []  # == quantize() of a fresh model with these weights
        assert run["recal_changed"] != []  # new scales (searched on the trained weights)
        before, after = run["recal_hooks"]
        assert before == after and all(v == (1, 1) for v in after.values()), run["recal_hooks"]
        assert run["recal_entries"] == (N_SLOTS * N_SUFFIXES,) * 2  # one set of quantizer entries
        assert torch.isfinite(run["recal_losses"]).all()
    exported, fq = runs["uninterrupted"][0]["recal_exported"], runs["uninterrupted"][0]["recal_fq"]
    assert set(exported) == set(fq) and all(torch.equal(exported[n], fq[n]) for n in fq)


def test_resume_refuses_other_quantizer_settings_and_an_unloaded_resume_names_the_weights(runs):
    for run in runs["resumed"]:
        dss, weight_only, unloaded = run["refusals"]
        assert unloaded is not None and f"no quantizer state was loaded for {N_SLOTS} weight(s)" in unloaded
        assert dss is not None and "dss_beta" in dss and "linear_fc1.weight_nvfp4_" in dss
        assert weight_only is not None and "input_amax" in weight_only and "W4A4" in weight_only


def test_export_before_calibrate_or_resume_is_refused():
    from torch import nn

    from nvfp4_dist import ConfigError, NVFP4Hook

    with pytest.raises(ConfigError, match=r"hook.calibrate\(model, ...\) or hook.resume"):
        NVFP4Hook().export([nn.Linear(16, 16)])
