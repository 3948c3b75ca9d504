"""GPTQ for NVFP4: column-sequential quantization of one weight shard with Hessian-inverse error
compensation, in the exact numerics of :mod:`nvfp4_dist.numerics.nvfp4` (the inner loop's two
primitives, torch reference and Triton, are :mod:`.gptq_ops`).

Inputs: a shard ``w [rows, c]`` (some rows of the weight, and either all its input channels or,
row-parallel, the channels ``[offset, offset + c)``), the normalised full input Hessian
``H = X^T X / n`` (float64 ``[cin, cin]``) and the fused group's global amax g (unchanged by GPTQ).

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
     batch update, 16 rank-1 updates; grouped per span of ``LAZY_SPAN`` columns as
     :class:`.gptq_ops.LazyPropagation` does, without changing any element's updates or their
     order). With ``group`` timing a block's scale search, its sweep and the update of the rest
     of its span are one :func:`.gptq_ops.gptq_block_step` (one launch on the GPU); the loop has
     no host synchronisation.

Every update is an elementwise fp32 operation in a fixed order (no BLAS product, whose summation
order depends on the shapes), so a row's result never depends on the other rows of the shard:
a rank holding some rows of a weight (FSDP2, Megatron column-parallel) computes them bit for
bit as one process computing the whole weight does.

Column shards (Megatron row-parallel: input channels split over TP ranks, no rank holding the
whole weight): every rank holds the same full Hessian (its observer gathers the layer's whole
input), computes the same ``U`` and keeps its own columns of it. Rank r applies the scaled errors
of the columns before its shard, received from ranks 0 .. r-1 in column order, to its columns
(``offset``/``earlier``), sweeps them, and hands its own errors to the later ranks
(``keep_errors``). Each element receives the updates one process gives it, in one-process order,
so TP=1, 2, 4 ... agree bit for bit; the ranks run one after another on a weight (rank r's sweep
waits for rank r-1's errors), pipelined over the weights by the caller.

Memory of a rank at its peak (cin: the weight's input channels; rows x c: its local shard):
  * statistics: one full ``[cin, cin]`` float64 Hessian sum per statistics key (q/k/v share one,
    gate/up share one; one per expert and projection; a row-parallel rank holds the WHOLE
    ``cin x cin``, not its share) until the key's factor is taken (:class:`GPTQFactor`, once per
    key, the sum reduced to its diagonal 16x16 blocks on the way); the sequential mode
    (``gptq_sequential``) observes one layer group at a time, so one layer's sums at most;
  * per key, while it is factorised: the normalised Hessian, float64, factorised in place
    (:func:`gptq_factor` with ``consume``; cuSOLVER's Cholesky inverse takes one working copy:
    two ``[cin, cin]`` float64 matrices at most), then U's columns of the key's shards, ``[cin, c]``
    fp32, kept until the key's last weight is done;
  * per weight, during its GPTQ: the working copy and (row-parallel) the outgoing errors,
    ``[rows, c]`` fp32 each (Q only when asked for: ``keep_quant``); a ``[rows, 128]`` fp32
    lazy-update buffer; on rank r of a row-parallel group the incoming errors, r buffers
    ``[rows, c]`` fp32 (and its previous weight's outgoing errors until the later ranks have
    received them);
  * the weight shard itself, updated in place; never the whole weight of a sharded layer.

Output: ``W'`` (the pre-quantization values, in ``w.dtype``) with ``fake_quant(W', block_amax,
g) == Q`` exactly; storing ``W'`` in the parameter and ``block_amax`` as the state makes every
consumer of the state (fake-quant forward, checkpoints, exports) compute with GPTQ's Q.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CalibrationError
from ..numerics.constants import BLOCK_SIZE
from .dispatch import schur_floors, search_block_scales, triton_impl
from .gptq_ops import gptq_block_step, propagate
from .types import KernelImpl, Method


LAZY_SPAN = 128  # columns per lazy-update span (module docstring, step 4)


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ of one shard: ``weight`` W' (``w.dtype``), ``quant`` Q = fake_quant(W') (fp32),
    ``block_amax`` fp32 ``[rows, cin/16]``, ``dead`` input channels whose Hessian diagonal is 0
    (of this shard), ``errors`` the scaled errors ``[rows, c]`` fp32 when asked for."""

    weight: torch.Tensor = field(repr=False)
    quant: torch.Tensor = field(repr=False)
    block_amax: torch.Tensor = field(repr=False)
    dead: int = 0
    errors: torch.Tensor | None = field(default=None, repr=False)


