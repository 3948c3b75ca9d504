"""Stacked experts: the one-launch searches equal the per-expert calls bit for bit, and the
one-launch per-expert block Hessians (with each expert's input amax) equal their torch reference
bit for bit (and the former per-expert float64 statistics to float64 rounding)."""

import pytest
import torch

from inputs import hessian, weight
from nvfp4_dist.kernels import dispatch
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels.types import KernelImpl, Method
from nvfp4_dist.layout.stats import ExpertStats, InputStats


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


def test_expert_block_hessians_amax_equals_the_reference_and_counts_nan_as_inf(device):
    """The fused per-expert max |x|: kernel == reference bit for bit, == each expert's own amax
    of its fp32-rounded rows (NaN: +inf), merged into the running values; rows past the last
    expert's range are not read."""
    x, offsets = _grouped([13, 0, 30, 1, 9], 48, torch.bfloat16, seed=6)
    x[20, 7] = float("nan")  # expert 2
    x[5, 3] = float("-inf")  # expert 0: an infinity stays one (not the largest finite value)
    x[43, 40] = -1e30  # expert 3: a negative maximum
    x[-9:] = 1e37  # past offsets[E] (the fifth group): no expert's rows
    offsets = offsets[:5]
    start = torch.tensor([0.5, 7.0, 0.0, 1e6, 0.0])  # running values
    got, ref = start.to(device), start.clone()
    h_got = torch.zeros(4, 3, 16, 16, dtype=torch.float64, device=device)
    h_ref = torch.zeros(4, 3, 16, 16, dtype=torch.float64)
    dispatch.expert_block_hessians(x.to(device), offsets.to(device), h_got, amax=got[:4],
                                   kernels=KernelImpl.TRITON)
    dispatch.expert_block_hessians(x, offsets, h_ref, amax=ref[:4], kernels=KernelImpl.TORCH)
    assert torch.equal(got.cpu(), ref)
    assert torch.allclose(h_got.cpu(), h_ref, rtol=0, atol=0, equal_nan=True)  # (expert 2's sums: NaN)
    own = [x[a:b].float().abs().nan_to_num(nan=float("inf"), posinf=float("inf")).amax() if b > a else torch.tensor(0.0)
           for a, b in zip(offsets[:-1], offsets[1:])]
    assert torch.equal(ref, torch.stack([torch.maximum(s, o) for s, o in zip(start[:4], own)] + [start[4]]))
    assert ref[0] == ref[2] == float("inf") and ref[1] == 7.0 and ref[3] == x[43, 40].float().abs()


