"""The dense observers' statistics (layout.stats.InputStats; on a GPU through the one-launch
kernel, elsewhere the torch path): the torch path's fp32 block Hessians formed in interleaved
sub-sums count every token once, to fp32 rounding; InputStats sums every token over chunks and
calls; the input amax keeps its values, a NaN counting as +inf."""

import pytest
import torch

from nvfp4_dist.kernels.reference import SUBSUM_TOKENS, block_grams
from nvfp4_dist.layout.stats import InputStats

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cuBLAS's products too


def _exact_gram(x: torch.Tensor) -> torch.Tensor:
    v = x.double().reshape(x.shape[0], -1, 16)
    return torch.einsum("tbi,tbj->bij", v, v)


@pytest.mark.parametrize("n", [1, SUBSUM_TOKENS - 1, 3 * SUBSUM_TOKENS + 5, 16 * SUBSUM_TOKENS + 17])
def test_block_grams_count_every_token_once(n):
    """Small integers: every partial sum is exact in fp32, so any order gives the exact Gram
    blocks; a token dropped or counted twice (the tail, the interleaving) changes them."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-8, 9, (n, 48), generator=gen).float()
    assert torch.equal(block_grams(x.to(DEVICE)).double().cpu(), _exact_gram(x))


def test_block_grams_round_like_an_fp32_sum():
    """Wide dynamic range: within the fp32 error bound of a sum of (n / c + c) terms."""
    gen = torch.Generator().manual_seed(1)
    n = 4096 + 300
    x = torch.randn(n, 64, generator=gen) * torch.logspace(-3, 3, 64)
    got = block_grams(x.to(DEVICE)).double().cpu()
    bound = _exact_gram(x.abs())
    c = n // SUBSUM_TOKENS
    terms = n // c + c + 1
    assert ((got - _exact_gram(x)).abs() <= terms * 2.0 ** -24 * bound).all()


def test_input_stats_fp32_hessian_over_chunks_and_calls():
    """InputStats.update (bf16 inputs, two calls, one over several token chunks) sums the exact
    Gram blocks of all its tokens when they are exact in fp32."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-4, 5, (4096 + 700, 32), generator=gen).bfloat16()
    b = torch.randint(-4, 5, (2, 50, 32), generator=gen).bfloat16()
    stats = InputStats(cin=32, with_hessian=True)
    stats.update(a.to(DEVICE))
    stats.update(b.to(DEVICE))
    assert stats.tokens == 4896 and stats.hessian_sum.dtype == torch.float32
    assert torch.equal(stats.hessian_sum.double().cpu(), _exact_gram(torch.cat([a, b.reshape(-1, 32)])))


def test_block_grams_of_a_channel_slice_are_the_slice_of_the_block_grams():
    """A row-parallel shard's observer (half the channels, the same tokens) gets the bits of
    the whole input's blocks: what the tensor-parallel bit-identity of the statistics needs."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1100, 128, generator=gen) * torch.logspace(-2, 2, 128)).to(DEVICE)
    whole = block_grams(x)
    for part in range(2):
        assert torch.equal(block_grams(x[:, 64 * part:64 * (part + 1)].contiguous()), whole[4 * part:4 * (part + 1)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_input_stats_amax_without_an_abs_copy(dtype):
    """max |x| in fp32 whatever the input's dtype: a negative extreme, no token (0), a NaN (+inf,
    kept by every later call), an infinity."""
    stats = InputStats(cin=16, with_hessian=False)
    x = torch.linspace(-3.5, 2.0, 64).reshape(4, 16).to(dtype).to(DEVICE)
    stats.update(x)
    assert stats.amax.dtype == torch.float32 and stats.amax == 3.5
    stats.update(torch.zeros(0, 16, dtype=dtype, device=DEVICE))
    assert stats.amax.dtype == torch.float32 and stats.amax == 3.5
    stats.update(x / 2)
    assert stats.amax.dtype == torch.float32 and stats.amax == 3.5
    empty = InputStats(cin=16, with_hessian=False)
    empty.update(torch.zeros(0, 16, device=DEVICE))
    assert empty.amax == 0 and empty.tokens == 0
    infinite = InputStats(cin=16, with_hessian=False)
    infinite.update(torch.where(x < -3, float("-inf"), x))
    assert infinite.amax == float("inf")
    x[1, 3] = float("nan")
    stats.update(x)
    stats.update(x[:1])
    assert stats.amax.dtype == torch.float32 and stats.amax == float("inf")
