"""The one-launch dense input statistics (block Hessians onto the running sums, and the amax)
against their torch reference: the exact Gram blocks where every partial sum is exact in fp32,
within fp32 rounding elsewhere, a channel slice's blocks the bits of the whole input's, and
the amax exactly (NaN as +inf)."""

import pytest
import torch

from nvfp4_dist.kernels import dense_stats_kernel, dispatch
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels.types import KernelImpl


def _exact_gram(x: torch.Tensor) -> torch.Tensor:
    v = x.double().reshape(x.shape[0], -1, 16)
    return torch.einsum("tbi,tbj->bij", v, v)


def _stats(x: torch.Tensor, hessian: bool = True, kernels=KernelImpl.TRITON, start=None):
    """(hessian_sum, amax) after one call from ``start`` (default zeros)."""
    h = None
    if hessian:
        h = torch.zeros(x.shape[-1] // 16, 16, 16, device=x.device) if start is None else start.clone()
    amax = torch.zeros((), device=x.device)
    dispatch.dense_input_stats(x, amax, h, kernels=kernels)
    return h, amax


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 37, dense_stats_kernel.INTERPRETER_CHUNK + 5, 2 * dense_stats_kernel.CUDA_CHUNK + 3])
def test_exact_gram_blocks_and_amax_when_every_sum_is_exact(dtype, n, device):
    """Small integers: every partial sum is exact in fp32, so any order gives the exact Gram
    blocks; a token dropped or counted twice (the masked tail, a step boundary) changes them.
    The sums go onto a running sum that already holds a previous batch's."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-8, 9, (n, 48), generator=gen).to(dtype)
    start = _exact_gram(x[: n // 2 + 1]).float()
    h, amax = _stats(x.to(device), start=start.to(device))
    assert torch.equal(h.double().cpu(), start.double() + _exact_gram(x))
    assert amax.item() == x.float().abs().max().item()
    torch_h, torch_amax = _stats(x.to(device), start=start.to(device), kernels=KernelImpl.TORCH)
    assert torch.equal(h, torch_h) and torch.equal(amax, torch_amax)


def test_gram_blocks_round_like_fp32_sums_of_steps(device):
    """Wide dynamic range (bf16 values): within the error bound of fp32 sums of one step's
    tokens (the tensor cores', at most 2^-22 relative per addition) added step after step,
    rounded to nearest: (chunk + steps) additions, not one per token."""
    gen = torch.Generator().manual_seed(1)
    n = 3000
    x = (torch.randn(n, 64, generator=gen) * torch.logspace(-3, 3, 64)).bfloat16()
    h, _ = _stats(x.to(device))
    chunk = dense_stats_kernel.CUDA_CHUNK if device.type == "cuda" else dense_stats_kernel.INTERPRETER_CHUNK
    additions = chunk + -(-n // chunk) + 1
    bound = _exact_gram(x.float().abs())
    assert ((h.double().cpu() - _exact_gram(x)).abs() <= additions * 2.0 ** -22 * bound).all()


def test_a_channel_slice_gets_the_bits_of_the_whole_inputs_blocks(device):
    """A row-parallel shard's observer (half the channels, the same tokens) gets the bits of
    the whole input's blocks: what the tensor-parallel bit-identity of the statistics needs."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1100, 128, generator=gen) * torch.logspace(-2, 2, 128)).bfloat16().to(device)
    whole, _ = _stats(x)
    for part in range(2):
        half, _ = _stats(x[:, 64 * part:64 * (part + 1)])  # a strided view: read as it is
        assert torch.equal(half, whole[4 * part:4 * (part + 1)])


@pytest.mark.parametrize("hessian", [True, False])
def test_amax_counts_nan_as_inf_and_keeps_the_running_max(hessian, device):
    x = torch.linspace(-3.5, 2.0, 64).reshape(4, 16).bfloat16().to(device)
    h = torch.zeros(1, 16, 16, device=device) if hessian else None
    amax = torch.full((), 5.0, device=device)
    dispatch.dense_input_stats(x, amax, h, kernels=KernelImpl.TRITON)
    assert amax.item() == 5.0  # the running max stays
    dispatch.dense_input_stats(x * 2, amax, h, kernels=KernelImpl.TRITON)
    assert amax.item() == 7.0
    dispatch.dense_input_stats(x[:0], amax, h, kernels=KernelImpl.TRITON)
    assert amax.item() == 7.0
    x[2, 5] = float("nan")
    for kernels in (KernelImpl.TRITON, KernelImpl.TORCH):
        a = torch.zeros((), device=device)
        dispatch.dense_input_stats(x, a, None, kernels=kernels)
        assert a.item() == float("inf"), kernels


def test_bad_statistics_tensors_are_refused(device):
    x = torch.zeros(4, 32, device=device)
    with pytest.raises(ValueError, match="0-d fp32"):
        dispatch.dense_input_stats(x, torch.zeros(1, device=device))
    with pytest.raises(ValueError, match=r"\[2, 16, 16\]"):
        dispatch.dense_input_stats(x, torch.zeros((), device=device), torch.zeros(2, 16, 16, dtype=torch.float64,
                                                                                   device=device))
