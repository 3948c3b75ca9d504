"""Megatron-core SequentialMLP experts under expert parallelism (real megatron-core, gloo, two
processes): every expert calibrated under its global index, EP=2 bit-identical to EP=1, dead
experts handled across EP ranks.

Both layouts run on two ranks with the calibration data split between them: EP=1 is data
parallel for the experts too (each rank holds every expert; statistics summed over the pair),
EP=2 puts experts 0-1 on rank 0 and 2-3 on rank 1, whose dispatcher brings them the tokens of
both ranks. The calibration forward runs in float64 (parallel.invariance) so that both layouts
observe the same fp32 inputs, and expert Hessians accumulate in float64 (observers.InputStats),
so the order tokens arrive in does not matter: the statistics, and therefore the searched
scales, are bit-identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

DEAD = {0: (2, 3)}  # layer 0: both experts of EP rank 1 at EP=2 receive no token
N_LAYERS, N_EXPERTS = 2, 4


def _patch_megatron_router() -> None:
    """megatron-core 0.16.1 reads moe_utils.te_general_gemm in every router forward but defines it
    only when TransformerEngine imports (models.megatron_moe.check_router_usable explains it to
    users); the test workers supply the missing name, as the TE-less branch should."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _ep_worker(eps: list[int]) -> dict | None:
    import torch.distributed as dist

    import nvfp4_dist.calib.stages as stages
    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.models.megatron_gpt import megatron_forward_loop
    from nvfp4_dist.models.megatron_moe import build_megatron_moe_gpt
    from nvfp4_dist.numerics import nvfp4
    from nvfp4_dist.parallel.access import local_weight
    from nvfp4_dist.parallel.invariance import float64_forward

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_testutil import small_moe, tokens

    _patch_megatron_router()
    init_distributed(timeout_s=120)
    hf = small_moe(dead=DEAD)
    data = tokens(8, 16).chunk(dist.get_world_size())[dist.get_rank()]
    # Record the Hessian each search receives (slots are searched in order).
    hessians, search = [], stages.search_block_scales

    def recording_search(w, g, method, hessian=None, **kwargs):
        hessians.append(hessian)
        return search(w, g, method, hessian=hessian, **kwargs)

    stages.search_block_scales = recording_search
    out = {}
    for ep in eps:
        ctx = init_megatron(1, ep=ep, data_split=True)
        model = build_megatron_moe_gpt(hf)
        loop = float64_forward(megatron_forward_loop(data, batch_size=2))
        hessians.clear()
        result = quantize(model, QuantConfig(method="local_hessian"), loop, ctx=ctx, show_progress=False)
        local = {}
        for slot, hessian in zip(result.slots, hessians, strict=True):
            if slot.moe is None:
                continue
            state = result.states[slot.name]
            w = local_weight(slot)
            local[slot.name] = dict(
                index=slot.moe.index, parts=[p.name for p in slot.parts()], tokens=state.tokens,
                dead=state.dead, method=state.method.value, block_amax=state.block_amax(),
                global_amax=state.global_amax, input_amax=state.input_amax, hessian=hessian,
                fq=nvfp4.fake_quant(w, state.block_amax(), state.global_amax, state.dss_beta()))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged = {}
        for part in gathered:
            for name, record in part.items():
                if name in merged:  # the same expert on two ranks (EP=1): identical by the reduce
                    assert all(torch.equal(merged[name][k], record[k]) for k in ("block_amax", "input_amax")), name
                merged[name] = record
        out[ep] = dict(experts=merged, dead=result.dead, table=result.table(),
                       summary=[(r.name, r.index, r.dead) for r in result.experts.records],
                       local=sorted(local))
    return out


@pytest.fixture(scope="module")
def runs():
    results = run_ranks(_ep_worker, 2, [1, 2])
    return results


def _names(fc):
    return {f"decoder.layers.{l}.mlp.experts.local_experts.{g}.{fc}" for l in range(N_LAYERS) for g in range(N_EXPERTS)}


def test_every_expert_gets_a_slot_under_its_global_index(runs):
    for ep in (1, 2):
        experts = runs[0][ep]["experts"]
        assert set(experts) == _names("linear_fc1") | _names("linear_fc2")
        for name, rec in experts.items():
            g = int(name.split(".")[-2])
            assert rec["index"] == g
            layer = name.split(".")[2]
            leaves = ["gate_proj", "up_proj"] if name.endswith("fc1") else ["down_proj"]
            assert rec["parts"] == [f"model.layers.{layer}.mlp.experts.{g}.{leaf}" for leaf in leaves]
        # The summary is complete on every rank, whichever experts the rank holds.
        for rank in (0, 1):
            assert len(runs[rank][ep]["summary"]) == N_LAYERS * N_EXPERTS * 2
    # EP=2: each rank holds and calibrates its own half of the experts, by global index.
    assert {int(n.split(".")[-2]) for n in runs[0][2]["local"]} == {0, 1}
    assert {int(n.split(".")[-2]) for n in runs[1][2]["local"]} == {2, 3}


