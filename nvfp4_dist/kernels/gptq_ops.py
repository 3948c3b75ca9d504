"""GPTQ's inner-loop primitives (torch reference; the semantics any faster version must
reproduce bit for bit).

The sweep and the update are elementwise fp32 in a fixed order, so a row's result never depends on the other rows
(a rank holding some rows computes them exactly as one process holding all rows does):

* :func:`sweep_block`: one 16-column NVFP4 block, column by column. Column k is rounded to the
  weight's dtype (the value the parameter will hold), quantized with the block's FP8 scale, and
  its scaled error ``e_k = (x_k - q_k) / U_kk`` updates the block's later columns
  (``x_j -= e_k * U_kj``, j > k).
* :func:`sweep_block_from_amax`: the same sweep with the block's scales given by their block
  amaxes and the global amax (``nvfp4.scale_fp8`` / ``nvfp4.global_scale`` done inside the one
  launch instead of as separate torch operations per block).
* :func:`gptq_block_step`: one whole block step of the sweep, defined as the composition of
  the functions above and the scale search: optionally the block's scale search on its
  dtype-rounded values (:func:`.dispatch.search_block_scales`, ``mse`` or ``local_hessian``
  with the block's 16x16 Hessian; the found amax is written to ``block_amax``), then
  :func:`sweep_block_from_amax`, then :func:`propagate` of its errors into the rest of the
  block's span. The Triton version does it all in one launch and equals the Triton launches it
  replaces bit for bit (and this reference for ``mse`` and fixed scales; the Triton
  local-Hessian losses, on tensor cores, equal the reference's to fp32 rounding only).
* :func:`propagate`: the lazy update of the columns after a block by its 16 scaled errors,
  ``rest -= e_k * U_k,rest`` for k = 0..15 in that order (a product rounded to fp32, then a
  subtraction rounded to fp32: no fused multiply-add, no BLAS reduction). Any number K of
  errors is accepted (k = 0..K-1 in order): the errors of several consecutive blocks, in block
  order, give each element exactly the updates, in exactly the order, that one call per block
  gives it.
* :class:`LazyPropagation`: the two-level form of the per-block update. A block's errors update
  the later columns of its span (``span`` columns, 128 by default) at once; the columns after
  the span receive all the span's errors in one :func:`propagate` pass when its last block is
  done. Each element still sees every block's 16 updates in block order, so the result equals
  one ``propagate(work[:, c1:], err, u[c0:c1, c1:])`` per block bit for bit, while the far
  columns are read and written once per span instead of once per block (the memory traffic of
  the per-block update dominates for large cin).

``kernels`` selects the implementation (:class:`.types.KernelImpl`): AUTO runs the Triton
kernels of :mod:`.gptq_kernel` on CUDA tensors (bit-exact, launched without FMA contraction)
and this torch reference elsewhere.
"""

from __future__ import annotations

import torch

from ..numerics import nvfp4
from ..numerics.constants import BLOCK_SIZE, E2M1_VALUES
from .dispatch import search_block_scales, triton_impl
from .types import KernelImpl, Method

