"""W4A4 activation fake-quant: the reference's formula, and the Triton kernel bit-exact with it."""

import pytest
import torch

from inputs import DTYPES
from nvfp4_dist.kernels import dispatch, triton_ops
from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.numerics.constants import E2M1_VALUES, GLOBAL_SCALE_DENOM, e4m3_positive_values


def _bits(t):
    return t.float().view(torch.int32).cpu()  # distinguishes -0.0 from 0.0


def _activations(shape, dtype, seed, amax):
    """Student-t activations with a zero block, a tiny block, a block far beyond the calibrated
    amax (saturation), a negative-zero block, a block around the zero-scale edge and a block of
    fp32 subnormals."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.distributions.StudentT(3.0).sample(shape) * (amax / 20)
    x = x.reshape(-1, shape[-1])
    x[0, :16] = 0.0
    x[1, 16:32] = torch.linspace(-1e-6, 1e-6, 16)
    x[2, :16] *= 500.0
    x[3, :16] = -0.0
    x[4, :16] = torch.rand(16, generator=gen) * (amax / 2688 * 6 * 2.0**-10 * 1.5)
    x[5, :16] = torch.linspace(-1e-39, 1e-39, 16)  # fp32 subnormals: a zero scale, signed zeros
    return x.reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_is_bit_exact_3d(dtype, device):
    """[batch, seq, hidden] with every edge case; the interpreter covers it in a few programs."""
    amax = torch.tensor(3.5)
    x = _activations((3, 97, 272), dtype, seed=1, amax=3.5)
    got = triton_ops.fake_quant_input(x.to(device), amax.to(device))
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(_bits(got), _bits(nvfp4.fake_quant_input(x, amax)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernel_non_contiguous_and_even_tiles(dtype, device):
    x = _activations((64, 2 * 1024), dtype, seed=2, amax=7.0)
    amax = torch.tensor(7.0)
    for view in (x[:, :1024], x[:, 1024:], x.t().contiguous().t()[:, :512], x[::3]):
        got = triton_ops.fake_quant_input(view.to(device), amax.to(device))
        assert torch.equal(_bits(got), _bits(nvfp4.fake_quant_input(view, amax)))
    # through the dispatch (kernels="triton": interpreter on the CPU, compiled on a GPU)
    got = dispatch.fake_quant_input(x.to(device), amax.to(device), kernels="triton")
    assert torch.equal(_bits(got), _bits(dispatch.fake_quant_input(x, amax, kernels="torch")))


def test_block_scale_rounding_edges(device):
    """Every E4M3 value as a ratio, every midpoint (ties), the zero-scale edge 2^-10 and beyond
    448: G = 1 exactly (input amax 2688), so the block amax / 6 is the ratio."""
    v = e4m3_positive_values()
    ratios = torch.cat([v, (v[:-1] + v[1:]) / 2, torch.tensor([2.0**-10, 2.0**-10 * 1.01, 2.0**-11, 460.0, 1e6])])
    amax = torch.tensor(GLOBAL_SCALE_DENOM)
    assert nvfp4.input_global_scale(amax) == 1.0
    x = torch.zeros(ratios.numel(), 16)
    x[:, 5] = ratios * 6
    want = nvfp4.fake_quant_input(x, amax)
    assert torch.equal(_bits(triton_ops.fake_quant_input(x.to(device), amax.to(device))), _bits(want))
    scale = nvfp4.dynamic_scale_fp8(ratios * 6, amax).float()
    assert torch.equal(scale[:126], v)  # exact E4M3 ratios are kept
    edges = scale[-5:].tolist()
    assert edges[:3] == [0.0, 2.0**-9, 0.0] and edges[3:] == [448.0, 448.0]  # tie to 0; satfinite


def test_formula_as_engines_compute_it():
    """The reference equals an independent spelling of the served computation: scale from the
    block amax times the global scale, codes of x / (v / G) rounded to nearest even on the E2M1
    grid (saturating at 6), dequantized as e2m1 * v * S_in (exact ties excluded by construction)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 128, generator=gen) * 2
    x[5] *= 40  # beyond the calibrated range: saturates
    amax = torch.tensor(6.0)
    s_in = amax / GLOBAL_SCALE_DENOM
    g = 1.0 / s_in
    xb = x.double().reshape(64, 8, 16)
    v = (xb.abs().amax(-1) / 6 * g.double()).clamp(max=448).float().to(torch.float8_e4m3fn).double()
    scaled = (xb / (v / g.double()).unsqueeze(-1)).abs()
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    code = (scaled.unsqueeze(-1) - grid).abs().argmin(-1)  # nearest (no exact ties in random data)
    want = (grid[code] * v.unsqueeze(-1) * s_in.double()).copysign(xb).reshape(64, 128)
    got = nvfp4.fake_quant_input(x, amax).double()
    assert torch.allclose(got, want, rtol=2**-20, atol=0)
    assert got[5].abs().max() <= 6 * 448 * s_in  # saturated at the calibrated amax


def test_per_token_blocks_and_channel_slices():
    """Blocks are per token along the last dimension: quantizing a 16-aligned channel slice (a
    row-parallel rank's input) equals the same channels of the whole row's quantization."""
    x = _activations((4, 8, 256), torch.bfloat16, seed=4, amax=2.0)
    amax = torch.tensor(2.0)
    whole = nvfp4.fake_quant_input(x, amax)
    for lo, hi in ((0, 128), (128, 256), (64, 192)):
        assert torch.equal(_bits(nvfp4.fake_quant_input(x[..., lo:hi], amax)), _bits(whole[..., lo:hi]))
    assert torch.equal(_bits(nvfp4.fake_quant_input(x[1:2], amax)), _bits(whole[1:2]))  # per token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_row_scales_equal_one_call_per_expert(dtype, device):
    """Fused experts' rows in one launch, row r under ``input_amax[row_scale[r]]``: bit for bit
    the per-expert calls with each expert's own scale, grouped or not. Experts 1 and 4 have no
    rows; expert 2's amax is 0 (a dead expert's clamped scale: every block saturates), expert 3's
    the unobserved default 1.0, expert 5's far above the data (tiny ratios, zero block scales)."""
    amax = torch.tensor([3.5, 9.0, 0.0, 1.0, 2.0, 1e4])
    counts = [40, 0, 7, 33, 0, 17]
    row_scale = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
    x = _activations((row_scale.numel(), 272), dtype, seed=5, amax=3.5)
    want = torch.cat([nvfp4.fake_quant_input(x[row_scale == e], amax[e]) for e in range(6)])
    got_ref = nvfp4.fake_quant_input(x, amax, row_scale)
    assert torch.equal(_bits(got_ref), _bits(want))
    for idx in (row_scale, row_scale.int()):  # int64 (sort indices) or int32
        got = triton_ops.fake_quant_input(x.to(device), amax.to(device), idx.to(device))
        assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(6))  # rows in any order
    got = dispatch.fake_quant_input(x[perm].to(device), amax.to(device), kernels="triton",
                                    row_scale=row_scale[perm].to(device))
    assert torch.equal(_bits(got), _bits(want[perm]))
    ref = dispatch.fake_quant_input(x[perm], amax, kernels="torch", row_scale=row_scale[perm])
    assert torch.equal(_bits(ref), _bits(want[perm]))
    # leading dimensions: row_scale has x's shape without the last dimension
    got = triton_ops.fake_quant_input(x[:96].reshape(8, 12, 272).to(device), amax.to(device),
                                      row_scale[:96].reshape(8, 12).to(device))
    assert torch.equal(_bits(got.reshape(96, 272)), _bits(want[:96]))
