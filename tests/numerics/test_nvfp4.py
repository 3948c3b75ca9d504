"""NVFP4 numerics: E2M1 code points and ties, E4M3 scale clamps, pack order, round trips."""

import pytest
import torch

from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.numerics.constants import E2M1_VALUES, E4M3_MIN_SCALE, e4m3_positive_values

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# magnitude (in units of the quant scale) -> expected code; midpoints exercise ties-to-even
GOLDEN = [
    (0.0, 0), (0.1, 0), (0.25, 0), (0.26, 1), (0.5, 1), (0.74, 1), (0.75, 2), (1.0, 2),
    (1.25, 2), (1.26, 3), (1.5, 3), (1.74, 3), (1.75, 4), (2.0, 4), (2.5, 4), (2.6, 5),
    (3.0, 5), (3.49, 5), (3.5, 6), (4.0, 6), (5.0, 6), (5.01, 7), (6.0, 7), (100.0, 7),
]


@pytest.mark.parametrize("magnitude,code", GOLDEN, ids=[f"m{m}" for m, _ in GOLDEN])
def test_e2m1_code_point(magnitude, code):
    # scale 1.0: thresholds are the exact values 0.25 ... 5
    got = nvfp4.e2m1_code_magnitude(torch.tensor([magnitude]), torch.tensor(1.0))
    assert got.item() == code


def test_code_ties_at_power_of_two_scales():
    # with a power-of-two quant scale every threshold product is exact, so ties stay ties
    for scale in (2.0**-20, 2.0**-3, 1.0, 2.0**7):
        m = torch.tensor([t for t, _ in GOLDEN]) * scale
        got = nvfp4.e2m1_code_magnitude(m, torch.tensor(scale))
        assert got.tolist() == [c for _, c in GOLDEN]


def test_codes_are_nearest_grid_point():
    torch.manual_seed(0)
    m = torch.rand(100_000) * 7
    code = nvfp4.e2m1_code_magnitude(m, torch.tensor(1.0)).long()
    grid = torch.tensor(E2M1_VALUES)
    dist = (m[:, None] - grid[None, :]).abs()
    assert torch.all(dist.gather(1, code[:, None]).squeeze(1) <= dist.min(dim=1).values)


def test_sign_bit_and_negative_zero():
    w = torch.tensor([[1.0, -1.0, -0.0, 0.0, -6.0, 6.0, -0.1, 0.1] * 2])
    scale = torch.tensor([[256.0]]).to(torch.float8_e4m3fn)
    s = torch.tensor(2.0**-8)  # decode scale exactly 1.0
    codes = nvfp4.encode(w, scale, s)
    assert codes[0, :8].tolist() == [2, 10, 0, 0, 15, 7, 8, 0]
    assert torch.equal(nvfp4.decode(codes, scale, s), torch.tensor([[1.0, -1, 0, 0, -6, 6, 0, 0] * 2]))


