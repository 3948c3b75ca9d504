"""The CLI under torchrun: every backend exports the same HF checkpoint as one process.

``--method max --weight-only`` makes the exported bytes independent of activations (Megatron's
forward rounds differently from the HF model's), so the FSDP2 (real ``torchrun``) and Megatron
TP=2 exports must equal the single-process export tensor for tensor, byte for byte: codes,
FP8 scales, global scales and every pass-through tensor under its HF name.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import backend_for, run_ranks

pytestmark = pytest.mark.distributed

ARGS = ["quantize", "--model", "tiny-dense", "--method", "max", "--weight-only", "--calib-samples", "4",
        "--seq-len", "16", "--no-progress"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1:  # float8 has no equality kernel everywhere: compare the bytes
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "single"
    subprocess.run([sys.executable, "-m", "nvfp4_dist", *ARGS, "--format", "modelopt", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    return out


def _assert_same_checkpoint(got: Path, ref: Path) -> None:
    from nvfp4_dist.export.inspect import inspect_checkpoint

    a, b = _tensors(got), _tensors(ref)
    assert set(a) == set(b)
    assert [k for k in a if not _same_bytes(a[k], b[k])] == []
    report = inspect_checkpoint(got)
    assert report.ok, report.format()


def test_torchrun_fsdp2_export_equals_single_process(single, tmp_path):
    backend_for(2)
    out = tmp_path / "fsdp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "nvfp4_dist", *ARGS, "--backend", "fsdp2", "--format", "modelopt", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fsdp2 backend on 2 rank(s)" in proc.stdout
    assert len(list(out.glob("*.safetensors"))) == 2  # each rank wrote its share
    _assert_same_checkpoint(out, single)


def _hsdp_cli(out: str) -> tuple[int, bool]:
    import torch.distributed as dist

    from nvfp4_dist.cli import main

    code = main([*ARGS, "--backend", "fsdp2", "--replicas", "2", "--split-calib", "--format", "modelopt",
                 "--out", out], leave_group=True)
    return code, dist.is_initialized()


def test_fsdp2_hsdp_replicas_export_equals_single_process(single, tmp_path):
    """--replicas 2 on 4 ranks: a (2 replicas x 2 shards) mesh, each rank its quarter of the data
    (max: bit-identical whatever the split), one copy of every tensor written."""
    out = tmp_path / "hsdp"
    # (exit code, process group still joined): the CLI's process entry leaves the group once all are done
    assert run_ranks(_hsdp_cli, 4, str(out)) == [(0, False)] * 4
    _assert_same_checkpoint(out, single)


@pytest.mark.parametrize("option,message", [(["--replicas", "2"], "--replicas 2 (HSDP) needs --backend fsdp2"),
                                            (["--tp", "2"], "--tp 2 / --ep 1 need --backend megatron")])
def test_layout_options_of_another_backend_are_refused(option, message, tmp_path, capsys):
    from nvfp4_dist.cli import main

    assert main([*ARGS, *option, "--format", "modelopt", "--out", str(tmp_path / "x")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _megatron_cli(out: str) -> tuple[int, bool, bool]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nvfp4_dist.cli import main

    code = main([*ARGS, "--backend", "megatron", "--tp", "2", "--format", "modelopt", "--out", out],
                leave_group=True)
    return code, dist.is_initialized(), ps.model_parallel_is_initialized()


def test_megatron_tp2_export_equals_single_process(single, tmp_path):
    pytest.importorskip("megatron.core")
    out = tmp_path / "megatron"
    codes = run_ranks(_megatron_cli, 2, str(out))
    assert codes == [(0, False, False)] * 2  # exit code; process group, Megatron's state left
    _assert_same_checkpoint(out, single)


def _exists_then_fails(out: str) -> int:
    from nvfp4_dist.cli import main

    return main([*ARGS, "--backend", "fsdp2", "--format", "modelopt", "--out", out])


def test_existing_output_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    assert run_ranks(_exists_then_fails, 2, str(out)) == [2, 2]
    assert list(out.iterdir()) == []