def test_ep2_expert_scales_are_bit_identical_to_ep1(runs):
    ep1, ep2 = runs[0][1]["experts"], runs[0][2]["experts"]
    searched = 0
    for name, ref in ep1.items():
        got = ep2[name]
        assert got["tokens"] == ref["tokens"] and got["method"] == ref["method"], name
        if ref["hessian"] is not None:  # identical statistics, not just identical choices
            assert torch.equal(got["hessian"], ref["hessian"]), f"{name}: Hessians differ"
        for key in ("block_amax", "global_amax", "input_amax", "fq"):
            assert torch.equal(got[key], ref[key]), f"{name}: {key} differs between EP=1 and EP=2"
        searched += ref["method"] == "local_hessian"
    assert searched == len(ep1) - 2 * 2  # every live expert got the Hessian search


def test_dead_experts_across_expert_parallel_ranks(runs):
    for ep in (1, 2):
        experts = runs[0][ep]["experts"]
        dead = {n for n, r in experts.items() if r["dead"]}
        assert dead == {f"decoder.layers.0.mlp.experts.local_experts.{g}.{fc}" for g in DEAD[0]
                        for fc in ("linear_fc1", "linear_fc2")}
        for rank in (0, 1):  # every rank reports every dead expert, with its layer
            assert sorted(runs[rank][ep]["dead"]) == sorted(dead)
            for g in DEAD[0]:
                assert f"dead expert {g} of decoder.layers.0.mlp.experts" in runs[rank][ep]["table"]
        for name in dead:
            rec = experts[name]
            assert rec["method"] == "mse" and rec["tokens"] == 0
            assert torch.isfinite(rec["block_amax"]).all() and (rec["block_amax"] > 0).all()
            fc = name.rsplit(".", 1)[1]
            # At EP=2 the live experts of this layer sit on the other rank: the family's input
            # amax travels over the EP group.
            live = [experts[f"decoder.layers.0.mlp.experts.local_experts.{g}.{fc}"]["input_amax"]
                    for g in range(N_EXPERTS) if g not in DEAD[0]]
            assert torch.equal(rec["input_amax"], torch.stack(live).amax()) and float(rec["input_amax"]) > 0


CLI_ARGS = ["quantize", "--model", "tiny-moe", "--method", "max", "--weight-only", "--calib-samples", "4",
            "--seq-len", "16", "--no-progress", "--format", "modelopt"]


def _megatron_ep2_cli(out: str) -> int:
    from nvfp4_dist.cli import main

    _patch_megatron_router()
    return main([*CLI_ARGS, "--backend", "megatron", "--ep", "2", "--out", out])


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_cli_megatron_ep2_export_equals_the_single_process_export(tmp_path):
    """``--backend megatron --ep 2`` on tiny-moe exports, byte for byte, the checkpoint of one
    process with the HF model (``max``, weight-only: independent of activations): every expert
    under its global HF name, written by the rank that holds it, the router under HF's name."""
    from safetensors.torch import load_file

    from nvfp4_dist.cli import main
    from nvfp4_dist.export.inspect import inspect_checkpoint

    single, megatron = tmp_path / "single", tmp_path / "megatron"
    assert main([*CLI_ARGS, "--out", str(single)]) == 0
    assert run_ranks(_megatron_ep2_cli, 2, str(megatron)) == [0, 0]

    def tensors(path):
        out = {}
        for file in sorted(path.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    ref, got = tensors(single), tensors(megatron)
    assert sum(".experts." in k for k in ref) == 2 * 8 * 3 * 3  # layers x experts x projections x tensors
    assert set(got) == set(ref)
    assert [k for k in ref if not _same_bytes(got[k], ref[k])] == []
    report = inspect_checkpoint(megatron)
    assert report.ok, report.format()


def test_a_megatron_without_a_usable_router_is_refused_clearly(monkeypatch):
    import megatron.core.transformer.moe.moe_utils as moe_utils

    from nvfp4_dist.errors import ModelLoadError
    from nvfp4_dist.models.megatron_moe import check_router_usable

    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)
    with pytest.raises(ModelLoadError, match="TransformerEngine"):
        check_router_usable()
