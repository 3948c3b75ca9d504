"""Stacked experts: the one-launch searches equal the per-expert calls bit for bit, and the
one-launch per-expert block Hessians equal their torch reference bit for bit (and the former
per-expert float64 statistics to float64 rounding)."""

import pytest
import torch

from inputs import hessian, weight
from nvfp4_dist.kernels import dispatch
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels.types import KernelImpl, Method
from nvfp4_dist.layout.stats import InputStats


def _experts(dtype, rows=20, cin=32, n=2):
    """``[n, rows, cin]`` experts of different scales, global amaxes ``[n]`` and Hessians ``[n,
    cin // 16, 16, 16]``, the second singular (small: the interpreter pays per program)."""
    w = torch.stack([weight(rows, cin, "heavy", seed=40 + e).float() * (1 + 3 * e) for e in range(n)]).to(dtype)
    g = w.float().abs().amax(dim=(1, 2)) * torch.tensor([0.7, 1.0, 0.9])[:n]
    h = torch.stack([hessian(cin, seed=9 + e, noise=0.0 if e == 1 else 0.3) for e in range(n)])
    return w, g, h


def _same(a, b):
    for field in ("block_amax", "candidate", "dss_beta", "loss"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert torch.equal(x.cpu(), y.cpu()), field


@pytest.mark.parametrize("dtype,method,dss", [(torch.float32, Method.MSE, False),
                                              (torch.float32, Method.LOCAL_HESSIAN, False),
                                              (torch.float32, Method.LOCAL_HESSIAN, True),
                                              (torch.bfloat16, Method.LOCAL_HESSIAN, True)],
                         ids=["mse-fp32", "hessian-fp32", "dss-fp32", "dss-bf16"])  # dss-bf16: bf16 sweep too
def test_stacked_search_equals_each_expert_on_its_own(dtype, method, dss, device):
    w, g, h = _experts(dtype)
    w, g, h = w.to(device), g.to(device), h.to(device)
    betas = R.beta_grid(0.6, 1.4, 0.2) if dss else None
    hess = h if method is Method.LOCAL_HESSIAN else None
    got = dispatch.search_block_scales_stacked(w, g, method, hessian=hess, dss_betas=betas, kernels=KernelImpl.TRITON)
    assert got.block_amax.shape == (2, 20, 2)
    for e in range(2):
        one = dispatch.search_block_scales(w[e], g[e], method, hessian=None if hess is None else h[e],
                                           dss_betas=betas, kernels=KernelImpl.TRITON)
        _same(type(one)(*(None if t is None else t[e] for t in (got.block_amax, got.candidate, got.dss_beta,
                                                                 got.loss))), one)
    if method is Method.MSE:  # the MSE sweep is bit-exact with the reference too
        _same(got, dispatch.search_block_scales_stacked(w.cpu(), g.cpu(), method, kernels=KernelImpl.TORCH))


def test_stacked_search_of_a_view_and_of_no_expert(device):
    """A strided expert view (rows of a bigger parameter) and an empty stack."""
    w, g, _ = _experts(torch.bfloat16)
    big = torch.zeros(2, 30, 32, dtype=w.dtype)
    big[:, 5:25] = w
    view = big[:, 5:25].to(device)
    got = dispatch.search_block_scales_stacked(view, g.to(device), Method.MSE, kernels=KernelImpl.TRITON)
    _same(got, dispatch.search_block_scales_stacked(w, g, Method.MSE, kernels=KernelImpl.TORCH))
    empty = dispatch.search_block_scales_stacked(w[:0].to(device), g[:0].to(device), Method.MSE,
                                                 kernels=KernelImpl.TRITON)
    assert empty.block_amax.shape == (0, 20, 2)


def _grouped(counts, cin, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])
    # activations with a wide dynamic range: a sum of exact products still rounds in float64
    x = torch.randn(int(offsets[-1]), cin, generator=gen) * torch.logspace(-3, 3, cin)
    return x.to(dtype), offsets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "fp32", "fp64"])
def test_expert_block_hessians_kernel_equals_the_reference_bit_for_bit(dtype, device):
    counts = [13, 0, 30, 1]
    x, offsets = _grouped(counts, 48, dtype, seed=3)
    got = torch.full((4, 3, 16, 16), 0.5, dtype=torch.float64, device=device)  # a running sum
    ref = torch.full((4, 3, 16, 16), 0.5, dtype=torch.float64)
    dispatch.expert_block_hessians(x.to(device), offsets.to(device), got, kernels=KernelImpl.TRITON)
    dispatch.expert_block_hessians(x, offsets, ref, kernels=KernelImpl.TORCH)
    assert torch.equal(got.cpu(), ref)
    assert torch.equal(ref[1], torch.full((3, 16, 16), 0.5, dtype=torch.float64))  # no token: unchanged


def test_expert_block_hessians_continue_across_calls_and_match_the_former_statistics():
    """Two calls (two batches) give the bits of one call over both; and the sums agree with
    InputStats' per-expert float64 statistics to float64 rounding."""
    x1, off1 = _grouped([7, 5], 32, torch.bfloat16, seed=4)
    x2, off2 = _grouped([3, 9], 32, torch.bfloat16, seed=5)
    twice = torch.zeros(2, 2, 16, 16, dtype=torch.float64)
    R.expert_block_hessians(x1, off1, twice)
    R.expert_block_hessians(x2, off2, twice)
    both = torch.cat([x1[:7], x2[:3], x1[7:], x2[3:]])
    once = torch.zeros_like(twice)
    R.expert_block_hessians(both, torch.tensor([0, 10, 24]), once)
    assert torch.equal(twice, once)
    for e, rows in enumerate((both[:10], both[10:])):
        stats = InputStats(cin=32, with_hessian=True, accum_dtype=torch.float64)
        stats.update(rows)
        scale = stats.hessian_sum.abs().max()
        assert (stats.hessian_sum - once[e]).abs().max() <= 1e-14 * scale
