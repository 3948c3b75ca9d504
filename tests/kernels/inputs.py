"""Test inputs shared by the kernel tests: weights with zero, tiny and saturating blocks,
correlated-activation Hessians, and float64 losses of chosen candidates."""

from __future__ import annotations

import torch

from nvfp4_dist.kernels.candidates import CandidateTables, dss_errors
from nvfp4_dist.numerics import nvfp4

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def weight(rows: int, cin: int, kind: str, seed: int, dtype=torch.float32) -> torch.Tensor:
    """``[rows, cin]`` weight, N(0, 0.02^2) or Student-t(2.5) * 0.02, with a zero block, a tiny
    block and a block 40x larger than the rest (it saturates against :func:`global_amax`)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "gauss":
            w = torch.randn(rows, cin) * 0.02
        else:
            w = torch.distributions.StudentT(2.5).sample((rows, cin)) * 0.02
    w[0, :16] = 0.0
    if rows > 1 and cin >= 32:
        w[1, 16:32] = torch.linspace(-1e-6, 1e-6, 16)
    if rows > 2:
        w[2, -16:] *= 40.0
    return w.to(dtype)


def global_amax(w: torch.Tensor) -> torch.Tensor:
    """0.7 of max |w|: the big block saturates at the top code of every candidate."""
    return w.float().abs().amax() * 0.7


def hessian(cin: int, seed: int, noise: float = 0.3, tokens: int = 512) -> torch.Tensor:
    """``[cin // 16, 16, 16]`` from rank-2 correlated activations plus isotropic noise
    (``noise=0``: singular blocks, where no Schur bound holds)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(tokens, 2, generator=gen)
    x = f @ torch.randn(2, cin, generator=gen) + noise * torch.randn(tokens, cin, generator=gen)
    xb = x.reshape(tokens, cin // 16, 16)
    return torch.einsum("nbi,nbj->bij", xb, xb) / tokens


def loss64(w: torch.Tensor, g: torch.Tensor, candidate: torch.Tensor, h: torch.Tensor,
           beta: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``dw^T H dw`` per block for the spec's errors of (candidate, beta) choices."""
    tables = CandidateTables(g.cpu(), torch.device("cpu"))
    wb = nvfp4.blocks(w.float().cpu())
    beta = torch.ones(candidate.shape) if beta is None else beta.float().cpu()
    dw = dss_errors(wb, candidate.cpu(), beta, tables).double()
    return torch.einsum("rbi,bij,rbj->rb", dw, h.double().cpu(), dw)


def hessian_scale(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``|w|^T |H| |w|`` per block (float64): the scale of a block's Hessian-loss rounding."""
    a = nvfp4.blocks(w.double().cpu()).abs()
    return torch.einsum("rbi,bij,rbj->rb", a, h.double().abs().cpu(), a)
