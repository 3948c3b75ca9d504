"""GPTQ for NVFP4 on small random problems: exactness of W', error against the scale-only
search, damping, dead input channels, row independence, column shards (the row-parallel sweep)
equal to the whole, full-Hessian statistics and their local blocks, and the loop of fused block
steps equal to the plain per-block loop it replaced."""

from __future__ import annotations

import pytest
import torch

from nvfp4_dist.errors import CalibrationError
from nvfp4_dist.kernels.dispatch import search_block_scales
from nvfp4_dist.kernels.gptq import block_hessians, gptq_factor, gptq_quantize, inverse_factor
from nvfp4_dist.kernels.gptq_ops import propagate, sweep_block
from nvfp4_dist.kernels.types import KernelImpl, Method
from nvfp4_dist.layout.stats import InputStats, StatsStore
from nvfp4_dist.numerics import nvfp4


def _problem(rows=32, cin=64, n=256, seed=0, dead=()):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=gen, dtype=torch.float64) * 0.3 + torch.eye(cin, dtype=torch.float64)
    x = torch.randn(n, cin, generator=gen, dtype=torch.float64) @ mix
    x = x * torch.exp(torch.randn(cin, generator=gen, dtype=torch.float64))
    x[:, list(dead)] = 0.0
    w = torch.randn(rows, cin, generator=gen) * 0.02
    return w, x.T @ x / n, x


def _out_err(w, q, h):
    d = w.double() - q.double()
    return float(torch.einsum("ri,ij,rj->", d, h, d))