def block_hessians(full: torch.Tensor) -> torch.Tensor:
    """The diagonal 16x16 blocks ``[cin/16, 16, 16]`` of a full ``[cin, cin]`` Hessian (fp32)."""
    nb = full.shape[0] // BLOCK_SIZE
    return full.reshape(nb, BLOCK_SIZE, nb, BLOCK_SIZE).diagonal(dim1=0, dim2=2).permute(2, 0, 1).float()


def _factor_in_place(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Overwrite the float64 Hessian ``h`` (column-major, see :func:`gptq_factor`) with the upper
    Cholesky factor of its damped inverse; returns the dead-channel mask.

    Dead channels (``H_jj == 0``) get a unit diagonal first, then ``damp * mean(diag)`` is added
    to the whole diagonal (the mean taken after the unit entries, as GPTQ does)."""
    diag = h.diagonal()
    dead = diag == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * diag.mean())
    info = torch.empty((), dtype=torch.int32, device=h.device)
    # in place: ``h`` has the column-major layout LAPACK/cuSOLVER write, so no copy is made
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:
        raise CalibrationError(
            f"GPTQ: the damped Hessian ({h.shape[0]} input channels) is not positive definite "
            f"(damp={damp}); raise gptq_damp (e.g. 0.1)")
    torch.cholesky_inverse(h, out=h)  # (CUDA takes one working copy of the factor here)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    if int(info) != 0:
        raise CalibrationError(f"GPTQ: the inverse Hessian lost positive definiteness in float64 "
                               f"(damp={damp}); raise gptq_damp (e.g. 0.1)")
    return dead


def column_major_f64(n: int, device=None) -> torch.Tensor:
    """An empty float64 ``[n, n]`` laid out column-major (the layout LAPACK/cuSOLVER factorise
    in place)."""
    return torch.empty_strided((n, n), (1, n), dtype=torch.float64, device=device)


def _column_major_copy(hessian: torch.Tensor, device=None) -> torch.Tensor:
    """A float64 copy of ``hessian`` (the same matrix), laid out column-major."""
    out = column_major_f64(hessian.shape[0], device=hessian.device if device is None else device)
    out.copy_(hessian)
    return out


def inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the damped ``H^-1`` (float64) and the bool mask
    of dead input channels (``H_jj == 0``, given a unit diagonal first, as GPTQ does)."""
    h = _column_major_copy(hessian)
    dead = _factor_in_place(h, damp)
    return h.contiguous(), dead  # row-major, as the sweep reads it


@dataclass(frozen=True)
class GPTQFactor:
    """What GPTQ needs of one statistics key's Hessian, computed once for all the weights that
    share it (q/k/v, gate/up): ``upper`` the columns ``[start, start + width)`` of U (fp32,
    row-major: the sweep reads rows of U), ``dead`` the bool mask of dead input channels (all
    ``cin``), ``blocks`` the diagonal 16x16 blocks of H on those columns (fp32, for the
    local-Hessian scale search)."""

    upper: torch.Tensor = field(repr=False)
    dead: torch.Tensor = field(repr=False)
    blocks: torch.Tensor = field(repr=False)
    start: int = 0

    @property
    def columns(self) -> tuple[int, int]:
        return self.start, self.start + self.upper.shape[1]


def gptq_factor(hessian: torch.Tensor, damp: float, *, columns: tuple[int, int] | None = None,
                consume: bool = False, device=None) -> GPTQFactor:
    """The :class:`GPTQFactor` of the normalised full Hessian ``hessian [cin, cin]``, for the
    shards whose input channels are ``columns`` (default: all).

    Memory: ``consume=True`` takes a float64 ``hessian`` laid out column-major
    (:func:`column_major_f64`) and factorises it in place, so the factorisation holds the one ``[cin, cin]``
    float64 matrix (plus cuSOLVER's working copy while the inverse is formed) instead of four;
    the fp32 columns of U are taken at the end. Without ``consume`` a copy is factorised.
    """
    cin = hessian.shape[0]
    start, stop = columns or (0, cin)
    if start % BLOCK_SIZE or stop % BLOCK_SIZE or not 0 <= start < stop <= cin:
        raise ValueError(f"GPTQ factor columns {columns} must be whole 16-column blocks of {cin}")
    blocks = block_hessians(hessian)[start // BLOCK_SIZE:stop // BLOCK_SIZE].to(device).contiguous()
    column_major = hessian.dtype == torch.float64 and hessian.mT.is_contiguous()
    h = hessian.to(device) if (consume and column_major) else _column_major_copy(hessian, device)
    del hessian  # consumed: the caller's reference is the only other one
    dead = _factor_in_place(h, damp)
    upper = torch.empty(cin, stop - start, dtype=torch.float32, device=h.device)
    upper.copy_(h[:, start:stop])
    del h
    return GPTQFactor(upper=upper, dead=dead, blocks=blocks, start=start)


def _scales(w: torch.Tensor, g: torch.Tensor, objective: Method, hessian, kernels) -> torch.Tensor:
    return search_block_scales(w, g, objective, hessian=hessian if objective is Method.LOCAL_HESSIAN else None,
                               kernels=kernels).block_amax


def _apply_earlier(work: torch.Tensor, earlier, u_cols: torch.Tensor, offset: int, kernels: KernelImpl) -> None:
    """Apply the scaled errors of the columns before ``offset`` to this shard's columns, block
    by block in column order: the updates one process makes to these columns, in its order."""
    expected = 0
    for start, err in earlier:
        if start != expected or err.shape[1] % BLOCK_SIZE or start + err.shape[1] > offset:
            raise ValueError(f"GPTQ: earlier errors must cover columns [0, {offset}) in order "
                             f"(got {err.shape[1]} columns at {start}, expected {expected})")
        err = err.to(device=work.device, dtype=torch.float32)
        # one pass over the chunk's errors in column order: per element, the per-block updates
        propagate(work, err, u_cols[start:start + err.shape[1]], kernels)
        expected = start + err.shape[1]
    if expected != offset:
        raise ValueError(f"GPTQ: earlier errors cover columns [0, {expected}), expected [0, {offset})")


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor | GPTQFactor, global_amax: torch.Tensor,
                  scales: Method = Method.MSE, timing: str = "group", damp: float = 0.01,
                  kernels: KernelImpl = KernelImpl.AUTO, *, offset: int = 0, earlier=(),
                  keep_errors: bool = False, keep_quant: bool = True) -> GPTQResult:
    """GPTQ of ``w [rows, c]``, the input channels ``[offset, offset + c)`` of a weight whose
    full Hessian is ``hessian [cin, cin]`` (see the module docstring); ``timing`` is ``"before"``
    or ``"group"``. ``hessian`` may instead be the key's :class:`GPTQFactor` (``damp`` is then
    the factor's), computed once for every weight sharing the Hessian.

    A shard that does not start at column 0 (row-parallel, ``offset > 0``) first takes the scaled
    errors of every earlier column from ``earlier``: an iterable of ``(start, err [rows, width])``
    in column order covering ``[0, offset)`` (consumed lazily, so the chunks may still be
    arriving). ``keep_errors``: return this shard's own scaled errors (``GPTQResult.errors``), for
    the shards after it. ``keep_quant=False``: no ``[rows, c]`` copy of Q is kept
    (``GPTQResult.quant`` is None; Q is ``fake_quant(W', block_amax, g)``).
    """
    rows, c = w.shape
    factor = hessian if isinstance(hessian, GPTQFactor) else None
    cin = factor.dead.shape[0] if factor is not None else hessian.shape[0]
    if (c % BLOCK_SIZE or offset % BLOCK_SIZE or offset + c > cin
            or (factor is None and hessian.shape != (cin, cin))):
        shape = "factor" if factor is not None else f"H {tuple(hessian.shape)}"
        raise ValueError(f"GPTQ needs whole 16-column blocks and a [cin, cin] Hessian covering the shard "
                         f"(w {tuple(w.shape)} at column {offset}, {shape})")
    timing = getattr(timing, "value", timing)
    if timing not in ("before", "group"):
        raise ValueError(f"timing must be 'before' or 'group', got {timing!r}")
    dtype, device = w.dtype, w.device
    g = global_amax.to(device=device, dtype=torch.float32)
    if factor is None:
        factor = gptq_factor(hessian, damp, device=device)
    # This shard's columns of U, every row (rows < offset carry the earlier columns' updates);
    # row-major (the factor's layout), so the steps read contiguous rows of U.
    if not factor.start <= offset <= offset + c <= factor.columns[1]:
        raise ValueError(f"GPTQ factor covers columns {factor.columns}, not the shard's [{offset}, {offset + c})")
    u = factor.upper[:, offset - factor.start:offset - factor.start + c].to(device)
    dead = factor.dead[offset:offset + c].to(device)
    work = w.detach().float().clone()
    work[:, dead] = 0.0
    bh = None
    if scales is Method.LOCAL_HESSIAN:
        first = (offset - factor.start) // BLOCK_SIZE
        bh = factor.blocks[first:first + c // BLOCK_SIZE].to(device)
    nb = c // BLOCK_SIZE
    if timing == "before":  # scales of the weight before any update, earlier shards' included
        block_amax = _scales(work.to(dtype), g, scales, bh, kernels).float()
    else:
        block_amax = torch.empty(rows, nb, dtype=torch.float32, device=device)
    if offset:
        _apply_earlier(work, earlier, u, offset, kernels)
    # Q per block: all of it, or one [rows, 16] scratch every step overwrites
    quant = torch.empty(rows, c if keep_quant else BLOCK_SIZE, dtype=torch.float32, device=device)
    errors = torch.empty(rows, c, dtype=torch.float32, device=device) if keep_errors else None
    own = u[offset:offset + c]  # [c, c]: this shard's rows and columns of U
    search = scales if timing == "group" else None
    floors = None
    if search is Method.LOCAL_HESSIAN and triton_impl(work, kernels) is not None:
        floors = schur_floors(bh, kernels)  # all blocks' pruning bounds in one launch
    # The lazy update's spans (gptq_ops.LazyPropagation, unrolled): a block's step updates the
    # rest of its span; the columns after a span take all its errors (``pending``) at its end.
    pending = torch.empty(rows, LAZY_SPAN, dtype=torch.float32, device=device)
    steps = []  # every view and argument of the loop, sliced once before it
    for b in range(nb):
        c0, c1 = b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE
        s0 = c0 - c0 % LAZY_SPAN
        s1 = min(s0 + LAZY_SPAN, c)
        far = None
        if c1 == s1 and s1 < c:
            far = (work[:, s1:], pending[:, :s1 - s0], own[s0:s1, s1:])
        steps.append((work[:, c0:s1], own[c0:c1, c0:s1], block_amax[:, b], None if bh is None else bh[b],
                      None if floors is None else floors[b], quant[:, c0:c1] if keep_quant else quant, pending[:, c0 - s0:c1 - s0],
                      None if errors is None else errors[:, c0:c1], far))
    for cols, u_rows, amax, h, floor, q, err, kept, far in steps:
        # one launch on the GPU: search (timing "group"), sweep, in-span update
        gptq_block_step(cols, u_rows, amax, g, dtype, search, h, floors=floor, quant=q, err=err, kernels=kernels)
        if kept is not None:
            kept.copy_(err)
        if far is not None:  # the span is done: its errors, in block order, to every column after it
            propagate(*far, kernels)
    return GPTQResult(weight=work.to(dtype), quant=quant if keep_quant else None, block_amax=block_amax,
                      dead=int(dead.sum()), errors=errors)
