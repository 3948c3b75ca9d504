"""Pipeline parallelism (real megatron-core, gloo, several processes): PP=2 exports what PP=1 does.

* CLI, 2 ranks, local_hessian + DSS, W4A4, float64 calibration forward: ``quantize --pp 2`` (each
  stage calibrates its own layer; the calibration forward runs Megatron's pipeline schedule with
  p2p over gloo) writes the same export as ``--pp 1``, tensor for tensor (names, dtypes, bytes)
  and config for config; the dist checkpoint saved at PP=2 exported at PP=1, and the one saved at
  PP=1 exported at PP=2, both equal it too. The printed report lists both stages' layers under
  global indices.
* 4 ranks: TP=2 x PP=2 equals the same export.
* tiny-moe (SequentialMLP experts, local_hessian, W4A4): PP=2 equals PP=1.
* bad ``--pp`` / world sizes / layer counts: one line, exit 2, before any model is loaded.
* Python API with tied embeddings (the last stage's output layer is Megatron's copy of the first
  stage's embedding): the NVFP4Hook calibrates through the schedule at PP=2 and exports the same
  checkpoint as at PP=1, the embedding written once; Megatron's TP/DP groups lie within a stage.

On a machine without CUDA the workers patch megatron-core's CUDA-only calls in the schedule
(:func:`harness.patch_megatron_pipeline_for_cpu` says which); the library runs unpatched.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from export_testutil import export_contents  # noqa: E402
from harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

COMMON = ["--model", "tiny-dense", "--format", "compressed-tensors", "--no-progress", "--backend", "megatron",
          "--method", "local_hessian", "--dss"]
CALIB = ["--calib-samples", "4", "--seq-len", "16", "--batch-size", "2", "--float64-calib"]


def _worker_setup() -> None:
    from checkpoint_testutil import allow_megatron_save_in_worker
    from harness import patch_megatron_pipeline_for_cpu

    patch_megatron_pipeline_for_cpu()
    allow_megatron_save_in_worker()


def _cli_worker(root: str, runs: list[tuple[str, list[str]]]) -> dict:
    """Run the CLI commands ``runs`` ((name, args)) in order on every rank; exit codes and the
    output of the first one (rank 0 prints)."""
    from nvfp4_dist.cli import main

    _worker_setup()
    codes, out = [], io.StringIO()
    for name, args in runs:
        with contextlib.redirect_stdout(out if not codes else io.StringIO()):
            codes.append(main([*args, "--out", f"{root}/{name}"]))
    return dict(codes=codes, stdout=out.getvalue())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    runs = [("pp2", ["quantize", *COMMON, *CALIB, "--pp", "2", "--save-dist-ckpt", f"{root}/ckpt_pp2"]),
            ("pp1", ["quantize", *COMMON, *CALIB, "--save-dist-ckpt", f"{root}/ckpt_pp1"]),
            ("pp2_ckpt_at_pp1", ["export", *COMMON, "--dist-ckpt", f"{root}/ckpt_pp2"]),
            ("pp1_ckpt_at_pp2", ["export", *COMMON, "--pp", "2", "--dist-ckpt", f"{root}/ckpt_pp1"])]
    return root, run_ranks(_cli_worker, 2, str(root), runs)


def test_pp2_export_equals_pp1_export(two_ranks):
    root, results = two_ranks
    assert [r["codes"] for r in results] == [[0, 0, 0, 0]] * 2
    ref = export_contents(root / "pp1")
    assert sum(k.endswith("weight_packed") for k in ref) == 2 * 7  # every HF linear of both layers
    assert sum(k.endswith("input_global_scale") for k in ref) == 2 * 7  # W4A4
    assert "model.embed_tokens.weight" in ref and "lm_head.weight" in ref and "model.norm.weight" in ref
    got = export_contents(root / "pp2")
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []


def test_dist_checkpoint_restores_across_pipeline_sizes(two_ranks):
    root, _ = two_ranks
    ref = export_contents(root / "pp1")
    for name in ("pp2_ckpt_at_pp1", "pp1_ckpt_at_pp2"):
        got = export_contents(root / name)
        assert sorted(got) == sorted(ref), name
        assert [k for k in ref if got[k] != ref[k]] == [], name


def test_report_lists_every_stage_under_global_indices(two_ranks):
    _, results = two_ranks
    table = results[0]["stdout"]
    for layer in (0, 1):
        for module in ("self_attention.linear_qkv", "mlp.linear_fc2"):
            assert table.count(f"decoder.layers.{layer}.{module} ") == 1, table
    assert "pp=2" in table


@pytest.mark.four
def test_tp2_x_pp2_export_equals_pp1_export(two_ranks, tmp_path):
    root, _ = two_ranks
    runs = [("tp2pp2", ["quantize", *COMMON, *CALIB, "--tp", "2", "--pp", "2"])]
    assert [r["codes"] for r in run_ranks(_cli_worker, 4, str(tmp_path), runs)] == [[0]] * 4
    ref, got = export_contents(root / "pp1"), export_contents(tmp_path / "tp2pp2")
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []


def _moe_worker(root: str) -> dict:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    # megatron-core 0.16.1's router reads moe_utils.te_general_gemm, defined only with
    # TransformerEngine (tests/moe/test_megatron_moe.py): the worker supplies the name.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    moe = ["quantize", "--model", "tiny-moe", *COMMON[2:-1], *CALIB]  # local_hessian, no DSS (time)
    return _cli_worker(root, [("moe_pp2", [*moe, "--pp", "2"]), ("moe_pp1", moe)])


def test_moe_pp2_export_equals_pp1_export(tmp_path):
    """tiny-moe (SequentialMLP experts, dead experts included) at PP=2: each stage's experts under
    their global layer and expert indices; the export equals PP=1's, tensor for tensor."""
    results = run_ranks(_moe_worker, 2, str(tmp_path))
    assert [r["codes"] for r in results] == [[0, 0]] * 2
    ref, got = export_contents(tmp_path / "moe_pp1"), export_contents(tmp_path / "moe_pp2")
    assert any(k.startswith("model.layers.1.mlp.experts.7.down_proj") for k in ref)
    assert "model.layers.1.mlp.gate.weight" in ref  # the router, unquantized, under HF's name
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []
    assert "dead" in results[0]["stdout"] and "decoder.layers.1.mlp.experts.local_experts.7" in results[0]["stdout"]


