"""Kernel tests run the Triton kernels compiled on a CUDA device, or under the Triton
interpreter on the CPU (chosen suite-wide in tests/conftest.py, before any kernel module is
imported)."""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
