"""The one-launch grouping of MoE routing choices by expert equals its torch reference (a stable
sort) exactly, sentinels and tile boundaries included."""

import pytest
import torch

from nvfp4_dist.kernels import dispatch
from nvfp4_dist.kernels import grouping_kernel
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels.types import KernelImpl


def _routing(tokens: int, k: int, n_experts: int, dtype=torch.int64, seed: int = 0) -> torch.Tensor:
    """``[tokens, k]`` expert indices, some out of range (sentinels -1 and E), expert 1 never chosen."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, n_experts + 1, (tokens, k), generator=gen)
    idx[idx == 1] = 0
    return idx.to(dtype)


@pytest.mark.parametrize("tokens,k,n_experts,dtype,divisor", [
    (9, 2, 4, torch.int64, 1),
    (9, 2, 4, torch.int32, 2),
    # more choices than one tile: the ranks continue across tiles
    (grouping_kernel.CUDA_TILE // 3 + 5, 3, 5, torch.int64, 3),
    (0, 4, 3, torch.int64, 4),
], ids=["int64", "int32-tokens", "tiles", "empty"])
def test_grouping_kernel_equals_the_stable_sort(tokens, k, n_experts, dtype, divisor, device):
    idx = _routing(tokens, k, n_experts, dtype).to(device)
    got = dispatch.grouped_choices(idx, n_experts, divisor, kernels=KernelImpl.TRITON)
    want = R.grouped_choices(idx.cpu(), n_experts, divisor)
    for name, a, b in zip(("positions", "offsets", "row_expert"), got, want):
        assert a.dtype == torch.int64, name
        assert torch.equal(a.cpu(), b), name


def test_grouped_choices_reference_orders_each_expert_by_position():
    idx = torch.tensor([[1, 3], [0, 1], [3, 5], [-1, 1]])  # 5 and -1: sentinels of 4 experts
    positions, offsets, row_expert = R.grouped_choices(idx, 4)
    assert offsets.tolist() == [0, 1, 4, 4, 6]
    assert positions.tolist() == [2, 0, 3, 7, 1, 4, 5, 6]
    assert row_expert.tolist() == [0, 1, 1, 1, 3, 3, 4, 4]
    assert R.grouped_choices(idx, 4, divisor=2)[0].tolist() == [1, 0, 1, 3, 0, 2, 2, 3]


def test_grouping_kernel_gives_the_same_integers_at_any_tile(device):
    idx = _routing(700, 4, 6, seed=3).to(device)
    want = R.grouped_choices(idx.cpu(), 6, 4)
    for tile, warps in ((512, 1), (1024, 4), (4096, 8)):
        got = grouping_kernel.launch_grouped_choices(idx, 6, 4, tile=tile, num_warps=warps)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), (tile, warps)
