"""Kernel tests run the Triton kernels compiled on a CUDA device, or under the Triton
interpreter on the CPU. The interpreter is chosen when the kernel modules are first imported,
so the switch is set here, before any test module imports them (never in the library)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