SWEEP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_column(x: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of one column ``x [rows]`` (fp32) whose elements sit in blocks
    with FP8 scale values ``scale [rows]`` (fp32): the operations of :func:`nvfp4.encode` and
    :func:`nvfp4.decode`, element by element."""
    d = scale * global_scale  # decode scale fl(v * S)
    code = nvfp4.e2m1_code_magnitude(x.abs(), d)
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    value = (grid[code.long()] * scale) * global_scale
    return torch.where(x < 0, -value, value)


def sweep_block(block: torch.Tensor, u_block: torch.Tensor, scale: torch.Tensor,
                global_scale: torch.Tensor, dtype: torch.dtype,
                kernels: KernelImpl = KernelImpl.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one block in place.

    ``block [rows, 16]`` fp32 (updated: column k becomes its dtype-rounded value before it is
    quantized), ``u_block [16, 16]`` fp32 (the block's diagonal block of the upper Cholesky
    factor of H^-1), ``scale [rows]`` fp32 FP8 scale values, ``global_scale`` fp32 0-d.
    Returns ``(quant [rows, 16], err [rows, 16])``, both fp32.
    """
    if block.dtype != torch.float32 or block.dim() != 2 or block.shape[1] != BLOCK_SIZE or dtype not in SWEEP_DTYPES:
        raise ValueError(f"sweep_block needs an fp32 [rows, 16] block and a weight dtype in {SWEEP_DTYPES} "
                         f"(got {block.dtype} {tuple(block.shape)}, dtype {dtype})")
    impl = triton_impl(block, kernels)
    if impl is not None:
        return impl.gptq_sweep_block(block, u_block, scale, global_scale, dtype)
    rows = block.shape[0]
    quant = torch.empty(rows, BLOCK_SIZE, dtype=torch.float32, device=block.device)
    err = torch.empty(rows, BLOCK_SIZE, dtype=torch.float32, device=block.device)
    for k in range(BLOCK_SIZE):
        x = block[:, k].to(dtype).float()
        block[:, k] = x
        q = quantize_column(x, scale, global_scale)
        quant[:, k] = q
        e = (x - q) / u_block[k, k]
        err[:, k] = e
        if k + 1 < BLOCK_SIZE:
            block[:, k + 1:] -= e[:, None] * u_block[k, k + 1:][None, :]
    return quant, err


def sweep_block_from_amax(block: torch.Tensor, u_block: torch.Tensor, block_amax: torch.Tensor,
                          global_amax: torch.Tensor, dtype: torch.dtype,
                          kernels: KernelImpl = KernelImpl.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sweep_block` with the block's scales given by their amaxes: ``block_amax [rows]``
    fp32 (any stride, e.g. a column of the ``[rows, cin / 16]`` state) and the global amax
    ``global_amax`` (fp32 0-d); the scale values ``nvfp4.scale_fp8(block_amax, g)`` and the
    global scale ``nvfp4.global_scale(g)`` are computed inside the one launch (the same bits)."""
    impl = triton_impl(block, kernels)
    if impl is not None and block.dtype == torch.float32 and dtype in SWEEP_DTYPES:
        return impl.gptq_sweep_block(block, u_block, block_amax, global_amax, dtype, from_amax=True)
    g = global_amax.to(device=block.device, dtype=torch.float32)
    scale = nvfp4.scale_fp8(block_amax.to(block.device), g).float()
    return sweep_block(block, u_block, scale, nvfp4.global_scale(g), dtype, KernelImpl.TORCH)


def gptq_block_step(cols: torch.Tensor, u_rows: torch.Tensor, block_amax: torch.Tensor,
                    global_amax: torch.Tensor, dtype: torch.dtype, search: Method | None = None,
                    hessian: torch.Tensor | None = None, *, floors: torch.Tensor | None = None,
                    quant: torch.Tensor | None = None, err: torch.Tensor | None = None,
                    kernels: KernelImpl = KernelImpl.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of the sweep, in place (module docstring).

    ``cols [rows, 16 + n]`` fp32: the block's 16 columns then the ``n`` later columns of its lazy
    span (a view of the working weight: both are updated); ``u_rows [16, 16 + n]``: the block's
    rows of U over the same columns; ``block_amax [rows]`` fp32 on cols' device (any stride, e.g.
    a column of the ``[rows, cin / 16]`` state): read when ``search`` is None, else overwritten
    with the searched amax; ``global_amax`` fp32 one value; ``hessian [16, 16]`` fp32 (the
    block's diagonal block of H, local_hessian only) and ``floors`` its Schur floors ``[16]``
    when already computed (a speed hint: they only prune candidates). ``quant`` / ``err``
    ``[rows, 16]`` fp32 outputs (views allowed), allocated when None. Returns ``(quant, err)``.
    """
    search = None if search is None else Method(search)
    rows, width = cols.shape if cols.dim() == 2 else (0, 0)
    if (cols.dtype != torch.float32 or cols.dim() != 2 or width < BLOCK_SIZE or dtype not in SWEEP_DTYPES
            or tuple(u_rows.shape) != (BLOCK_SIZE, width) or block_amax.shape != (rows,)
            or block_amax.dtype != torch.float32 or block_amax.device != cols.device):
        raise ValueError(f"gptq_block_step needs fp32 cols [rows, 16 + n], u_rows [16, 16 + n], fp32 block_amax "
                         f"[rows] on cols' device and a weight dtype in {SWEEP_DTYPES} (got cols {cols.dtype} "
                         f"{tuple(cols.shape)}, u_rows {tuple(u_rows.shape)}, block_amax {block_amax.dtype} "
                         f"{tuple(block_amax.shape)}, dtype {dtype})")
    if search not in (None, Method.MSE, Method.LOCAL_HESSIAN):
        raise ValueError(f"gptq_block_step searches by mse or local_hessian, not {search.value!r}")
    if search is Method.LOCAL_HESSIAN and (hessian is None or hessian.numel() != BLOCK_SIZE * BLOCK_SIZE):
        raise ValueError("gptq_block_step: the local_hessian search needs the block's [16, 16] hessian")
    dev = cols.device
    quant = torch.empty(rows, BLOCK_SIZE, dtype=torch.float32, device=dev) if quant is None else quant
    err = torch.empty(rows, BLOCK_SIZE, dtype=torch.float32, device=dev) if err is None else err
    g = global_amax.to(device=dev, dtype=torch.float32)
    impl = triton_impl(cols, kernels)
    if impl is not None:
        if hessian is not None:
            hessian = hessian.to(device=dev, dtype=torch.float32).reshape(BLOCK_SIZE, BLOCK_SIZE).contiguous()
        if floors is not None:
            floors = floors.to(device=dev, dtype=torch.float32).contiguous()
        outs = [t if t.stride(-1) == 1 else torch.empty_like(t, memory_format=torch.contiguous_format)
                for t in (cols, quant, err)]
        if outs[0] is not cols:
            outs[0].copy_(cols)
        u_rows = u_rows.to(device=dev, dtype=torch.float32)
        u_rows = u_rows if u_rows.stride(-1) == 1 else u_rows.contiguous()
        impl.gptq_block_step(outs[0], u_rows, block_amax, g,
                             dtype, None if search is None else search.value,
                             hessian if search is Method.LOCAL_HESSIAN else None, floors, outs[1], outs[2])
        for target, out in zip((cols, quant, err), outs):
            if out is not target:
                target.copy_(out)
        return quant, err
    block = cols[:, :BLOCK_SIZE]
    if search is not None:
        h = None if search is Method.MSE else hessian.to(device=dev, dtype=torch.float32).reshape(1, 16, 16)
        # the search sees the block as the parameter would hold it now: rounded to its dtype
        block_amax.copy_(search_block_scales(block.to(dtype), g, search, hessian=h,
                                             kernels=KernelImpl.TORCH).block_amax[:, 0])
    q, e = sweep_block_from_amax(block, u_rows[:, :BLOCK_SIZE], block_amax, g, dtype, KernelImpl.TORCH)
    if width > BLOCK_SIZE:
        propagate(cols[:, BLOCK_SIZE:], e, u_rows[:, BLOCK_SIZE:], KernelImpl.TORCH)
    quant.copy_(q)
    err.copy_(e)
    return quant, err


def propagate(rest: torch.Tensor, err: torch.Tensor, u_rows: torch.Tensor,
              kernels: KernelImpl = KernelImpl.AUTO) -> None:
    """``rest [rows, n] -= err[:, k] * u_rows[k]`` for k = 0..K-1 in order, in place (fp32).
    ``err [rows, K]`` (K = 16: one block), ``u_rows [K, n]``: the blocks' rows of U restricted to
    ``rest``'s columns."""
    if rest.dtype != torch.float32 or err.shape[0] != rest.shape[0] or u_rows.shape != (err.shape[1], rest.shape[1]):
        raise ValueError(f"propagate needs fp32 rest [rows, n], err [rows, K], u_rows [K, n] (got rest "
                         f"{rest.dtype} {tuple(rest.shape)}, err {tuple(err.shape)}, u_rows {tuple(u_rows.shape)})")
    impl = triton_impl(rest, kernels)
    if impl is not None:
        impl.gptq_propagate(rest, err, u_rows)
        return
    for k in range(err.shape[1]):
        rest -= err[:, k:k + 1] * u_rows[k][None, :]


class LazyPropagation:
    """The two-level lazy update of one sweep (module docstring): call :meth:`push` after each
    block's :func:`sweep_block`, in block order, with the block's first column and its errors.

    ``work [rows, cin]`` fp32 (updated in place), ``u [cin, cin]`` the factor the sweep uses;
    ``span``: columns per span, a multiple of 16 (memory: one ``[rows, span]`` fp32 buffer).
    """

    def __init__(self, work: torch.Tensor, u: torch.Tensor, span: int = 128,
                 kernels: KernelImpl = KernelImpl.AUTO):
        if span <= 0 or span % BLOCK_SIZE:
            raise ValueError(f"LazyPropagation span={span} must be a positive multiple of {BLOCK_SIZE}")
        self.work, self.u, self.span, self.kernels = work, u, span, kernels
        self.pending = torch.empty(work.shape[0], span, dtype=torch.float32, device=work.device)
        self.next = 0  # first column of the block expected next

    def push(self, c0: int, err: torch.Tensor) -> None:
        """Apply the errors ``err [rows, 16]`` of the block at columns ``c0 .. c0 + 15``."""
        if c0 != self.next:
            raise ValueError(f"LazyPropagation.push: blocks must come in order (expected column "
                             f"{self.next}, got {c0})")
        cin = self.work.shape[1]
        c1 = c0 + BLOCK_SIZE
        s0 = c0 - c0 % self.span
        s1 = min(s0 + self.span, cin)
        self.next = c1
        if c1 < s1:  # the rest of the span: at once, the next block needs it
            propagate(self.work[:, c1:s1], err, self.u[c0:c1, c1:s1], self.kernels)
        if s1 < cin:
            self.pending[:, c0 - s0:c1 - s0] = err
            if c1 == s1:  # the span is done: its errors, in block order, to every column after it
                propagate(self.work[:, s1:], self.pending[:, :s1 - s0], self.u[s0:s1, s1:], self.kernels)