@pytest.mark.parametrize("timing", ["before", "group"])
@pytest.mark.parametrize("scales", [Method.MSE, Method.LOCAL_HESSIAN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_of_written_weight_is_gptq_q(timing, scales, dtype):
    w, h, _ = _problem(rows=16, cin=48)
    w = w.to(dtype)
    g = w.float().abs().amax()
    r = gptq_quantize(w, h, g, scales, timing, 0.01)
    assert r.weight.dtype == dtype and r.block_amax.shape == (16, 3)
    assert torch.equal(nvfp4.fake_quant(r.weight, r.block_amax, g, out_dtype=torch.float32), r.quant)


@pytest.mark.parametrize("timing", ["before", "group"])
@pytest.mark.parametrize("scales", [Method.MSE, Method.LOCAL_HESSIAN])
def test_layer_output_error_below_scale_search_only(timing, scales):
    w, h, _ = _problem()
    g = w.abs().amax()
    bh = block_hessians(h)
    base = search_block_scales(w, g, scales, hessian=bh if scales is Method.LOCAL_HESSIAN else None)
    base_err = _out_err(w, nvfp4.fake_quant(w, base.block_amax, g), h)
    r = gptq_quantize(w, h, g, scales, timing, 0.01)
    assert _out_err(w, r.quant, h) < 0.8 * base_err


def test_before_scales_are_the_scale_search_of_the_original_weight():
    w, h, _ = _problem()
    g = w.abs().amax()
    r = gptq_quantize(w, h, g, Method.MSE, "before", 0.01)
    assert torch.equal(r.block_amax, search_block_scales(w, g, Method.MSE).block_amax)


def test_damping():
    # fewer tokens than channels: H is singular, undamped Cholesky fails with a clear error
    w, h, _ = _problem(cin=64, n=32)
    g = w.abs().amax()
    with pytest.raises(CalibrationError, match="gptq_damp"):
        gptq_quantize(w, h, g, Method.MSE, "before", 0.0)
    moves = []
    for damp in (0.01, 0.1, 10.0):
        r = gptq_quantize(w, h, g, Method.MSE, "before", damp)
        assert torch.isfinite(r.weight).all()
        moves.append(float((r.weight - w).norm()))
    assert moves[0] > moves[1] > moves[2]  # more damping, smaller compensation
    assert moves[2] < 0.05 * float(w.norm())


def test_dead_input_channels():
    dead = (3, 17, 18, 40)
    w, h, _ = _problem(dead=dead)
    g = w.abs().amax()
    r = gptq_quantize(w, h, g, Method.MSE, "group", 0.01)
    assert r.dead == len(dead)
    assert torch.isfinite(r.weight).all() and torch.isfinite(r.quant).all()
    assert (r.weight[:, list(dead)] == 0).all() and (r.quant[:, list(dead)] == 0).all()
    assert torch.equal(nvfp4.fake_quant(r.weight, r.block_amax, g), r.quant)


@pytest.mark.parametrize("timing", ["before", "group"])
def test_rows_are_independent(timing):
    """The basis of the sharded layouts: any subset of rows gives the same rows bit for bit."""
    w, h, _ = _problem(rows=24)
    g = w.abs().amax()
    whole = gptq_quantize(w, h, g, Method.MSE, timing, 0.01)
    for rows in (slice(0, 12), slice(12, 24), slice(5, 6)):
        part = gptq_quantize(w[rows], h, g, Method.MSE, timing, 0.01)
        assert torch.equal(part.weight, whole.weight[rows])
        assert torch.equal(part.block_amax, whole.block_amax[rows])


def test_full_statistics_and_their_blocks():
    _, _, x = _problem(cin=48, n=100)
    x = x.float()
    store = StatsStore(full_hessian=True)
    full = store.get_or_create("k", 48, with_hessian=True)
    blocks = InputStats(cin=48, with_hessian=True, accum_dtype=torch.float64)
    for chunk in x.split(30):
        full.update(chunk)
        blocks.update(chunk)
    assert full.full and full.hessian_sum.shape == (48, 48) and full.hessian_sum.dtype == torch.float64
    h = full.full_hessian()
    # float64 sums, normalised, rounded to fp32 once (order-robust), handed out as float64
    assert h.dtype == torch.float64 and torch.equal(h, (full.hessian_sum / 100).float().double())
    torch.testing.assert_close(h, x.double().T @ x.double() / 100, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(full.hessian(), blocks.hessian(), rtol=1e-6, atol=0)
    assert blocks.full_hessian() is None
    empty = StatsStore(full_hessian=True).get_or_create("e", 32, with_hessian=True)
    empty.ensure_allocated(torch.device("cpu"))
    assert empty.hessian_sum.shape == (32, 32) and empty.hessian() is None


@pytest.mark.parametrize("timing", ["before", "group"])
@pytest.mark.parametrize("scales", [Method.MSE, Method.LOCAL_HESSIAN])
def test_column_shards_in_rank_order_equal_the_whole(timing, scales):
    """The row-parallel sweep in one process: shard r applies the scaled errors of shards < r
    (chunked as ranks send them), sweeps its columns and hands its errors on; the shards' W',
    Q and scales equal the whole weight's bit for bit (also with dead channels)."""
    w, h, _ = _problem(rows=8, cin=64, dead=(5, 33))
    w = w.to(torch.bfloat16)
    g = w.float().abs().amax()
    whole = gptq_quantize(w, h, g, scales, timing, 0.01)
    for width in (16, 32):
        sent = []
        for offset in range(0, 64, width):
            part = gptq_quantize(w[:, offset:offset + width], h, g, scales, timing, 0.01, offset=offset,
                                 earlier=list(sent), keep_errors=True)
            cols = slice(offset, offset + width)
            assert torch.equal(part.weight, whole.weight[:, cols]), (width, offset)
            assert torch.equal(part.quant, whole.quant[:, cols]) and torch.equal(
                part.block_amax, whole.block_amax[:, offset // 16:(offset + width) // 16])
            sent.append((offset, part.errors))
    with pytest.raises(ValueError, match="earlier errors"):
        gptq_quantize(w[:, 32:], h, g, scales, timing, 0.01, offset=32, earlier=[(0, sent[0][1][:, :16])])


def test_local_blocks_and_blocks_only():
    _, _, x = _problem(cin=64, n=50)
    x = x.float()
    full = StatsStore(full_hessian=True).get_or_create("k", 64, with_hessian=True)
    full.local_cols = (32, 64)  # a row-parallel rank holding channels 32..63 of the whole input
    full.update(x)
    whole = InputStats(cin=64, with_hessian=True, full=True)
    whole.update(x)
    assert torch.equal(full.full_hessian(), whole.full_hessian())
    assert torch.equal(full.hessian(), whole.hessian()[2:])  # the local diagonal blocks
    small = full.blocks_only()
    assert not small.full and small.hessian_sum.shape == (2, 16, 16) and small.full_hessian() is None
    assert torch.equal(small.hessian(), full.hessian()) and small.tokens == 50
    assert whole.blocks_only().hessian_sum.shape == (4, 16, 16)


def _plain_gptq(w, h, g, scales, timing, damp=0.01):
    """GPTQ as one loop of separate steps per block (the loop before the fused block step): the
    scale search on the dtype-rounded block, the FP8 scales, the sweep, and the update of every
    later column by the block's errors right away (no lazy spans). Torch reference throughout."""
    dtype, rows, cin = w.dtype, *w.shape
    torch_ = KernelImpl.TORCH
    upper, dead = inverse_factor(h, damp)
    u = upper.float()
    work = w.float().clone()
    work[:, dead] = 0.0
    bh = block_hessians(h) if scales is Method.LOCAL_HESSIAN else None

    def search(x, hb):
        return search_block_scales(x, g, scales, hessian=hb, kernels=torch_).block_amax

    amax = search(work.to(dtype), bh).float() if timing == "before" else torch.empty(rows, cin // 16)
    quant = torch.empty(rows, cin)
    for b in range(cin // 16):
        c0, c1 = 16 * b, 16 * b + 16
        if timing == "group":
            amax[:, b] = search(work[:, c0:c1].to(dtype), None if bh is None else bh[b:b + 1])[:, 0]
        v = nvfp4.scale_fp8(amax[:, b], g).float()
        quant[:, c0:c1], err = sweep_block(work[:, c0:c1], u[c0:c1, c0:c1], v, nvfp4.global_scale(g), dtype, torch_)
        propagate(work[:, c1:], err, u[c0:c1, c1:], torch_)
    return work.to(dtype), quant, amax


@pytest.mark.parametrize("timing", ["before", "group"])
@pytest.mark.parametrize("scales,dtype", [(Method.MSE, torch.float32), (Method.MSE, torch.bfloat16),
                                          (Method.MSE, torch.float16), (Method.LOCAL_HESSIAN, torch.bfloat16)])
def test_fused_block_steps_equal_the_plain_loop(timing, scales, dtype):
    """Bit for bit: W', Q and the block amaxes, over two lazy spans (160 columns: 128, 32),
    with dead input channels, a zero row and a row of -0.0."""
    w, h, _ = _problem(rows=8, cin=160, n=300, dead=(3, 130, 131, 150))
    w[0] = 0.0
    w[1] = -0.0
    w = w.to(dtype)
    g = w.float().abs().amax()
    r = gptq_quantize(w, h, g, scales, timing, 0.01, kernels=KernelImpl.TORCH)
    weight, quant, amax = _plain_gptq(w, h, g, scales, timing)
    assert torch.equal(r.weight.view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(r.quant.view(torch.int32), quant.view(torch.int32))
    assert torch.equal(r.block_amax, amax)


def test_factor_shared_by_weights_and_consumed_in_place():
    """One factorisation serves every weight of a key: GPTQ with the key's GPTQFactor (taken from
    the statistics, in place) equals GPTQ with the Hessian bit for bit, also without keeping Q
    and for a column shard of the factor; taking the Hessian leaves the statistics their 16x16
    diagonal blocks (the same per-block Hessians as before)."""
    w, _, x = _problem(rows=16, cin=64, dead=(5,))
    stats = InputStats(cin=64, with_hessian=True, full=True)
    stats.update(x.float())
    h = stats.full_hessian()
    blocks = stats.hessian()
    taken = stats.take_full_hessian()
    assert taken.mT.is_contiguous() and torch.equal(taken, h)  # column-major, the same matrix
    assert not stats.full and stats.full_hessian() is None and torch.equal(stats.hessian(), blocks)
    factor = gptq_factor(taken, 0.01, consume=True)
    g = w.abs().amax()
    for scales in (Method.MSE, Method.LOCAL_HESSIAN):
        ref = gptq_quantize(w, h, g, scales, "group", 0.01)
        got = gptq_quantize(w, factor, g, scales, "group", keep_quant=False)
        assert got.quant is None and got.dead == ref.dead == 1
        assert torch.equal(got.weight, ref.weight) and torch.equal(got.block_amax, ref.block_amax)
    # the factor of a shard's columns [32, 64): the second half of the row-parallel sweep
    half = gptq_factor(h, 0.01, columns=(32, 64))
    errors = gptq_quantize(w[:, :32], h, g, Method.MSE, "group", 0.01, keep_errors=True).errors
    a = gptq_quantize(w[:, 32:], h, g, Method.MSE, "group", 0.01, offset=32, earlier=[(0, errors)])
    b = gptq_quantize(w[:, 32:], half, g, Method.MSE, "group", offset=32, earlier=[(0, errors)])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.block_amax, b.block_amax)
    with pytest.raises(ValueError, match="factor covers columns"):
        gptq_quantize(w[:, :32], half, g, Method.MSE, "group")
