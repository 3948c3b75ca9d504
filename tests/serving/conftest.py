"""Every export the CLI can make, built once per session: tiny-dense / tiny-moe, W4A4 / W4A16,
ModelOpt / compressed-tensors in one process, plus one 2-rank torchrun FSDP2 run per format.

``--method max`` keeps each build to seconds on CPU (the scale search is not what these tests are
about); ``--calib-samples 4 --seq-len 16``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

MODELS = ("tiny-dense", "tiny-moe")
FORMATS = ("modelopt", "compressed-tensors")
MODES = ("w4a4", "w4a16")
ARGS = ["quantize", "--method", "max", "--calib-samples", "4", "--seq-len", "16", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(out: Path, model: str, fmt: str, mode: str, ranks: int = 1) -> Path:
    args = [*ARGS, "--model", model, "--format", fmt, "--out", str(out)]
    if mode == "w4a16":
        args.append("--weight-only")
    if ranks == 1:
        cmd = [sys.executable, "-m", "nvfp4_dist", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "nvfp4_dist", *args, "--backend", "fsdp2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """(model, fmt, mode, ranks) -> export directory, built lazily and once per session."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("serving")

    def get(model: str, fmt: str, mode: str, ranks: int = 1) -> Path:
        key = (model, fmt, mode, ranks)
        if key not in cache:
            cache[key] = build(root / "-".join(map(str, key)), *key)
        return cache[key]

    return get
