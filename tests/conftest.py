"""Suite-wide test setup.

The Triton interpreter must be chosen before the first ``@triton.jit`` function is created, i.e.
before any test module imports nvfp4_dist's kernel modules. Test directories are collected in
alphabetical order, so the switch lives here, at the top of the tree, rather than in
tests/kernels (the library itself never reads it: dispatch runs Triton only on CUDA tensors
unless a caller asks for ``kernels="triton"``)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--dist-backend", choices=("gloo", "nccl"), default="gloo",
                     help="transport of the distributed tests' ranks: gloo on the CPU (default, any "
                          "machine) or nccl with one GPU per rank (tests needing more GPUs skip)")


def pytest_configure(config):
    import importlib.util
    import sys
    from pathlib import Path

    # registered as "harness": the module the distributed tests import under that name
    harness = sys.modules.get("harness")
    if harness is None:
        spec = importlib.util.spec_from_file_location(
            "harness", Path(__file__).resolve().parent / "distributed" / "harness.py")
        harness = sys.modules["harness"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(harness)
    harness.choose_backend(config.getoption("dist_backend"))


@pytest.fixture(autouse=True)
def _distributed_children_on_cpu(request, monkeypatch):
    """With --dist-backend gloo, processes a distributed test starts itself (torchrun) see no GPU
    either, as the harness's workers (tests/distributed/harness.py)."""
    if request.node.get_closest_marker("distributed") and request.config.getoption("dist_backend") == "gloo":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
