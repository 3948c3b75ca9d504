"""Device functions on bf16 pairs (:mod:`nvfp4_dist.kernels.tl_bf16x2`) against torch.

Under the interpreter these run the integer twins of the PTX blocks; on the GPU, the PTX.
"""

import pytest
import torch
import triton
import triton.language as tl

from nvfp4_dist.kernels.tl_bf16x2 import FAST_Q_LIMIT, scaled_thresholds

TAUS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
INCLUSIVE = (False, True, False, True, False, True, False)  # a >= t rounds t up, a > t down


@triton.jit
def _thresholds(q_ptr, out_ptr, n, FULL_RANGE: tl.constexpr, PTX: tl.constexpr):
    i = tl.program_id(0) * 256 + tl.arange(0, 256)
    m = i < n
    t0, t1, t2, t3, t4, t5, t6 = scaled_thresholds(tl.load(q_ptr + i, mask=m, other=1.0), FULL_RANGE, PTX)
    tl.store(out_ptr + i, t0, mask=m)
    tl.store(out_ptr + n + i, t1, mask=m)
    tl.store(out_ptr + 2 * n + i, t2, mask=m)
    tl.store(out_ptr + 3 * n + i, t3, mask=m)
    tl.store(out_ptr + 4 * n + i, t4, mask=m)
    tl.store(out_ptr + 5 * n + i, t5, mask=m)
    tl.store(out_ptr + 6 * n + i, t6, mask=m)


def _quant_scales(top: int) -> torch.Tensor:
    """fp32 q from 2^-86 (the smallest quant scale) to 2^top: random significands, ones that are
    bf16 values, ones whose products with 0.75 / 1.25 / 1.75 are, and the largest below 2^top."""
    gen = torch.Generator().manual_seed(5)
    exps = torch.randint(-86, top, (4096,), generator=gen)
    mant = torch.randint(0, 1 << 23, (4096,), generator=gen)
    mant[1024:2048] &= ~0xFFFF  # exact in bf16
    q = (((exps + 127) << 23) | mant).to(torch.int32).view(torch.float32)
    exact = torch.tensor([1.0, 4.0, 6.0])
    tied = torch.cat([exact / 0.75, exact / 1.25, exact / 1.75]).float()
    tied = torch.cat([tied * 2.0 ** -86, tied, tied * 2.0 ** (top - 4)])
    largest = torch.tensor(2.0 ** top, dtype=torch.float32).view(torch.int32) - torch.arange(1, 4, dtype=torch.int32)
    return torch.cat([q, tied, largest.view(torch.float32)])


def _reference(q: torch.Tensor) -> torch.Tensor:
    """``fl(t q)`` rounded to bf16 (down, or up for the inclusive thresholds), in both halves."""
    out = []
    for tau, up in zip(TAUS, INCLUSIVE):
        bits = (torch.tensor(tau, dtype=torch.float32) * q).view(torch.int32).long()
        top = ((bits + 0xFFFF) if up else bits) & 0xFFFF0000
        out.append((top | (top >> 16)).to(torch.uint32).view(torch.int32))
    return torch.stack(out)


@pytest.mark.parametrize("full_range", [False, True], ids=["fast", "full-range"])
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # 5 q beyond fp32, as asked
def test_scaled_thresholds_are_the_products_rounded(full_range, device):
    """Four products and exponent steps give the seven rounded thresholds of every quant scale
    below FAST_Q_LIMIT; the full-range variant those of every finite one (5 q may overflow)."""
    q = _quant_scales(128 if full_range else 124)
    assert full_range or q.max() < FAST_Q_LIMIT
    got = torch.empty(7, q.numel(), dtype=torch.int32, device=device)
    _thresholds[(triton.cdiv(q.numel(), 256),)](q.to(device), got, q.numel(), FULL_RANGE=full_range,
                                               PTX=device.type == "cuda")
    ref = _reference(q)
    assert torch.equal(got.cpu(), ref), f"first mismatches at {(got.cpu() != ref).nonzero()[:4].tolist()}"
