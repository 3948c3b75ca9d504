"""The kernel checks on a CUDA device at sizes the interpreter cannot reach (skipped without
one): bit-exact MSE sweep, fake-quant and cast/pack; loss-exact Hessian sweep and DSS; launches
on the tensor's own device; a straight-through gradient around the fake-quant image.

The reference runs on the CPU: CUDA torch divides by Python scalars through a rounded
reciprocal, so numerics' scale helpers are not correctly rounded there; the kernels are."""

import pytest
import torch

from inputs import global_amax, hessian, hessian_scale, loss64, weight
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels import triton_ops
from nvfp4_dist.kernels.dispatch import fake_quant_weight, search_block_scales
from nvfp4_dist.kernels.hessian_kernel import HESSIAN_REL_TOL
from nvfp4_dist.kernels.types import Method
from nvfp4_dist.numerics import nvfp4

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mse_sweep_bit_exact_large(kind, dtype):
    w = weight(1536, 4096, kind, seed=51, dtype=dtype)
    g = global_amax(w)
    got = search_block_scales(w.cuda(), g.cuda(), Method.MSE)  # auto: Triton on CUDA
    ref = R.search_mse(w, g)
    assert torch.equal(got.candidate.cpu(), ref.candidate)
    assert torch.equal(got.loss.cpu(), ref.loss)
    assert torch.equal(got.block_amax.cpu(), ref.block_amax)


def test_hessian_and_dss_loss_exact_large():
    w = weight(640, 1024, "heavy", seed=52, dtype=torch.bfloat16)
    g = global_amax(w)
    h = hessian(1024, seed=9)
    coupled = triton_ops.search_local_hessian(w.cuda(), g.cuda(), h.cuda())
    ref_coupled = R.search_local_hessian(w, g, h)
    same_start = coupled.candidate.cpu() == ref_coupled.candidate
    assert same_start.double().mean() > 0.99
    dss = triton_ops.search_dss(w.cuda(), g.cuda(), h.cuda())
    for got, ref, where in ((coupled, ref_coupled, torch.ones_like(same_start)),
                            (dss, R.search_dss(w, g, h), same_start)):
        scale = hessian_scale(w, h)
        chosen = loss64(w, g, got.candidate.cpu(), h, None if got.dss_beta is None else got.dss_beta.cpu())
        best = loss64(w, g, ref.candidate, h, ref.dss_beta)
        assert torch.all((chosen <= best + HESSIAN_REL_TOL * scale)[where])
    assert torch.all(dss.loss <= coupled.loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fake_quant_and_pack_bit_exact_large(dtype):
    w = weight(2048, 4096, "heavy", seed=53, dtype=dtype)
    g = global_amax(w)
    bamax = nvfp4.block_amax(w) * 0.9
    beta = torch.rand(bamax.shape) + 0.5
    cuda = [t.cuda() for t in (w, bamax, g, beta)]
    for b, b_cuda in ((None, None), (beta, cuda[3])):
        fq = triton_ops.fake_quant(*cuda[:3], b_cuda)
        ref = nvfp4.fake_quant(w, bamax, g, b)
        assert torch.equal(fq.float().view(torch.int32).cpu(), ref.float().view(torch.int32))
        packed, scale = triton_ops.quantize_pack(*cuda[:3], b_cuda)
        ref_packed, ref_scale = R.quantize_pack(w, bamax, g, b)
        assert torch.equal(packed.cpu(), ref_packed)
        assert torch.equal(scale.view(torch.uint8).cpu(), ref_scale.view(torch.uint8))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device():
    w = weight(256, 512, "gauss", seed=54, dtype=torch.bfloat16)
    g = global_amax(w)
    on0 = triton_ops.search_mse(w.to("cuda:0"), g)
    with torch.cuda.device(0):  # the current device is not the tensor's
        on1 = triton_ops.search_mse(w.to("cuda:1"), g)
        fq1 = triton_ops.fake_quant(w.to("cuda:1"), on1.block_amax, g)
    assert on1.candidate.device == torch.device("cuda:1")
    assert torch.equal(on0.candidate.cpu(), on1.candidate.cpu())
    assert torch.equal(fq1.cpu(), nvfp4.fake_quant(w, on1.block_amax.cpu(), g))


def test_straight_through_gradient_around_fake_quant():
    w = weight(64, 128, "gauss", seed=55).cuda().requires_grad_()
    x = torch.randn(8, 128, device="cuda")
    g = global_amax(w.detach())
    bamax = nvfp4.block_amax(w.detach())
    with torch.no_grad():
        assert torch.equal(fake_quant_weight(w, bamax, g), nvfp4.fake_quant(w.detach(), bamax, g))
    fq = fake_quant_weight(w.detach(), bamax, g)
    (x @ (w + (fq - w).detach()).t()).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(64, -1))  # d/dw of the plain linear
