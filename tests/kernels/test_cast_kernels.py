"""Triton fake-quant and cast/pack are bit-exact with numerics (values, codes, scale bytes)."""

import pytest
import torch

from inputs import DTYPES, global_amax, weight
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels import triton_ops
from nvfp4_dist.numerics import nvfp4
from nvfp4_dist.numerics.constants import GLOBAL_SCALE_DENOM, e4m3_positive_values


def _bits(t):
    return t.float().view(torch.int32).cpu()  # distinguishes -0.0 from 0.0


def _scales(w, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, nb = w.shape[0], w.shape[1] // 16
    bamax = nvfp4.block_amax(w) * (0.5 + torch.rand(rows, nb, generator=gen))
    bamax[0, 0], bamax[0, 1] = 0.0, 1e-30  # clamps to the smallest scale
    bamax[1, 0] = w.float().abs().amax() * 10  # clamps to 448
    return bamax, 0.5 + torch.rand(rows, nb, generator=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dss", [False, True])
def test_fake_quant_and_pack_are_bit_exact(dtype, dss, device):
    w = weight(33, 96, "heavy", seed=41, dtype=dtype)
    w[3, :16] = -0.0
    g = global_amax(w)
    bamax, beta = _scales(w, 42)
    beta = beta if dss else None
    wd, args = w.to(device), [t if t is None else t.to(device) for t in (bamax, g, beta)]
    fq = triton_ops.fake_quant(wd, *args)
    assert fq.dtype == dtype and fq.shape == w.shape
    assert torch.equal(_bits(fq), _bits(nvfp4.fake_quant(w, bamax, g, beta)))
    packed, scale = triton_ops.quantize_pack(wd, *args)
    ref_packed, ref_scale = R.quantize_pack(w, bamax, g, beta)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(scale.view(torch.uint8).cpu(), ref_scale.view(torch.uint8))


@pytest.mark.parametrize("shape", [(300, 2064), (256, 1024)], ids=["ragged", "even"])
def test_fake_quant_tiles(shape, device):
    """Several row and column tiles with both edges partial, and tiles that cover the weight
    exactly (the unmasked path); the interpreter's tiles are 256 x 1024, the GPU's 4 x 1024."""
    w = weight(*shape, "heavy", seed=44, dtype=torch.bfloat16)
    g = global_amax(w)
    bamax, beta = _scales(w, 45)
    for b in (None, beta):
        args = [t if t is None else t.to(device) for t in (bamax, g, b)]
        got = triton_ops.fake_quant(w.to(device), *args)
        assert torch.equal(_bits(got), _bits(nvfp4.fake_quant(w, bamax, g, b)))


def test_scale_rounding_ties_and_range(device):
    """Every E4M3 value, every midpoint between neighbours (exact ties: S = 1) and ratios
    beyond both clamp edges give the reference's scale bytes."""
    v = e4m3_positive_values()
    ratios = torch.cat([v, (v[:-1] + v[1:]) / 2, torch.tensor([1e-12, 2.0**-10, 460.0, 1e9])])
    g = torch.tensor(GLOBAL_SCALE_DENOM)  # S = 1: block_amax / 6 is the ratio, exactly
    bamax = (ratios * 6).reshape(-1, 1)
    w = torch.zeros(ratios.numel(), 16)
    packed, scale = triton_ops.quantize_pack(w.to(device), bamax.to(device), g.to(device))
    assert torch.equal(scale.view(torch.uint8).cpu(), R.quantize_pack(w, bamax, g)[1].view(torch.uint8))


def _neighbours(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values of ``dtype`` (bf16 or fp16) around fp32 ``t > 0``: ``t`` rounded down and up on
    that grid and one step beyond each (between 0 and infinity: subnormals included)."""
    if dtype == torch.bfloat16:
        bits = t.view(torch.int32)
        down = bits & -65536
        up = (bits + 65535) & -65536
        return torch.stack([down - 65536, down, up, up + 65536], -1).view(torch.float32).bfloat16()
    near = t.half()
    bits = near.view(torch.int16).int()
    down = torch.where(near.float() > t, bits - 1, bits)
    up = torch.where(near.float() < t, bits + 1, bits)
    out = torch.stack([down - 1, down, up, up + 1], -1).clamp(0, 0x7C00)
    return out.short().view(torch.float16)


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1.0), (torch.float16, 1.0),
                                         (torch.float16, 2.0**-12), (torch.float16, 28.0)],
                         ids=["bf16", "fp16", "fp16-subnormal", "fp16-overflow"])
@pytest.mark.parametrize("dss", [False, True])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's fp16 casts
def test_fake_quant_at_the_thresholds(dtype, scale, dss, device):
    """Weights at, just below and just above every code threshold ``fl(t * d_q)``, for scales
    whose thresholds are exact on the weight's grid and for quant scales whose thresholds are
    not (beta): the strict / inclusive comparisons and the rounding of the thresholds to bf16 or
    fp16. fp16 with a small global scale puts thresholds and values among the subnormals; with
    a large one the top thresholds beyond the largest finite fp16."""
    v = e4m3_positive_values()[torch.tensor([0, 5, 40, 56, 64, 83, 100, 125])]  # 2^-9 .. 448
    beta = torch.tensor([0.7, 1.05, 1.3, 0.55, 0.9, 1.45, 0.6, 1.2]) if dss else None
    d_q = v * scale if beta is None else beta * (v * scale)  # S = scale below: d = fl(v S)
    t = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = _neighbours(t[None, :] * d_q[:, None], dtype).reshape(len(v), -1)  # [8, 28]
    sign = torch.where(torch.arange(32) % 3 == 0, -1.0, 1.0)
    w = (torch.cat([near, near[:, :4]], 1).float() * sign).to(dtype)  # 32 values: two blocks per scale
    g = torch.tensor(GLOBAL_SCALE_DENOM * scale)  # S = scale, exactly
    assert torch.equal(g / GLOBAL_SCALE_DENOM, torch.tensor(scale))
    bamax = (v * 6 * scale).reshape(-1, 1).expand(-1, 2).contiguous()
    b = None if beta is None else beta.reshape(-1, 1).expand(-1, 2).contiguous()
    got = triton_ops.fake_quant(w.to(device), bamax.to(device), g.to(device), None if b is None else b.to(device))
    assert got.dtype == dtype
    assert torch.equal(_bits(got), _bits(nvfp4.fake_quant(w, bamax, g, b)))


def test_fake_quant_views_and_expert_stacks(device):
    w = weight(48, 64, "gauss", seed=43)
    g = global_amax(w)
    wt = w.t().contiguous().t()  # cin stride != 1: copied
    bamax = nvfp4.block_amax(w)
    assert torch.equal(triton_ops.fake_quant(wt.to(device), bamax.to(device), g.to(device)).cpu(),
                       nvfp4.fake_quant(w, bamax, g))
    odd = torch.zeros(48 * 64 + 1, dtype=torch.bfloat16, device=device)[1:].view(48, 64)  # pairs not 4-byte aligned
    odd.copy_(w)
    assert torch.equal(_bits(triton_ops.fake_quant(odd, bamax.to(device), g.to(device))),
                       _bits(nvfp4.fake_quant(odd.cpu(), bamax, g)))
    experts = w.reshape(3, 16, 64)  # [E, rows, cin] with one amax tensor [E, rows, cin / 16]
    got = triton_ops.fake_quant(experts.to(device), bamax.reshape(3, 16, 4).to(device), g.to(device))
    assert got.shape == experts.shape
    assert torch.equal(got.cpu(), nvfp4.fake_quant(experts, bamax.reshape(3, 16, 4), g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_quant_of_stacked_experts_with_one_global_amax_each(dtype, device):
    """[E, rows, cin] with global_amax [E]: one launch, each expert as if quantized alone
    (rows per expert not a multiple of the tile, experts of very different magnitudes)."""
    experts = torch.stack([weight(37, 160, "heavy", seed=60 + e, dtype=dtype) * 4.0**e for e in range(3)])
    g = experts.float().abs().amax(dim=(1, 2))
    bamax = torch.stack([_scales(experts[e], 61 + e)[0] for e in range(3)])
    beta = 0.5 + torch.rand(bamax.shape, generator=torch.Generator().manual_seed(62))
    for b in (None, beta):
        args = [t if t is None else t.to(device) for t in (bamax, g, b)]
        got = triton_ops.fake_quant(experts.to(device), *args)
        ref = torch.stack([nvfp4.fake_quant(experts[e], bamax[e], g[e], None if b is None else b[e])
                           for e in range(3)])
        assert torch.equal(_bits(got), _bits(ref))
    with pytest.raises(ValueError, match="global_amax shape"):
        triton_ops.fake_quant(experts.to(device), bamax.to(device), g[:2].to(device))
    with pytest.raises(ValueError, match="global_amax shape"):
        triton_ops.fake_quant(experts[0].to(device), bamax[0].to(device), g.to(device))


def test_bad_shapes_are_rejected(device):
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_ops.fake_quant(torch.zeros(4, 24, device=device), torch.zeros(4, 1), torch.ones(()))
    with pytest.raises(ValueError, match="block_amax shape"):
        triton_ops.fake_quant(torch.zeros(4, 32, device=device), torch.zeros(3, 2), torch.ones(()))
    with pytest.raises(TypeError):
        triton_ops.search_mse(torch.zeros(4, 32, dtype=torch.float64, device=device), torch.ones(()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dss", [False, True])
@pytest.mark.parametrize("shape", [(33, 96), (3, 16, 64)], ids=["weight", "stacked"])
def test_state_codes_give_the_bits_of_their_values(dtype, dss, shape, device):
    """The quantizer state's one-byte codes (scale bytes, beta hundredths) read by the kernels
    directly: the same bits as the fp32 values they encode, through fake-quant and cast/pack,
    the kernels (both fake-quant variants: bf16/fp16 pairs, fp32 element-wise) and the reference."""
    from nvfp4_dist.kernels import dispatch
    from nvfp4_dist.kernels.types import KernelImpl
    from nvfp4_dist.numerics.compact import beta_codes, beta_of_codes, block_amax_of_bits, scale_bits

    w = weight(shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1], "heavy", seed=61, dtype=dtype)
    w = w.reshape(shape)
    g = w.float().abs().amax(dim=-1).amax(dim=-1) if len(shape) == 3 else global_amax(w)
    gen = torch.Generator().manual_seed(62)
    bamax = nvfp4.block_amax(w) * (0.5 + torch.rand(nvfp4.block_amax(w).shape, generator=gen))
    bits = scale_bits(bamax, g)
    bits.view(-1)[0] = 1  # the smallest scale
    # betas 0.50 .. 1.50 in hundredths (the grid of step 0.01)
    codes = beta_codes((50 + torch.randint(0, 101, bits.shape, generator=gen)) / 100) if dss else None
    values = block_amax_of_bits(bits, g), None if codes is None else beta_of_codes(codes)
    wd = w.to(device)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    fq_codes = triton_ops.fake_quant(wd, on(bits), on(g), on(codes))
    fq_values = triton_ops.fake_quant(wd, on(values[0]), on(g), on(values[1]))
    assert torch.equal(_bits(fq_codes), _bits(fq_values))
    ref = dispatch.fake_quant_weight(w, bits, g, codes, kernels=KernelImpl.TORCH)
    assert torch.equal(_bits(fq_codes), _bits(ref))
    if len(shape) == 2:
        packed, scale = triton_ops.quantize_pack(wd, on(bits), on(g), on(codes))
        ref_packed, ref_scale = R.quantize_pack(w, values[0], g, values[1])
        assert torch.equal(packed.cpu(), ref_packed)
        assert torch.equal(scale.view(torch.uint8).cpu(), bits)  # the stored byte is the state's byte
        assert torch.equal(scale.view(torch.uint8).cpu(), ref_scale.view(torch.uint8))
