"""transformers fused experts under FSDP2 (real torch.distributed, gloo, two processes).

Two ranks == one process, bit for bit, when every rank feeds all the calibration data
(``fsdp_context(data_split=False)``): the searched states (block amax, DSS betas, global and
input amax, dead experts' borrowed input amax), the quantizer buffers (DTensors sharded like the
weights, gathered here for the comparison only), the per-layer report (the same rows on every
rank), the fake-quant forward's logits and every tensor of the export, whose keys name every
expert once. The searches see only this rank's experts (or rows), and nothing is gathered between
the calibration forward and the state write. Layouts: experts sharded over the expert axis
(``fully_shard``'s default; E=4 even, E=3 uneven) and over the rows (``Shard(1)``); a DCP
save/restore round trip; with the default context (each rank half the data) the token counts and
input amaxes equal one process's and the Hessians agree up to summation order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

DEAD = {0: (1,), 1: (2,)}  # layer -> experts no token reaches
# W4A4 (block amax, global and input amax; with DSS its betas) of the experts alone: the 2-D
# FSDP2 path has its own tests, and the CPU searches dominate the time of these.
CONFIGS = {"dss": dict(method="local_hessian", dss=True, include=("*.experts",)),
           "local_hessian": dict(method="local_hessian", include=("*.experts",))}


def _moe(num_experts: int, device):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_testutil import small_moe

    dead = {k: tuple(e for e in v if e < num_experts) for k, v in DEAD.items()}
    return small_moe(num_experts=num_experts, dead=dead).to(device)


def _shard(model, layout: str):
    """FSDP2 over all ranks: ``experts`` (fully_shard's dim 0) or ``rows`` (dim 1 of 3-D params)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from nvfp4_dist.launch import shard_fsdp2

    if layout == "experts":
        return shard_fsdp2(model)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    placement = lambda p: Shard(1) if p.dim() == 3 else Shard(0)  # noqa: E731
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


def _buffers(model) -> dict:
    """Every experts quantizer buffer, whole (DTensors gathered: test only; in name order, the
    same on every rank, whatever order the ranks registered them in)."""
    out = {}
    for name, buf in sorted(model.named_buffers()):
        if ".experts." in name and "_nvfp4_" in name:
            out[name] = (buf.full_tensor() if hasattr(buf, "full_tensor") else buf).detach().cpu()
    return out


def _split_statistics(model, config, loop) -> dict:
    """observe + reduce of ``model`` under the default context (data split over the ranks)."""
    from nvfp4_dist.calib import stages
    from nvfp4_dist.calib.discover import discover
    from nvfp4_dist.parallel.access import local_shards
    from nvfp4_dist.parallel.registry import detect_context

    ctx = detect_context(model)
    with local_shards(model):
        inventory = discover(model, config, ctx)
    store = stages.observe(model, inventory, config, loop)
    with local_shards(model):
        statistics = stages.reduce(inventory, store, True, ctx, next(model.parameters()).device)
    return {key: (s.tokens, s.amax.cpu(), s.hessian_sum.cpu()) for key, s in statistics.inputs.items()}


def _experts_run(num_experts: int, layout: str, method: str, out_dir: str) -> dict:
    """Worker: quantize the FSDP2 model with all the data on every rank (watching for gathers
    between the end of the calibration forward and the state write), export it, save/restore it
    with DCP; then the statistics of a fresh one with the data split over the ranks."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_testutil import forward_loop, tokens

    from nvfp4_dist import QuantConfig, export_checkpoint, quantize
    from nvfp4_dist.calib.checkpoint import save_dcp_checkpoint
    from nvfp4_dist.calib.restore import restore
    from nvfp4_dist.launch import init_distributed
    from nvfp4_dist.parallel.fsdp import fsdp_context
    from fsdp_testutil import _Spy

    device = init_distributed(timeout_s=120).device
    rank = dist.get_rank()
    ids = tokens(4, 16).to(device)
    config = QuantConfig(**CONFIGS[method])
    ref = _reference(num_experts, config, ids, f"{out_dir}/reference")
    model = _shard(_moe(num_experts, device), layout)
    ctx = fsdp_context(model, data_split=False)
    spy = _Spy()
    result = quantize(model, config, forward_loop(ids), ctx=ctx, show_progress=False)
    search_calls = list(spy.calls)
    experts = model.model.layers[0].mlp.experts
    held = sorted(s.moe.index for s in result.slots if s.moe is not None and s.param_name == "down_proj"
                  and s.module is experts and s.layout.local_shape[0] > 0)
    placements_ok = isinstance(experts.gate_up_proj_nvfp4_block_scale, DTensor) and tuple(
        experts.gate_up_proj_nvfp4_block_scale.placements) == tuple(experts.gate_up_proj.placements)
    searched = sorted({shape for shape, _ in spy.searched})  # the weights handed to the searches
    with torch.no_grad():
        logits = model(input_ids=ids).logits.cpu()
    buffers = _buffers(model)
    summary = export_checkpoint(model, result, f"{out_dir}/export")
    dead = [r.name for r in result.experts.dead]
    table = result.table()  # collective: every rank
    report = {row.name: (row.method, row.sums.cpu()) for row in result.layer_report()}

    save_dcp_checkpoint(model, f"{out_dir}/dcp")
    fresh = _shard(_moe(num_experts, device), layout)
    restored = restore(fresh, config, dcp_checkpoint=f"{out_dir}/dcp")
    with torch.no_grad():
        restored_logits = fresh(input_ids=ids).logits.cpu()
    restored_buffers = _buffers(fresh)
    export_checkpoint(fresh, restored, f"{out_dir}/restored_export")

    share = ids.chunk(dist.get_world_size())[rank]
    split_stats = _split_statistics(_shard(_moe(num_experts, device), layout), config, forward_loop(share))
    return dict(ref=ref if rank == 0 else None, held=held, placements_ok=placements_ok, searched=searched, logits=logits, buffers=buffers,
                search_calls=search_calls, report=report,
                quantized=list(summary.quantized), dead=dead, table="dead expert" in table,
                restored_logits=restored_logits, restored_buffers=restored_buffers, split_stats=split_stats)


def _reference(num_experts: int, config, ids, out_dir: str) -> dict:
    """The one-process run (every rank computes it, on its own device, with no collective but
    the export's, where each rank writes part of a model every rank holds whole)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_testutil import forward_loop

    from nvfp4_dist import ParallelContext, export_checkpoint, quantize

    model = _moe(num_experts, ids.device)
    result = quantize(model, config, forward_loop(ids), ctx=ParallelContext(), show_progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.cpu()
    export_checkpoint(model, result, out_dir)
    stats = {key: (s.tokens, s.amax.cpu(), s.hessian_sum.cpu()) for key, s in result.statistics.inputs.items()}
    report = {row.name: (row.method, row.sums.cpu()) for row in result.layer_report()}
    return dict(logits=logits, buffers=_buffers(model), dead=[r.name for r in result.experts.dead], stats=stats,
                report=report)


def _tensors(path: Path) -> tuple[dict, list[str]]:
    from safetensors.torch import load_file

    tensors, keys = {}, []
    for file in sorted(path.glob("*.safetensors")):
        part = load_file(file)
        keys += list(part)
        tensors.update(part)
    return tensors, keys


@pytest.fixture(scope="module", params=[(4, "experts", "dss"), (3, "experts", "local_hessian"), (4, "rows", "dss")],
                ids=["experts-even", "experts-uneven", "rows"])
def runs(request, tmp_path_factory):
    num_experts, layout, method = request.param
    tmp = tmp_path_factory.mktemp(f"fsdp_experts_{num_experts}_{layout}")
    ranks = run_ranks(_experts_run, 2, num_experts, layout, method, str(tmp))
    return dict(num_experts=num_experts, layout=layout, method=method, tmp=tmp, ranks=ranks, ref=ranks[0]["ref"])


def test_each_rank_searches_what_it_holds(runs):
    ranks, n = runs["ranks"], runs["num_experts"]
    for r in ranks:
        assert r["placements_ok"], "quantizer block state should be a DTensor placed like the weight"
        assert r["search_calls"] == [], f"gather/unshard between the forward and the state write: {r['search_calls']}"
    if runs["layout"] == "experts":
        # torch.chunk: ceil(E / 2) experts on rank 0, the rest on rank 1; each expert held once
        assert ranks[0]["held"] == list(range((n + 1) // 2)) and ranks[1]["held"] == list(range((n + 1) // 2, n))
        for r in ranks:  # whole experts: gate_up [64, 64], down [64, 32]
            assert r["searched"] == [(64, 32), (64, 64)], r["searched"]
    else:  # every rank holds half the rows of every expert
        for r in ranks:
            assert r["held"] == list(range(n))
            assert r["searched"] == [(32, 32), (32, 64)], r["searched"]


def test_two_ranks_equal_one_process(runs):
    ref = runs["ref"]
    for r in runs["ranks"]:
        suffixes = 4 if runs["method"] == "dss" else 3  # block, global, input amax (+ DSS betas)
        assert sorted(r["buffers"]) == sorted(ref["buffers"]) and len(ref["buffers"]) == 2 * 2 * suffixes
        for name, value in ref["buffers"].items():
            assert torch.equal(r["buffers"][name], value), name
        assert torch.equal(r["logits"], ref["logits"]), "fake-quant forward differs from one process"
        assert r["dead"] == ref["dead"] and r["dead"], "dead experts should be found, the same on every rank"
        assert r["table"], "the run table lists the dead experts"


def test_every_rank_reports_every_expert(runs):
    """The per-layer report: the same rows on every rank (an expert's sums reduced over the
    group from the rank, or the rows, that hold it), one process's figures."""
    ref, (first, second) = runs["ref"]["report"], runs["ranks"]
    assert sorted(first["report"]) == sorted(ref) and len(ref) == 2 * 2 * runs["num_experts"]
    for name, (method, sums) in ref.items():
        assert first["report"][name][0] == second["report"][name][0] == method, name
        assert torch.equal(first["report"][name][1], second["report"][name][1]), name
        if runs["layout"] == "experts":  # one rank's sums of the whole expert, plus zeros
            assert torch.equal(first["report"][name][1], sums), name
        else:  # fp32 sums over each rank's rows, then added: the summation order differs
            torch.testing.assert_close(first["report"][name][1], sums, rtol=1e-6, atol=0)


def test_dead_experts_get_weight_only_scales_and_borrowed_input_amax(runs):
    ref, buffers = runs["ref"], runs["ranks"][0]["buffers"]
    name = "model.layers.0.mlp.experts.gate_up_proj_nvfp4_input_amax"
    live = [e for e in range(runs["num_experts"]) if e != 1]
    assert torch.equal(buffers[name][1], buffers[name][live].max()), "dead expert 1 borrows the family max"
    assert "model.layers.0.mlp.experts.1.gate_up_proj" in ref["dead"]
    for r in runs["ranks"]:  # weight-only MSE search on whichever rank holds it, reported everywhere
        assert r["report"]["model.layers.0.mlp.experts.1.gate_up_proj"][0] == "mse"


def test_export_bit_identical_and_names_every_expert_once(runs):
    ours, keys = _tensors(runs["tmp"] / "export")
    theirs, _ = _tensors(runs["tmp"] / "reference")
    assert len(keys) == len(set(keys)), "a tensor is written twice"
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    n = runs["num_experts"]
    expected = {f"model.layers.{l}.mlp.experts.{e}.{p}" for l in range(2) for e in range(n)
                for p in ("gate_proj", "up_proj", "down_proj")}
    assert {k.rpartition(".")[0] for k in ours if ".experts." in k} == expected
    for r in runs["ranks"]:
        assert sorted(m for m in r["quantized"] if ".experts." in m) == sorted(expected)


def test_dcp_round_trip(runs):
    for r in runs["ranks"]:
        assert sorted(r["restored_buffers"]) == sorted(r["buffers"])
        for name, value in r["buffers"].items():
            assert torch.equal(r["restored_buffers"][name], value), name
        assert torch.equal(r["restored_logits"], r["logits"])
    ours, _ = _tensors(runs["tmp"] / "restored_export")
    theirs, _ = _tensors(runs["tmp"] / "reference")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_data_split_sums_statistics_over_the_ranks(runs):
    ref = runs["ref"]["stats"]
    for r in runs["ranks"]:
        assert sorted(r["split_stats"]) == sorted(ref)
        for key, (tokens, amax, hessian) in ref.items():
            got_tokens, got_amax, got_hessian = r["split_stats"][key]
            assert got_tokens == tokens and torch.equal(got_amax, amax), key
            torch.testing.assert_close(got_hessian, hessian, rtol=1e-9, atol=1e-9 * float(hessian.abs().max()))


def _refusals() -> list[str]:
    """Worker: experts sharded over their input channels, and FSDP2 experts under a context
    without the FSDP group: the LayoutError messages (before any calibration work)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_testutil import forward_loop, tokens

    from nvfp4_dist import ParallelContext, QuantConfig, quantize
    from nvfp4_dist.errors import LayoutError
    from nvfp4_dist.launch import init_distributed, shard_fsdp2

    device = init_distributed(timeout_s=60).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    channels = _moe(4, device)
    for layer in channels.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=lambda p: Shard(2) if p.dim() == 3 else Shard(0))
    messages = []
    for model, ctx in ((channels, None), (shard_fsdp2(_moe(4, device)), ParallelContext())):
        try:
            quantize(model, QuantConfig(method="max"), forward_loop(tokens(2, 8).to(device)), ctx=ctx,
                     show_progress=False)
            messages.append("no error")
        except LayoutError as exc:
            messages.append(str(exc))
    return messages


def test_input_channel_sharding_and_a_context_without_fsdp_are_refused():
    for channels, no_fsdp in run_ranks(_refusals, 2):
        assert channels.startswith("model.layers.0.mlp.experts.gate_up_proj: FSDP2 shards it over its input "
                                   "channels (dim 2)") and "\n" not in channels, channels
        assert no_fsdp.startswith("model.layers.0.mlp.experts: fused experts sharded as DTensors need the "
                                  "FSDP2 context") and "\n" not in no_fsdp, no_fsdp
