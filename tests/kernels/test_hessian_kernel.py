"""Triton Hessian sweep and DSS are loss-exact against the reference.

Criterion (float64 losses of the spec's errors): the kernel's choice has a loss at most
``HESSIAN_REL_TOL * |w|^T |H| |w|`` above the reference's choice on every block, and its
reported loss is its choice's loss to the same tolerance. The kernel computes ``H dw`` as
``H w - S H (e2m1 v)`` on tensor cores in another summation order, so equal losses may round
apart by a few ulps of that scale; a wrong code, scale or candidate moves a loss by ~1e-3 of it.
"""

import pytest
import torch

from inputs import DTYPES, global_amax, hessian, hessian_scale, loss64, weight
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels import dss_kernel, hessian_kernel, triton_ops
from nvfp4_dist.kernels.hessian_kernel import HESSIAN_REL_TOL
from nvfp4_dist.numerics import nvfp4


def _assert_loss_exact(w, g, h, got, ref, where=None):
    """``where``: blocks to compare (DSS: those whose coupled optimum agrees, since a DSS
    neighbourhood is centred on it and fp32 near-ties may centre it elsewhere)."""
    scale = hessian_scale(w, h)
    chosen = loss64(w, g, got.candidate, h, got.dss_beta)
    best = loss64(w, g, ref.candidate, h, ref.dss_beta)
    ok = chosen <= best + HESSIAN_REL_TOL * scale
    assert torch.all(ok if where is None else ok[where])
    assert torch.all((got.loss.double().cpu() - chosen).abs() <= HESSIAN_REL_TOL * scale)
    assert (got.candidate.cpu() == ref.candidate).double().mean() > 0.95


@pytest.mark.parametrize("dtype,kind,noise", [(torch.float32, "heavy", 0.3), (torch.bfloat16, "heavy", 0.3),
                                              (torch.float16, "gauss", 0.3), (torch.float32, "gauss", 0.0)],
                         ids=["fp32", "bf16", "fp16", "singular-H"])
def test_hessian_sweep_is_loss_exact(dtype, kind, noise, device):
    w = weight(70, 32, kind, seed=31, dtype=dtype)  # 70 rows: one full and one partial tile
    g = global_amax(w)
    h = hessian(32, seed=7, noise=noise)
    got = triton_ops.search_local_hessian(w.to(device), g.to(device), h.to(device))
    _assert_loss_exact(w, g, h, got, R.search_local_hessian(w, g, h))


@pytest.mark.parametrize("dtype,shape,noise,betas", [
    (torch.float32, (40, 32), 0.3, R.beta_grid(0.5, 1.5, 0.25)),
    (torch.bfloat16, (40, 32), 0.3, torch.tensor([0.6, 0.9, 1.0, 1.25])),
    (torch.float16, (130, 48), 0.0, torch.tensor([0.55, 1.1, 1.45]))],
    ids=["fp32-4-betas", "bf16-3-betas", "fp16-singular-H"])
def test_dss_is_loss_exact_and_never_worse(dtype, shape, noise, betas, device):
    """Grids with and without 1.0 (which search_dss skips: the coupled candidates); 130 rows:
    two full tiles and a partial one."""
    w = weight(*shape, "heavy", seed=32, dtype=dtype)
    g = global_amax(w)
    h = hessian(shape[1], seed=8, noise=noise)
    got = triton_ops.search_dss(w.to(device), g.to(device), h.to(device), betas)
    ref = R.search_dss(w, g, h, betas)
    coupled = triton_ops.search_local_hessian(w.to(device), g.to(device), h.to(device))
    same_start = coupled.candidate.cpu() == R.search_local_hessian(w, g, h).candidate
    _assert_loss_exact(w, g, h, got, ref, where=same_start)
    assert torch.all(got.loss <= coupled.loss)
    assert torch.all(torch.isin(got.dss_beta.cpu(), torch.cat([betas, torch.ones(1)])))


def test_bf16_pairs_give_the_fp32_chains_choices_bit_for_bit(device):
    """bf16 weights take the two-elements-per-instruction code chain (tl_bf16x2); the same values
    as fp32 take the element-wise one. Both select the same e2m1 * v, so candidates, betas and
    losses are identical, including rows of zeros, -0.0, a partial tile and an odd-aligned view
    (which falls back to the element-wise chain)."""
    w = weight(66, 32, "heavy", seed=33, dtype=torch.bfloat16)
    w[3] = 0.0
    w[4, :16] = -0.0
    g, h = global_amax(w), hessian(32, seed=10)
    betas = R.beta_grid(0.5, 1.5, 0.25)
    odd = torch.zeros(66 * 32 + 1, dtype=torch.bfloat16, device=device)[1:].view(66, 32)
    odd.copy_(w)
    args = (g.to(device), h.to(device))
    for search in (triton_ops.search_local_hessian, lambda x, *a: triton_ops.search_dss(x, *a, betas)):
        ref = search(w.float().to(device), *args)
        for got in (search(w.to(device), *args), search(odd, *args)):
            assert torch.equal(got.candidate, ref.candidate)
            assert torch.equal(got.loss, ref.loss)
            assert (got.dss_beta is None) == (ref.dss_beta is None)
            if got.dss_beta is not None:
                assert torch.equal(got.dss_beta, ref.dss_beta)


def test_dss_full_range_thresholds_give_the_same_choices(device):
    """Weights whose quant scales could overflow the fast thresholds' exponent steps take seven
    products per quant scale; forced on ordinary weights, the choices are the same bits."""
    w = weight(70, 32, "heavy", seed=34, dtype=torch.bfloat16).to(device)
    g, h = global_amax(w).to(device), hessian(32, seed=11).to(device)
    w2, _, s = triton_ops._prepare(w, g)
    h2, kappa = triton_ops._hessian_inputs(w2, h)
    values = triton_ops._values(w2.device)
    k, loss = hessian_kernel.launch_hessian_sweep(w2, h2, kappa, s, values)
    betas = R.beta_grid(0.5, 1.5, 0.1)
    fast = (k.clone(), loss.clone())
    full = (k.clone(), loss.clone())
    beta_fast = dss_kernel.launch_dss_search(w2, h2, s, values, betas, *fast)
    beta_full = dss_kernel.launch_dss_search(w2, h2, s, values, betas, *full, fast_q_limit=0.0)
    assert torch.equal(beta_fast, beta_full) and torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1])
    assert (beta_fast != 1.0).any()  # DSS moved some blocks: the comparison saw codes at work


def test_dss_moves_only_blocks_whose_quantized_weight_changes(device):
    """A beta whose codes are the coupled ones gives the same quantized weight and the same loss:
    it must not win by the rounding of the kernel's loss form against the sweep's."""
    w = weight(64, 64, "gauss", seed=35, dtype=torch.bfloat16)
    g, h = global_amax(w), hessian(64, seed=12)
    args = (w.to(device), g.to(device), h.to(device))
    dss = triton_ops.search_dss(*args, R.beta_grid(0.5, 1.5, 0.1))
    coupled = triton_ops.search_local_hessian(*args)
    moved = (dss.dss_beta.cpu() != 1.0) | (dss.candidate.cpu() != coupled.candidate.cpu())
    fq_dss = nvfp4.fake_quant(w, dss.block_amax.cpu(), g, dss.dss_beta.cpu())
    fq_coupled = nvfp4.fake_quant(w, coupled.block_amax.cpu(), g)
    changed = (nvfp4.blocks(fq_dss.float()) != nvfp4.blocks(fq_coupled.float())).any(-1)
    assert moved.any()
    assert torch.equal(changed, moved)