# ------------------------------------------------------------------- hook, tied embeddings

SEQ, MBS = 16, 2


def _forward_step(data_iterator, model):
    from nvfp4_dist.models.megatron_gpt import causal_mask

    tokens = next(data_iterator)
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    output = model(tokens, positions, attention_mask=causal_mask(tokens.shape[1], "cpu"))
    return output, lambda out: (out.float().mean(), {})


def _hook_worker(root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from small_model import small_hf_model, small_tokens

    from nvfp4_dist import QuantConfig
    from nvfp4_dist.integrations.megatron import NVFP4Hook
    from nvfp4_dist.launch import init_distributed, init_megatron
    from nvfp4_dist.layout.roles import GroupRole
    from nvfp4_dist.models.megatron_gpt import build_megatron_gpt

    _worker_setup()
    init_distributed(timeout_s=120)
    hf = small_hf_model()
    hf.config.tie_word_embeddings = True
    hf.lm_head.weight = hf.model.embed_tokens.weight
    # Every rank feeds all microbatches: at PP=1 (two data-parallel replicas) each statistic is
    # then exactly twice PP=2's, a power of two that changes no scale choice.
    batches = list(small_tokens().split(MBS))
    out = {}
    for pp in (2, 1):
        ctx = init_megatron(1, timeout_s=120, pp=pp)
        model = build_megatron_gpt(hf)
        hook = NVFP4Hook(QuantConfig(method="local_hessian", dss=True), calib_microbatches=len(batches),
                         export_dir=f"{root}/hook_pp{pp}", export_format="compressed-tensors",
                         hf_config=hf.config.to_dict(), show_progress=False)
        result = hook.calibrate(model, iter(batches), _forward_step, seq_length=SEQ, micro_batch_size=MBS)
        hook.export(model)
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, ps.get_pipeline_model_parallel_rank())
        groups = {role.value: sorted({stages[r] for r in dist.get_process_group_ranks(g)})
                  for role, g in ctx.groups.items() if role in (GroupRole.TP, GroupRole.EP, GroupRole.ETP)}
        groups["dp"] = sorted({stages[r] for r in dist.get_process_group_ranks(ctx.dp)})
        out[pp] = dict(slots=[s.name for s in result.slots], stage=ps.get_pipeline_model_parallel_rank(),
                       groups=groups, tied=[n for n, _ in model.named_parameters()
                                            if n.endswith(("word_embeddings.weight", "output_layer.weight"))])
    return out


def test_hook_under_pp2_with_tied_embeddings_exports_the_pp1_checkpoint(tmp_path):
    results = run_ranks(_hook_worker, 2, str(tmp_path))
    first, last = (r[2] for r in results)
    assert (first["stage"], last["stage"]) == (0, 1)
    # each stage calibrates its own layer, named by its global index
    assert {n.split(".")[2] for n in first["slots"]} == {"0"}
    assert {n.split(".")[2] for n in last["slots"]} == {"1"}
    # the first stage holds the embedding, the last Megatron's copy of it as the output layer
    assert first["tied"] == ["embedding.word_embeddings.weight"] and last["tied"] == ["output_layer.weight"]
    for run in (first, last):  # Megatron's groups lie within one stage: reduces stay there
        assert all(len(stages) == 1 for stages in run["groups"].values()), run["groups"]
    ref, got = export_contents(tmp_path / "hook_pp1"), export_contents(tmp_path / "hook_pp2")
    assert "model.embed_tokens.weight" in ref and "lm_head.weight" not in ref  # tied: written once
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []


# ------------------------------------------------------------------- refused before any work


@pytest.mark.parametrize("world,extra,message", [
    ("1", ["--pp", "0"], "--pp 0 must be >= 1"),
    ("1", ["--backend", "hf", "--pp", "2"], "--tp 1 / --ep 1 / --pp 2 need --backend megatron"),
    ("3", ["--tp", "2", "--pp", "1"], "--tp 2 x --pp 1 = 2 must divide the number of ranks (3)"),
    ("2", ["--pp", "2", "--ep", "2"], "--ep 2 x --tp 1 must divide the 1 rank(s) of a pipeline stage"),
    ("3", ["--pp", "3"], "--pp 3: the model's 2 decoder layers do not split evenly over 3 pipeline stages"),
])
@pytest.mark.parametrize("command", ["quantize", "export"])
def test_pipeline_options_refused_in_one_line(tmp_path, monkeypatch, capsys, world, extra, message, command):
    """Bad --pp / world-size combinations exit 2 with one line naming the option, before any
    model is loaded (WORLD_SIZE as a launcher would set it)."""
    from nvfp4_dist.cli import main

    monkeypatch.setenv("WORLD_SIZE", world)
    args = [command, "--model", "tiny-dense", "--backend", "megatron", "--out", str(tmp_path / "out"), *extra]
    if command == "export":
        args += ["--dist-ckpt", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
