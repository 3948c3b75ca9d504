"""`nvfp4-dist export`: the HF export of a saved checkpoint in a new layout, without calibrating,
byte-identical to the export of the run that calibrated (real megatron-core, gloo, 2 ranks).

The quantize run calibrates local_hessian + DSS at TP=2 and saves a dist checkpoint; the export
run builds the model afresh at TP=1 (two data-parallel replicas), restores weights and quantizer
state from that checkpoint and exports: every tensor and config file equals the TP=2 run's
export, byte for byte (the split of the tensors into shard files follows the writing ranks). The same for
FSDP2 (two ranks, torch DCP) exported by one process. A checkpoint saved without DSS is refused,
naming the keys.
"""

from __future__ import annotations

import contextlib
import io

import pytest

pytest.importorskip("megatron.core")

from checkpoint_testutil import allow_megatron_save_in_worker  # noqa: E402
from export_testutil import export_contents  # noqa: E402
from harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

COMMON = ["--model", "tiny-dense", "--format", "compressed-tensors", "--no-progress"]
METHOD = ["--method", "local_hessian", "--dss"]
CALIB = ["--calib-samples", "4", "--seq-len", "16"]


def _megatron_worker(root: str) -> dict:
    from nvfp4_dist.cli import main

    allow_megatron_save_in_worker()
    quantized = main(["quantize", *COMMON, *METHOD, *CALIB, "--backend", "megatron", "--tp", "2",
                      "--out", f"{root}/calibrated", "--save-dist-ckpt", f"{root}/ckpt"])
    exported = main(["export", *COMMON, *METHOD, "--backend", "megatron", "--tp", "1",
                     "--dist-ckpt", f"{root}/ckpt", "--out", f"{root}/restored"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        refused = main(["export", *COMMON, "--method", "local_hessian", "--backend", "megatron",
                        "--dist-ckpt", f"{root}/ckpt", "--out", f"{root}/no-dss"])
    return dict(codes=(quantized, exported, refused), err=err.getvalue())


def test_megatron_export_from_a_tp2_checkpoint_at_tp1_equals_the_tp2_export(tmp_path):
    runs = run_ranks(_megatron_worker, 2, str(tmp_path))
    for run in runs:
        assert run["codes"] == (0, 0, 2)
    assert export_contents(tmp_path / "restored") == export_contents(tmp_path / "calibrated")
    assert not (tmp_path / "no-dss").exists()
    assert "dss_beta" in runs[0]["err"]  # the checkpoint holds DSS betas the model does not expect


def _fsdp2_worker(root: str) -> dict:
    from nvfp4_dist.cli import main

    code = main(["quantize", *COMMON, *METHOD, *CALIB, "--backend", "fsdp2", "--out", f"{root}/calibrated",
                 "--save-dcp", f"{root}/dcp"])
    return dict(code=code)


def test_fsdp2_dcp_checkpoint_exported_by_one_process_equals_the_two_rank_export(tmp_path):
    from nvfp4_dist.cli import main

    assert [r["code"] for r in run_ranks(_fsdp2_worker, 2, str(tmp_path))] == [0, 0]
    assert main(["export", *COMMON, *METHOD, "--dcp", str(tmp_path / "dcp"), "--out", str(tmp_path / "one")]) == 0
    assert export_contents(tmp_path / "one") == export_contents(tmp_path / "calibrated")
