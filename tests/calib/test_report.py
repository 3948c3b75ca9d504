"""The run report's error sums agree with a float64 computation of their definitions."""

import torch

from nvfp4_dist.calib.report import error_sums
from nvfp4_dist.numerics import nvfp4


def test_error_sums_match_float64_definitions():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 64, generator=gen) * 0.02).bfloat16()
    g = w.float().abs().amax()
    fq_max = nvfp4.fake_quant(w, nvfp4.block_amax(w), g)
    fq = nvfp4.fake_quant(w, nvfp4.block_amax(w) * 0.9, g)
    x = torch.randn(256, 4, 16, generator=gen)
    h = torch.einsum("tbi,tbj->bij", x, x) / 256
    got = error_sums(w, fq, fq_max, h)
    wd = w.double()
    dw = (wd - fq.double()).reshape(48, 4, 16)
    dw_max = (wd - fq_max.double()).reshape(48, 4, 16)
    want = torch.stack([wd.square().sum(), dw.square().sum(), dw_max.square().sum(),
                        torch.einsum("rbi,bij,rbj->", dw, h.double(), dw),
                        torch.einsum("rbi,bij,rbj->", dw_max, h.double(), dw_max)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    assert got[1] != got[2]  # the two fake-quant images differ, so the test can tell them apart
    no_h = error_sums(w, fq, fq_max, None)
    assert torch.equal(no_h[3:], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(no_h[:3], want[:3], rtol=1e-5, atol=0.0)
