"""Triton MSE sweep == reference on every block: same candidate, same loss bits."""

import pytest
import torch

from inputs import DTYPES, global_amax, weight
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels import triton_ops
from nvfp4_dist.kernels.mse_kernel import launch_mse_sweep
from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.numerics.constants import e4m3_positive_values


def _assert_same(got, ref):
    assert torch.equal(got.candidate.cpu(), ref.candidate)
    assert torch.equal(got.loss.cpu(), ref.loss)
    assert torch.equal(got.block_amax.cpu(), ref.block_amax)


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mse_sweep_is_bit_exact(kind, dtype, device):
    w = weight(21, 128, kind, seed=21, dtype=dtype)
    g = global_amax(w)
    _assert_same(triton_ops.search_mse(w.to(device), g.to(device)), R.search_mse(w, g))


def test_mse_sweep_tiles_and_strided_views(device):
    """Several programs with a partial last tile, a column slice (row stride != cin) and a
    transposed view (copied) give the reference's bits."""
    w = weight(50, 96, "heavy", seed=22)
    g = global_amax(w)
    ref = R.search_mse(w, g)
    wd = w.to(device)
    s = nvfp4.global_scale(g).reshape(1).to(device)
    k, loss = launch_mse_sweep(wd, s, e4m3_positive_values().to(device), blk=64)  # 300 blocks
    assert torch.equal(k.long().cpu(), ref.candidate)
    assert torch.equal(loss.cpu(), ref.loss)
    sliced = triton_ops.search_mse(wd[:, 32:80], g.to(device))
    _assert_same(sliced, R.search_mse(w[:, 32:80].contiguous(), g))
    wt = w[:, :64].t().contiguous().t()  # [50, 64] with unit row stride: not unit cin stride
    _assert_same(triton_ops.search_mse(wt.to(device), g.to(device)), R.search_mse(w[:, :64], g))


def test_all_zero_weight(device):
    w = torch.zeros(4, 32)
    got = triton_ops.search_mse(w.to(device), torch.zeros(()).to(device))
    assert torch.all(got.candidate == 0) and torch.all(got.loss == 0)
    _assert_same(got, R.search_mse(w, torch.zeros(())))