def test_pack_low_nibble_first_and_round_trip():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = nvfp4.pack(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert torch.equal(nvfp4.unpack(nvfp4.pack(codes)), codes)


def test_candidate_set_is_126_ascending_e4m3_values():
    v = e4m3_positive_values()
    assert v.numel() == 126 and torch.all(v[1:] > v[:-1])
    assert v[0].item() == E4M3_MIN_SCALE and v[-1].item() == 448.0
    assert torch.equal(v.to(torch.float8_e4m3fn).float(), v)


@pytest.mark.parametrize("g", [1e-6, 0.02, 0.731, 3.0, 1e4])
def test_candidate_block_amax_round_trips_to_its_fp8_value(g):
    g = torch.tensor(g)
    k = torch.arange(126)
    scale = nvfp4.scale_fp8(nvfp4.candidate_block_amax(k, g), g)
    assert torch.equal(scale.float(), e4m3_positive_values())


def test_scale_clamps_never_nan():
    g = torch.tensor(1.0)
    bamax = torch.tensor([0.0, 1e-30, 1e30, float("inf"), 1.0])
    scale = nvfp4.scale_fp8(bamax, g).float()
    assert torch.isfinite(scale).all()
    assert scale.tolist()[:4] == [E4M3_MIN_SCALE, E4M3_MIN_SCALE, 448.0, 448.0]
    assert scale[-1].item() == 448.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_error_bound_and_idempotence(dtype):
    torch.manual_seed(0)
    w = (torch.randn(32, 128) * 0.05).to(dtype)
    g = w.float().abs().amax()
    bamax = nvfp4.block_amax(w)
    fq = nvfp4.fake_quant(w, bamax, g, out_dtype=torch.float32)
    assert fq.dtype == torch.float32 and torch.isfinite(fq).all()
    # max calibration: every element within half the largest grid step (1 decode scale) of w
    d = nvfp4.scale_fp8(bamax, g).float() * nvfp4.global_scale(g)
    err = nvfp4.blocks(w.float() - fq).abs().amax(-1)
    assert torch.all(err <= d * (1 + 2**-6) + 1e-12)
    # fake-quant values are on the grid: quantizing them again changes nothing
    assert torch.equal(nvfp4.fake_quant(fq, bamax, g, out_dtype=torch.float32), fq)
    # the low-precision output is the fp32 result rounded once
    assert torch.equal(nvfp4.fake_quant(w, bamax, g), fq.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_weight_and_zero_blocks(dtype):
    w = torch.zeros(4, 32, dtype=dtype)
    g = w.float().abs().amax()
    scale = nvfp4.scale_fp8(nvfp4.block_amax(w), g)
    assert torch.all(scale.float() == E4M3_MIN_SCALE)
    assert torch.isfinite(nvfp4.global_scale(g)) and nvfp4.global_scale(g) > 0
    assert torch.isfinite(1.0 / nvfp4.global_scale(g))
    assert torch.equal(nvfp4.fake_quant(w, nvfp4.block_amax(w), g), w)
    # a zero block inside a non-zero weight
    w2 = torch.randn(4, 32).to(dtype)
    w2[:, :16] = 0
    fq = nvfp4.fake_quant(w2, nvfp4.block_amax(w2), w2.float().abs().amax())
    assert torch.all(fq[:, :16] == 0) and torch.isfinite(fq).all()


def test_tiny_and_saturating_blocks():
    g = torch.tensor(1.0)
    w = torch.full((1, 16), 1e-9)  # far below the smallest block scale: quantizes to zero
    fq = nvfp4.fake_quant(w, nvfp4.block_amax(w), g)
    assert torch.all(fq == 0)
    w = torch.full((1, 16), 2.0)
    fq = nvfp4.fake_quant(w, torch.full((1, 1), 0.5), g)  # block amax below the data: saturate at 6d
    d = nvfp4.scale_fp8(torch.full((1, 1), 0.5), g).float() * nvfp4.global_scale(g)
    assert torch.allclose(fq, 6 * d.expand(1, 16), rtol=0, atol=0)


def test_decoupled_codes_use_quant_scale_and_dequant_uses_stored_scale():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    g = w.abs().amax()
    bamax = nvfp4.block_amax(w)
    beta = torch.full_like(bamax, 0.8)
    scale = nvfp4.scale_fp8(bamax, g)
    s = nvfp4.global_scale(g)
    codes = nvfp4.encode(w, scale, s, beta)
    expected = nvfp4.encode(w, scale, s * 1.0, None)
    assert not torch.equal(codes, expected)  # a smaller quant scale moves codes up
    d_q = 0.8 * (scale.float() * s)
    mag = nvfp4.e2m1_code_magnitude(nvfp4.blocks(w.abs()), d_q.unsqueeze(-1)).reshape(w.shape)
    assert torch.equal(codes & 7, mag)
    assert torch.equal(nvfp4.fake_quant(w, bamax, g, beta), nvfp4.decode(codes, scale, s))
