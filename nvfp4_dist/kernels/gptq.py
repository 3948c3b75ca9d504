"""GPTQ for NVFP4 (torch reference): column-sequential quantization of one weight shard with
Hessian-inverse error compensation, in the exact numerics of :mod:`nvfp4_dist.numerics.nvfp4`.

Inputs: a shard ``w [rows, cin]`` (whole input channels: GPTQ propagates errors along cin), the
normalised full input Hessian ``H = X^T X / n`` (float64 ``[cin, cin]``) and the fused group's
global amax g (unchanged by GPTQ).

Algorithm (Frantar et al. 2022, without activation ordering, which would break the 16-column
NVFP4 blocks):
  1. dead input channels (``H_jj == 0``): ``H_jj = 1`` and ``W[:, j] = 0``;
  2. damping: ``H += damp * mean(diag H) * I``; ``U`` = upper Cholesky factor of ``H^-1``
     (float64, then fp32 for the sweep);
  3. block scales (``timing``): ``before`` searches every block's scale on the weight before any
     update; ``group`` searches a block's scale on the updated weight when the sweep reaches it.
     The objective is ``mse`` or ``local_hessian`` (diagonal 16x16 blocks of H);
  4. sweep the columns in order, in their 16-column blocks: column j is rounded to the weight's
     dtype (the value the parameter will hold, ``W'_j``), quantized with its block's FP8 scale,
     and its scaled error ``e = (W'_j - Q_j) / U_jj`` updates the remaining columns of the block
     at once (``W_k -= e * U_jk``) and the columns after the block once the block is done (lazy
     batch update, 16 rank-1 updates).

Every update is an elementwise fp32 operation in a fixed order (no BLAS product, whose summation
order depends on the shapes), so a row's result never depends on the other rows of the shard:
a rank holding some rows of a weight (FSDP2, Megatron column-parallel) computes them bit for
bit as one process computing the whole weight does.

Output: ``W'`` (the pre-quantization values, in ``w.dtype``) with ``fake_quant(W', block_amax,
g) == Q`` exactly; storing ``W'`` in the parameter and ``block_amax`` as the state makes every
consumer of the state (fake-quant forward, checkpoints, exports) compute with GPTQ's Q.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CalibrationError
from ..numerics import nvfp4
from ..numerics.constants import BLOCK_SIZE
from .dispatch import search_block_scales
from .gptq_ops import propagate, sweep_block
from .types import KernelImpl, Method


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ of one shard: ``weight`` W' (``w.dtype``), ``quant`` Q = fake_quant(W') (fp32),
    ``block_amax`` fp32 ``[rows, cin/16]``, ``dead`` input channels whose Hessian diagonal is 0."""

    weight: torch.Tensor = field(repr=False)
    quant: torch.Tensor = field(repr=False)
    block_amax: torch.Tensor = field(repr=False)
    dead: int = 0


def block_hessians(full: torch.Tensor) -> torch.Tensor:
    """The diagonal 16x16 blocks ``[cin/16, 16, 16]`` of a full ``[cin, cin]`` Hessian (fp32)."""
    nb = full.shape[0] // BLOCK_SIZE
    return full.reshape(nb, BLOCK_SIZE, nb, BLOCK_SIZE).diagonal(dim1=0, dim2=2).permute(2, 0, 1).float()


def inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the damped ``H^-1`` (float64) and the bool mask
    of dead input channels (``H_jj == 0``, given a unit diagonal first, as GPTQ does)."""
    h = hessian.to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * diag.mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise CalibrationError(
            f"GPTQ: the damped Hessian ({h.shape[0]} input channels) is not positive definite "
            f"(damp={damp}); raise gptq_damp (e.g. 0.1)")
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise CalibrationError(f"GPTQ: the inverse Hessian lost positive definiteness in float64 "
                               f"(damp={damp}); raise gptq_damp (e.g. 0.1)")
    return upper, dead


def _scales(w: torch.Tensor, g: torch.Tensor, objective: Method, hessian, kernels) -> torch.Tensor:
    return search_block_scales(w, g, objective, hessian=hessian if objective is Method.LOCAL_HESSIAN else None,
                               kernels=kernels).block_amax


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, global_amax: torch.Tensor,
                  scales: Method = Method.MSE, timing: str = "group", damp: float = 0.01,
                  kernels: KernelImpl = KernelImpl.AUTO) -> GPTQResult:
    """GPTQ of ``w [rows, cin]`` under the full Hessian ``hessian [cin, cin]`` (see the module
    docstring); ``timing`` is ``"before"`` or ``"group"``."""
    rows, cin = w.shape
    if cin % BLOCK_SIZE or hessian.shape != (cin, cin):
        raise ValueError(f"GPTQ needs cin % 16 == 0 and a [cin, cin] Hessian (w {tuple(w.shape)}, "
                         f"H {tuple(hessian.shape)})")
    timing = getattr(timing, "value", timing)
    if timing not in ("before", "group"):
        raise ValueError(f"timing must be 'before' or 'group', got {timing!r}")
    dtype, device = w.dtype, w.device
    g = global_amax.to(device=device, dtype=torch.float32)
    s = nvfp4.global_scale(g)
    upper, dead = inverse_factor(hessian.to(device), damp)
    u = upper.float()
    work = w.detach().float().clone()
    work[:, dead] = 0.0
    bh = block_hessians(hessian.to(device)) if scales is Method.LOCAL_HESSIAN else None
    nb = cin // BLOCK_SIZE
    if timing == "before":
        block_amax = _scales(work.to(dtype), g, scales, bh, kernels).float()
    else:
        block_amax = torch.empty(rows, nb, dtype=torch.float32, device=device)
    quant = torch.empty(rows, cin, dtype=torch.float32, device=device)
    for b in range(nb):
        c0, c1 = b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE
        if timing == "group":
            cols = work[:, c0:c1].to(dtype)
            block_amax[:, b] = _scales(cols, g, scales, None if bh is None else bh[b:b + 1], kernels)[:, 0]
        v = nvfp4.scale_fp8(block_amax[:, b], g).float()
        block = work[:, c0:c1]  # a view: sweep_block updates work in place
        quant[:, c0:c1], err = sweep_block(block, u[c0:c1, c0:c1], v, s, dtype)
        if c1 < cin:
            propagate(work[:, c1:], err, u[c0:c1, c1:])
    return GPTQResult(weight=work.to(dtype), quant=quant, block_amax=block_amax, dead=int(dead.sum()))
