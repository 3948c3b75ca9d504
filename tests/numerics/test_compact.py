"""The one-byte forms of the quantizer state (numerics/compact.py): exact round trips."""

import pytest
import torch

from nvfp4_dist import ConfigError, QuantConfig
from nvfp4_dist.kernels.reference import beta_grid
from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.numerics.compact import (beta_codes, beta_of_codes, block_amax_of_bits, check_beta_grid,
                                         scale_bits)


@pytest.mark.parametrize("g", [1e-6, 0.37, 3.0, 448.0 * 6, 2.5e4])
def test_every_candidate_survives_the_byte(g):
    """A sweep's choice fl(c_k * g) is stored as its scale's bits and decoded bit for bit."""
    g = torch.tensor(g)
    k = torch.arange(126)
    amax = nvfp4.candidate_block_amax(k, g)
    bits = scale_bits(amax, g)
    assert torch.equal(bits.long(), k + 1)  # the E4M3 bits of v_k, in value order
    assert torch.equal(block_amax_of_bits(bits, g), amax)


def test_max_calibration_keeps_its_scale_and_fake_quant():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 256, generator=gen) * torch.logspace(-4, 1, 256)).bfloat16()
    g = w.float().abs().amax()
    amax = nvfp4.block_amax(w)
    decoded = block_amax_of_bits(scale_bits(amax, g), g)
    assert torch.equal(nvfp4.scale_fp8(decoded, g).view(torch.uint8), nvfp4.scale_fp8(amax, g).view(torch.uint8))
    assert torch.equal(nvfp4.fake_quant(w, decoded, g), nvfp4.fake_quant(w, amax, g))


def test_stacked_global_amaxes_broadcast_per_expert():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 8, 64, generator=gen)
    g = w.abs().amax(dim=(1, 2))
    amax = nvfp4.block_amax(w)
    bits = scale_bits(amax, g)
    for e in range(3):
        assert torch.equal(bits[e], scale_bits(amax[e], g[e]))
        assert torch.equal(block_amax_of_bits(bits, g)[e], block_amax_of_bits(bits[e], g[e]))


def test_beta_codes_are_the_grid_values_exactly():
    codes = torch.arange(1, 256, dtype=torch.uint8)
    want = torch.tensor([round(c / 100, 10) for c in range(1, 256)], dtype=torch.float32)
    assert torch.equal(beta_of_codes(codes), want)  # every code, against Python's double path
    for grid in (beta_grid(0.5, 1.5, 0.05), beta_grid(0.5, 1.5, 0.01), beta_grid(0.8, 1.2, 0.02)):
        assert torch.equal(beta_of_codes(beta_codes(grid)), grid)


def test_unset_codes_decode_to_nan():
    assert torch.isnan(beta_of_codes(torch.zeros(2, dtype=torch.uint8))).all()
    assert torch.isnan(block_amax_of_bits(torch.tensor([0, 127, 255], dtype=torch.uint8), torch.tensor(1.0))).all()


def test_grids_off_the_hundredths_are_refused_before_any_work():
    assert check_beta_grid(0.5, 1.5, 0.05) is None
    assert "0.525" in check_beta_grid(0.5, 1.5, 0.025)
    assert check_beta_grid(0.5, 2.6, 0.1) is not None  # 2.6 > 2.55
    with pytest.raises(ConfigError, match="multiple of 0.01"):
        QuantConfig(method="local_hessian", dss=True, dss_beta_step=0.025)
    QuantConfig(method="local_hessian", dss=False, dss_beta_step=0.025)  # unused without DSS
