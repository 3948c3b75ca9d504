"""The Triton Schur floors agree with the torch formulation and stay valid lower bounds."""

import pytest
import torch

from nvfp4_dist.kernels.floor_kernel import launch_schur_floor
from nvfp4_dist.kernels.windows import schur_floor

from inputs import hessian


def awkward_hessians() -> torch.Tensor:
    """Well-conditioned blocks beside every kind the floors must refuse (kappa = 0)."""
    h = hessian(16 * 40, seed=5)
    gen = torch.Generator().manual_seed(6)
    h[3] = 0.0  # zero (dead input channels)
    h[4] = -h[4]  # negative definite
    h[5, 0, 0] = float("nan")
    h[6] = 1.0  # rank one
    e = torch.randn(16, 16, generator=gen)
    h[7] = e + e.T  # indefinite
    h[8] = torch.diag(torch.logspace(0, -7, 16))  # condition 1e7: past the 2^19 the floors accept
    h[9] = torch.diag(torch.logspace(0, -5, 16))  # condition 1e5: accepted
    h[10] = h[10] + 0.3 * torch.randn(16, 16, generator=gen)  # not symmetric
    h[11, 2, 2] = float("inf")
    return h


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on nan/inf blocks
def test_floors_match_the_torch_formulation(device):
    h = awkward_hessians()
    got = launch_schur_floor(h.to(device)).cpu()
    ref = schur_floor(h)
    assert torch.equal(got == 0, ref == 0)
    assert (ref[:3] > 0).all() and (ref[9] > 0).all() and (ref[12:] > 0).all()
    assert (ref[3:9] == 0).all() and (ref[11] == 0).all()
    live = ref > 0
    torch.testing.assert_close(got[live], ref[live], rtol=1e-9, atol=0.0)


def test_floors_bound_every_quadratic_form(device):
    """kappa_j dw_j^2 <= dw^T H dw for random dw, each block and entry (the pruning's premise)."""
    h = hessian(16 * 24, seed=8, noise=0.05)
    kappa = launch_schur_floor(h.to(device)).cpu().double()
    assert (kappa > 0).all()
    dw = torch.randn(4096, 24, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    form = torch.einsum("nbi,bij,nbj->nb", dw, h.double(), dw)
    assert ((kappa * dw * dw).amax(-1) <= form).all()


def test_empty_hessian(device):
    assert launch_schur_floor(torch.zeros(0, 16, 16, device=device)).shape == (0, 16)
