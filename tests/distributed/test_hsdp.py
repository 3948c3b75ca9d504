"""HSDP (FSDP2 over a 2-D ``("replicate", "shard")`` mesh, placements ``(Replicate(), Shard(0))``):
quantize(), export and DCP at 2 x 2, four real gloo ranks.

* every rank feeds all the data (``fsdp_context(data_split=False)``): fake-quant weights and the
  fake-quant forward are bit-identical to one process for max, mse, local_hessian and DSS, and the
  search phase neither unshards, gathers nor all-gathers (the spy of test_fsdp2);
* each rank feeds its own quarter (auto-detected context: statistics summed over all four
  ranks): max bit-identical to one process on all the data; local_hessian Hessians equal up to
  fp32 summation order, differing scales only at loss near-ties;
* the HF export from the four ranks is byte-identical to the single-process export, every
  tensor written once (the second replica writes nothing twice);
* DCP: the HSDP quantizer state (DTensors over the 2-D mesh) saved at 2 x 2 restores into one
  process bit-identically;
* 2-D placements other than ``(Replicate(), Shard(d))`` are refused with LayoutError.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # checkpoint_testutil

from harness import run_ranks
from small_model import small_hf_model, small_tokens
from fsdp_testutil import METHODS, _fq_whole, _Spy

from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.kernels.reference import block_loss
from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.parallel.context import SINGLE_PROCESS

pytestmark = pytest.mark.distributed

SPLIT_METHODS = ("max", "local_hessian")
DCP_METHOD = "dss"


def _loop_over(data):
    return lambda model: [model(data[i:i + 2]) for i in range(0, data.shape[0], 2)]


def _hsdp(model, mesh):
    """``fully_shard`` every decoder layer, then the root, over the 2-D mesh (HSDP)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _refusals(mesh) -> dict:
    """fsdp_context on a model holding a 2-D-mesh DTensor weight of an unsupported placement."""
    from torch import nn
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from nvfp4_dist.errors import LayoutError
    from nvfp4_dist.parallel.fsdp import fsdp_context

    out = {}
    for label, placements in {"shard-shard": [Shard(0), Shard(1)],
                              "shard-replicate": [Shard(0), Replicate()]}.items():
        model = nn.Sequential(nn.Linear(32, 32, bias=False))
        weight = distribute_tensor(model[0].weight.detach(), mesh, placements)
        model[0].weight = nn.Parameter(weight)
        try:
            fsdp_context(model)
            out[label] = None
        except LayoutError as exc:
            out[label] = str(exc)
    return out


def _hsdp_worker(export_dir: str, dcp_dir: str) -> dict | None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from checkpoint_testutil import slot_records

    from nvfp4_dist.export import export_checkpoint
    from nvfp4_dist.launch import init_distributed
    from nvfp4_dist.parallel.registry import detect_context
    from nvfp4_dist.parallel.fsdp import fsdp_context

    init_distributed(timeout_s=120)
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    tokens = small_tokens()
    spy = _Spy()
    out = {"refusals": _refusals(mesh), "replicated": {}, "split": {}}
    for name in METHODS:
        model = _hsdp(small_hf_model(), mesh)
        ctx = fsdp_context(model, data_split=False)
        spy.calls.clear()
        spy.searched.clear()
        result = quantize(model, QuantConfig(**METHODS[name]), _loop_over(tokens), ctx=ctx, show_progress=False)
        search_calls = list(spy.calls)
        local_rows_ok = all(shape == tuple(s.layout.local_shape) and s.layout.local_shape[0] < s.layout.global_shape[0]
                            for s, (shape, _) in zip(result.slots, spy.searched))
        state = result.slots[0].module.weight_nvfp4_block_scale
        with torch.no_grad():
            logits = model(tokens).logits
        out["replicated"][name] = dict(
            fq={k: v.cpu() for k, v in _fq_whole(result, ctx).items()}, logits=logits,
            search_calls=search_calls, local_rows_ok=local_rows_ok,
            state_placements=[type(p).__name__ for p in state.placements] if isinstance(state, DTensor) else None,
            state_local_rows=int(state.to_local().shape[0]), state_rows=int(state.shape[0]))
        if name == "max":
            export_checkpoint(model, result, export_dir, fmt="modelopt",
                              config=small_hf_model().config.to_dict())
        if name == DCP_METHOD:
            out["dcp_records"] = slot_records(result.slots, ctx)
            dcp.save(get_model_state_dict(model), checkpoint_id=dcp_dir)
    share = tokens.chunk(dist.get_world_size())[rank]
    for name in SPLIT_METHODS:
        model = _hsdp(small_hf_model(), mesh)
        spy.searched.clear()
        result = quantize(model, QuantConfig(**METHODS[name]), _loop_over(share), show_progress=False)
        ctx = detect_context(model)
        out["split"][name] = dict(
            fq={k: v.cpu() for k, v in _fq_whole(result, ctx).items()},
            hessians={s.name: h.cpu() for s, (_, h) in zip(result.slots, spy.searched) if h is not None})
    return out if rank == 0 else None


