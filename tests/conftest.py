"""Suite-wide test setup.

The Triton interpreter must be chosen before the first ``@triton.jit`` function is created, i.e.
before any test module imports nvfp4_dist's kernel modules. Test directories are collected in
alphabetical order, so the switch lives here, at the top of the tree, rather than in
tests/kernels (the library itself never reads it: dispatch runs Triton only on CUDA tensors
unless a caller asks for ``kernels="triton"``)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