@pytest.mark.parametrize("tile", [(2, 2), (1, 1), (16, 4)], ids=["2-blocks", "1-block", "16-blocks"])
def test_block_hessian_kernel_tiles_give_the_same_bits(tile, device):
    """The launch's tile choices (block columns, warps) only change the speed: small tiles, a
    partial last step of 8 tokens and sums continued over two calls give the reference's bits
    (fp32 rows: products of 48 significant bits, so the order of the additions shows)."""
    from nvfp4_dist.kernels import block_hessian_kernel as K
    x, offsets = _grouped([5, 0, 11, 37], 48, torch.float32, seed=9)
    x[7, 20] = float("nan")
    got = torch.full((4, 3, 16, 16), 0.5, dtype=torch.float64, device=device)
    ref = torch.full((4, 3, 16, 16), 0.5, dtype=torch.float64)
    amax_got, amax_ref = torch.zeros(4, device=device), torch.zeros(4)
    bb, warps = tile
    for part in (slice(0, 10), slice(10, None)):  # two calls: the sums continue across them
        rows, off = x[part], (offsets - offsets[0]).clamp(min=part.start, max=part.stop or len(x)) - part.start
        K.launch_block_hessians(rows.to(device), off.to(device), got, amax_got, bb=bb, num_warps=warps)
        R.expert_block_hessians(rows, off, ref, amax_ref)
    assert torch.allclose(got.cpu(), ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(amax_got.cpu(), amax_ref) and amax_ref[2] == float("inf")
    # the reference's order is the row order: the same rows reversed give other bits here
    backwards = torch.full_like(ref, 0.5)
    R.expert_block_hessians(x.flip(0), offsets[-1] - offsets.flip(0), backwards)
    assert not torch.allclose(backwards.flip(0), ref, rtol=0, atol=0, equal_nan=True)


def test_block_hessians_read_through_a_row_index_as_from_the_gathered_rows(device):
    """``rows``: position p reads token row ``x[rows[p]]`` (repeated and unsorted rows, a row
    no position names): the same bits and amax as the gathered copy ``x[rows]``, in the
    kernel and the reference, and through ExpertStats.update with and without Hessian."""
    tokens, _ = _grouped([40], 32, torch.bfloat16, seed=12)
    tokens[39] = float("nan")  # named by no position: never read
    gen = torch.Generator().manual_seed(5)
    rows = torch.randint(0, 39, (29,), generator=gen)
    offsets = torch.tensor([0, 12, 12, 29])
    got = torch.zeros(3, 2, 16, 16, dtype=torch.float64, device=device)
    ref = torch.zeros(3, 2, 16, 16, dtype=torch.float64)
    amax_got, amax_ref = torch.zeros(3, device=device), torch.zeros(3)
    dispatch.expert_block_hessians(tokens.to(device), offsets.to(device), got, amax=amax_got,
                                   kernels=KernelImpl.TRITON, rows=rows.to(device))
    dispatch.expert_block_hessians(tokens[rows], offsets, ref, amax=amax_ref, kernels=KernelImpl.TORCH)
    assert torch.equal(got.cpu(), ref) and torch.equal(amax_got.cpu(), amax_ref)
    indexed = torch.zeros_like(ref)
    R.expert_block_hessians(tokens, offsets, indexed, rows=rows)
    assert torch.equal(indexed, ref) and torch.isfinite(ref).all()
    row_expert = torch.repeat_interleave(torch.arange(3), offsets[1:] - offsets[:-1])
    for with_hessian in (True, False):
        stats = [ExpertStats([InputStats(cin=32, with_hessian=with_hessian, accum_dtype=torch.float64)
                              for _ in range(3)]) for _ in range(2)]
        stats[0].update(tokens.to(device), offsets.to(device), row_expert.to(device), rows=rows.to(device))
        stats[1].update(tokens[rows].to(device), offsets.to(device), row_expert.to(device))
        assert torch.equal(stats[0].amax, stats[1].amax) and torch.equal(stats[0].offset_sum, stats[1].offset_sum)
        assert (stats[0].hessian_sum is None) == (not with_hessian)
        if with_hessian:
            assert torch.equal(stats[0].hessian_sum, stats[1].hessian_sum)


def test_expert_stats_amax_and_tokens_are_those_of_the_separate_computation(device):
    """ExpertStats: the amax fused into the Hessian kernel gives the values the projections
    without Hessian compute by abs/amax/scatter (two calls, NaN as +inf, an infinity kept, an E
    sentinel row)."""
    x1, off1 = _grouped([5, 0, 9], 32, torch.bfloat16, seed=7)
    x2, off2 = _grouped([2, 4, 3], 32, torch.bfloat16, seed=8)
    x2[7, 3] = float("nan")  # expert 2
    x1[2, 5] = float("-inf")  # expert 0
    calls = []
    for x, off in ((x1, off1), (x2, off2)):
        row_expert = torch.repeat_interleave(torch.arange(3), off[1:] - off[:-1])
        # a routed-away row (expert-parallel sentinel) after the groups: ignored by both paths
        calls.append((torch.cat([x, torch.full((1, 32), 3e4, dtype=x.dtype)]).to(device), off.to(device),
                      torch.cat([row_expert, torch.tensor([3])]).to(device)))
    results = []
    for with_hessian in (True, False):
        members = [InputStats(cin=32, with_hessian=with_hessian, accum_dtype=torch.float64) for _ in range(3)]
        stats = ExpertStats(members, kernels=KernelImpl.TRITON)
        for call in calls:
            stats.update(*call)
        stats.flush()
        results.append([(m.tokens, m.amax.cpu()) for m in members])
        assert (stats.hessian_sum is not None) == with_hessian
    assert all(t0 == t1 and torch.equal(a0, a1) for (t0, a0), (t1, a1) in zip(*results))
    tokens, amax = zip(*results[0])
    assert tokens == (7, 4, 12)
    expect = [torch.cat([x1[:5], x2[:2]]), torch.cat([x1[5:5], x2[2:6]]), torch.cat([x1[5:], x2[6:]])]
    assert torch.equal(torch.stack(amax[:2]), torch.stack([e.float().abs().amax() for e in expect[:2]]))
    assert amax[0] == amax[2] == float("inf")


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
