"""The fast reference (exact candidate windows) equals the plain full sweep bit for bit, its
bounds hold against every candidate's loss, and a row's result never depends on its chunk."""

import pytest
import torch

from inputs import global_amax, hessian, weight
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels.candidates import CandidateTables, candidate_loss
from nvfp4_dist.kernels.windows import candidate_window, schur_floor, start_candidate
from nvfp4_dist.numerics import nvfp4


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_windowed_mse_equals_full_sweep(kind, dtype):
    w = weight(40, 256, kind, seed=11, dtype=dtype)
    g = global_amax(w)
    fast, full = R.search_mse(w, g), R._full_sweep(w, g, None)
    assert torch.equal(fast.candidate, full.candidate)
    assert torch.equal(fast.loss, full.loss)
    assert torch.equal(fast.block_amax, full.block_amax)


@pytest.mark.parametrize("kind,noise", [("gauss", 0.3), ("heavy", 0.3), ("heavy", 0.0)])
def test_windowed_hessian_and_dss_equal_full(kind, noise):
    w = weight(24, 96, kind, seed=12)
    g = global_amax(w)
    h = hessian(96, seed=3, noise=noise)
    fast, full = R.search_local_hessian(w, g, h), R._full_sweep(w, g, h)
    assert torch.equal(fast.candidate, full.candidate)
    assert torch.equal(fast.loss, full.loss)
    betas = R.beta_grid(0.5, 1.5, 0.1)
    fast, full = R.search_dss(w, g, h, betas), R._full_dss(w, g, h, betas)
    assert torch.equal(fast.candidate, full.candidate)
    assert torch.equal(fast.dss_beta, full.dss_beta)
    assert torch.equal(fast.loss, full.loss)


@pytest.mark.parametrize("use_hessian", [False, True])
def test_window_bounds_hold_for_every_candidate(use_hessian):
    """Below the window every loss exceeds the start candidate's strictly; above it, no loss is
    below it; so the window holds the smallest argmin of all 126 losses."""
    w = weight(32, 128, "heavy", seed=13)
    g = global_amax(w)
    h = hessian(128, seed=4) if use_hessian else None
    tables = CandidateTables(g, w.device)
    wb = nvfp4.blocks(w.float())
    losses = torch.stack([candidate_loss(wb, k, tables, h) for k in range(126)], -1)
    a = wb.abs()
    k0 = start_candidate(a.amax(-1), tables)
    upper = losses.gather(-1, k0[..., None]).squeeze(-1)
    kappa = None if h is None else schur_floor(h)
    k_lo, k_hi = candidate_window(a, k0, upper, tables, kappa)
    k = torch.arange(126)
    below = k < k_lo[..., None]
    above = k > k_hi[..., None]
    assert torch.all(~below | (losses > upper[..., None]))
    assert torch.all(~above | (losses >= upper[..., None]))
    best = losses.argmin(-1)  # first index of the minimum
    assert torch.all((k_lo <= best) & (best <= k_hi))
    # the windows do prune (the Hessian ones less: its rank-2 + noise blocks are ill-conditioned)
    assert (k_hi - k_lo + 1).float().mean() < (30 if h is None else 100)


def test_schur_floor_is_a_lower_bound_of_the_computed_loss():
    h = hessian(64, seed=5)
    kappa = schur_floor(h)
    assert torch.all(kappa > 0)
    gen = torch.Generator().manual_seed(0)
    dw = torch.randn(4096, 4, 16, generator=gen) * torch.rand(4096, 4, 1, generator=gen)
    loss = R.block_loss(dw, h)
    assert torch.all((kappa * dw * dw).amax(-1) <= loss)
    singular = hessian(32, seed=5, noise=0.0)
    assert torch.all(schur_floor(singular) == 0)


def test_rows_are_independent_of_their_chunk():
    w = weight(40, 64, "heavy", seed=14)
    g = global_amax(w)
    h = hessian(64, seed=6)
    full = R.search_local_hessian(w, g, h, chunk_elems=10 * 64)
    part = R.search_local_hessian(w[13:29], g, h, chunk_elems=7 * 64)
    assert torch.equal(full.candidate[13:29], part.candidate)
    assert torch.equal(full.loss[13:29], part.loss)
    cols = R.search_mse(w[:, 16:48], g)
    assert torch.equal(R.search_mse(w, g).loss[:, 1:3], cols.loss)


def test_quantize_pack_is_encode_and_scale():
    w = weight(8, 64, "gauss", seed=15)
    g = global_amax(w)
    bamax = nvfp4.block_amax(w)
    packed, scale = R.quantize_pack(w, bamax, g)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (8, 4)
    codes = nvfp4.unpack(packed)
    assert torch.equal(nvfp4.decode(codes, scale, nvfp4.global_scale(g)), nvfp4.fake_quant(w, bamax, g))
