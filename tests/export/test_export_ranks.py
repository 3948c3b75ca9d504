"""export_checkpoint under torchrun (2 real gloo ranks) is the one-process export, rank by rank.

* FSDP2 shards and plain data-parallel replicas export, byte for byte, the checkpoint one process
  writes of the same model (tensors, config.json, hf_quant_config.json), each rank writing its
  share of the files, with the same summary on every rank;
* a half-quantized fused group (k_proj excluded, q/v NVFP4) is refused on every rank with the
  message of the one-process export, and nothing is published;
* a rank that fails mid-write leaves nothing: no checkpoint, no staging directory.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from export_testutil import differing_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # harness, small_model

from harness import run_ranks  # noqa: E402
from small_model import small_hf_model  # noqa: E402

from nvfp4_dist import QuantConfig, quantize  # noqa: E402
from nvfp4_dist.export import export_checkpoint  # noqa: E402

pytestmark = pytest.mark.distributed

HALF_QKV = r"qkv: model\.layers\.0\.self_attn\.q_proj, model\.layers\.0\.self_attn\.v_proj are NVFP4 but " \
           r"model\.layers\.0\.self_attn\.k_proj stay in high precision"


def _config(**kwargs) -> QuantConfig:
    return QuantConfig(method="max", quantize_inputs=False, **kwargs)


def _summary(summary) -> dict:
    return dict(path=str(summary.path), files=list(summary.files), quantized=list(summary.quantized),
                ignore=list(summary.ignore), w4a4=summary.w4a4)


def _export_worker(root: str) -> dict:
    import torch.distributed as dist

    from nvfp4_dist.errors import ExportError
    from nvfp4_dist.launch import init_distributed, shard_fsdp2
    from nvfp4_dist.parallel.fsdp import fsdp_context

    init_distributed(timeout_s=120)
    out = {"rank": dist.get_rank()}
    model = shard_fsdp2(small_hf_model())
    half = _config(exclude=(*QuantConfig().exclude, "*k_proj"))
    result = quantize(model, half, ctx=fsdp_context(model, data_split=False), show_progress=False)
    try:
        export_checkpoint(model, result, f"{root}/refused")
        out["refused"] = None
    except ExportError as exc:
        out["refused"] = str(exc)
    dist.barrier()
    out["after_refusal"] = sorted(p.name for p in Path(root).iterdir())

    model = shard_fsdp2(small_hf_model())
    result = quantize(model, _config(), ctx=fsdp_context(model, data_split=False), show_progress=False)
    out["fsdp2"] = _summary(export_checkpoint(model, result, f"{root}/fsdp2", max_shard_size="100KB"))

    model = small_hf_model()  # every rank the whole model: writers rotate over the replicas
    result = quantize(model, _config(), show_progress=False)
    out["replicas"] = _summary(export_checkpoint(model, result, f"{root}/replicas", fmt="compressed-tensors"))
    return out


def _fail_on_rank_one(root: str) -> str:
    import torch.distributed as dist

    import nvfp4_dist.export.pieces as pieces
    from nvfp4_dist.launch import init_distributed

    init_distributed(timeout_s=5)
    model = small_hf_model()
    result = quantize(model, _config(), show_progress=False)
    if dist.get_rank() == 1:
        def broken(*args, **kwargs):
            raise RuntimeError("disk on fire")

        pieces.build_tensors = broken
    try:
        export_checkpoint(model, result, f"{root}/out")
    except Exception as exc:  # rank 1: its own error; rank 0: the collective that never completes
        return type(exc).__name__
    return "published"


def _assert_same_export(got: Path, ref: Path) -> None:
    assert differing_tensors(got, ref) == []
    for name in ("config.json", "hf_quant_config.json"):
        assert (got / name).exists() == (ref / name).exists()
        if (ref / name).exists():
            assert json.loads((got / name).read_text()) == json.loads((ref / name).read_text()), name


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    return run_ranks(_export_worker, 2, str(root)), root


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process exports of the same model and calibration, name -> summary."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, fmt in (("fsdp2", "modelopt"), ("replicas", "compressed-tensors")):
        model = small_hf_model()
        result = quantize(model, _config(), show_progress=False)
        out[name] = export_checkpoint(model, result, root / name, fmt=fmt)
    return out


def test_half_quantized_fused_group_is_refused_on_every_rank(ranks):
    results, root = ranks
    for r in results:
        assert r["refused"] is not None, f"rank {r['rank']} exported a half-quantized q/k/v group"
        assert "fused layers are not quantized alike" in r["refused"]
        assert re.search(HALF_QKV, r["refused"]), r["refused"]
        assert r["after_refusal"] == [], "something was left behind by the refused export"
    assert not (root / "refused").exists()


@pytest.mark.parametrize("layout", ["fsdp2", "replicas"])
def test_two_rank_export_equals_one_process(ranks, single, layout):
    results, root = ranks
    ref = single[layout]
    _assert_same_export(root / layout, ref.path)
    summaries = [r[layout] for r in results]
    assert summaries[0] == summaries[1], "ranks disagree on what was published"
    got = summaries[0]
    assert got["quantized"] == list(ref.quantized) and got["ignore"] == list(ref.ignore)
    assert got["files"] == sorted(p.name for p in (root / layout).iterdir())
    shards = [f for f in got["files"] if f.endswith(".safetensors")]
    assert len(shards) >= 2, "one rank wrote every file"


def test_failure_on_one_rank_publishes_nothing(tmp_path):
    outcomes = run_ranks(_fail_on_rank_one, 2, str(tmp_path), timeout_s=120)
    assert outcomes[1] == "RuntimeError" and outcomes[0] != "published", outcomes
    assert list(tmp_path.iterdir()) == [], "a checkpoint or its staging directory was left behind"