def _reference(name: str) -> dict:
    """One process, all the data: fake-quant weights, logits, Hessians, weights."""
    import nvfp4_dist.calib.stages as stages

    searched = []
    search = stages.search_block_scales

    def recording(w, g, method, hessian=None, **kwargs):
        searched.append(hessian)
        return search(w, g, method, hessian=hessian, **kwargs)

    model, tokens = small_hf_model(), small_tokens()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (harness): the same matmul reduction order
    stages.search_block_scales = recording
    try:
        result = quantize(model, QuantConfig(**METHODS[name]), _loop_over(tokens), ctx=SINGLE_PROCESS,
                          show_progress=False)
        with torch.no_grad():
            logits = model(tokens).logits
    finally:
        stages.search_block_scales = search
        torch.set_num_threads(threads)
    return dict(model=model, result=result, logits=logits, fq=_fq_whole(result, SINGLE_PROCESS),
                hessians={s.name: h for s, h in zip(result.slots, searched) if h is not None},
                weights={s.name: s.module.weight.detach() for s in result.slots})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    hsdp = run_ranks(_hsdp_worker, 4, str(root / "export"), str(root / "dcp"))[0]
    refs = {name: _reference(name) for name in METHODS}
    return hsdp, refs, root


@pytest.mark.parametrize("method", list(METHODS))
def test_hsdp_replicated_data_bit_identical_to_one_process(runs, method):
    hsdp, refs, _ = runs
    got, ref = hsdp["replicated"][method], refs[method]
    assert set(got["fq"]) == set(ref["fq"])
    assert [k for k in ref["fq"] if not torch.equal(got["fq"][k], ref["fq"][k])] == []
    assert torch.equal(got["logits"], ref["logits"]), "fake-quant forward under HSDP differs"
    assert got["state_placements"] == ["Replicate", "Shard"], "state must be placed like the weight"
    assert got["state_local_rows"] < got["state_rows"]


@pytest.mark.parametrize("method", list(METHODS))
def test_hsdp_search_touches_local_shards_only(runs, method):
    got = runs[0]["replicated"][method]
    assert got["search_calls"] == [], f"gather/unshard during the search phase: {got['search_calls']}"
    assert got["local_rows_ok"], "a search saw more than this rank's rows"


def test_hsdp_data_split_max_bit_identical(runs):
    hsdp, refs, _ = runs
    got, ref = hsdp["split"]["max"]["fq"], refs["max"]["fq"]
    assert set(got) == set(ref)
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []


def test_hsdp_data_split_hessians_sum_all_ranks(runs):
    hsdp, refs, _ = runs
    got, ref = hsdp["split"]["local_hessian"], refs["local_hessian"]
    assert ref["hessians"] and set(got["hessians"]) == set(ref["hessians"])
    for name, h_ref in ref["hessians"].items():
        # Summed over the four quarters (both mesh dimensions): equal up to fp32 summation order.
        # A sum over the shard group alone would hold half the tokens and fail this.
        torch.testing.assert_close(got["hessians"][name], h_ref, rtol=1e-5, atol=1e-6 * h_ref.abs().max().item())
        w, fq_ref, fq_split = ref["weights"][name], ref["fq"][name], got["fq"][name]
        loss_ref = block_loss(nvfp4.blocks(w - fq_ref), h_ref)
        loss_split = block_loss(nvfp4.blocks(w - fq_split), h_ref)
        changed = (nvfp4.blocks(fq_ref) != nvfp4.blocks(fq_split)).any(-1)
        gap = (loss_split - loss_ref).abs()[changed]
        assert bool((gap <= 1e-5 * loss_ref[changed].abs().clamp_min(1e-30)).all()), name


def _tensor_files(path) -> dict[str, list[str]]:
    """Tensor name -> the files that hold it."""
    where: dict[str, list[str]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                where.setdefault(key, []).append(file.name)
    return where


def test_hsdp_export_equals_single_process(runs, tmp_path):
    from export_testutil import differing_tensors

    from nvfp4_dist.export import export_checkpoint

    hsdp, refs, root = runs
    ref = refs["max"]
    export_checkpoint(ref["model"], ref["result"], tmp_path / "single", fmt="modelopt")
    got_dir, ref_dir = root / "export", tmp_path / "single"
    where = _tensor_files(got_dir)
    assert {k: v for k, v in where.items() if len(v) > 1} == {}, "a tensor was written twice"
    assert differing_tensors(got_dir, ref_dir) == []


def test_hsdp_dcp_state_restores_in_one_process(runs):
    from checkpoint_testutil import differences, slot_records

    from nvfp4_dist import init_quantizer_state, load_dcp_checkpoint

    hsdp, refs, root = runs
    model = small_hf_model()
    inv = init_quantizer_state(model, QuantConfig(**METHODS[DCP_METHOD]))
    load_dcp_checkpoint(model, str(root / "dcp"))
    restored = slot_records(inv.slots, SINGLE_PROCESS)
    assert differences(hsdp["dcp_records"], restored) == []
    assert differences(slot_records(refs[DCP_METHOD]["result"].slots, SINGLE_PROCESS), restored) == []
    with torch.no_grad():
        assert torch.equal(model(small_tokens()).logits, refs[DCP_METHOD]["logits"])


@pytest.mark.parametrize("label", ["shard-shard", "shard-replicate"])
def test_hsdp_unsupported_placement_refused(runs, label):
    message = runs[0]["refusals"][label]
    assert message is not None, f"{label} placements were accepted"
    assert "(Replicate(), Shard(d))" in message and "parameter 0.weight" in message, message
