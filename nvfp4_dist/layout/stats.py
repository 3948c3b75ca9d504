"""Input statistics of a weight (layout vocabulary): per-16-channel-block Hessians, token counts, input amax.

``H_b = sum_tokens x_b x_b^T`` is accumulated unnormalised in fp32 so that data-parallel ranks
can sum their partial Hessians and token counts; :meth:`InputStats.hessian` normalises by the
reduced token count afterwards. Each batch's fp32 sum is formed and added onto the running sum,
with the input amax, by :func:`~nvfp4_dist.kernels.dispatch.dense_input_stats` (one Triton
launch on the GPU; torch's batched products elsewhere); a NaN input counts as +inf in the amax.

``accum_dtype=torch.float64`` accumulates the same fp32 inputs in float64 instead (their
products are exact there), so the sum hardly depends on the order or the ranks the tokens
arrive in; :meth:`InputStats.hessian` rounds it to fp32 once. MoE expert adapters use it: an
expert's tokens arrive in a different order, on other ranks, at each expert-parallel size.

``full=True`` (GPTQ) accumulates the whole ``X^T X`` (``[cin, cin]``, always float64) instead of
its 16x16 diagonal blocks; :meth:`InputStats.hessian` still returns the per-block Hessians (the
diagonal blocks, for the block-scale searches and the report) and :meth:`InputStats.full_hessian`
the whole normalised matrix. A :class:`StatsStore` created with ``full_hessian=True`` makes every
statistics it creates full, so the adapters' observers need no change. The full matrix is rounded
to fp32 once after normalisation (and returned as float64 for the factorisation), like the
per-block Hessians: float64 sums of the same tokens added in another order (expert-parallel
dispatch, data-parallel partial sums) then give the same matrix unless a value straddles an fp32
rounding boundary.

A weight whose input channels are split over ranks (Megatron row-parallel under GPTQ) observes
its WHOLE input (its observer gathers the channels over the tensor-parallel group), so every rank
holds the full ``[cin, cin]`` Hessian with its cross terms; ``local_cols`` names this rank's
channels, and :meth:`InputStats.hessian` returns the diagonal blocks of those channels only (what
the block-scale searches and the report of the local shard read).

:meth:`InputStats.take_full_hessian` hands GPTQ the normalised full matrix (column-major, for an
in-place factorisation) and reduces the statistics to their (local) diagonal blocks at once, as
:meth:`InputStats.blocks_only` does for a copy: the float64 sum is freed before the factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.dispatch import dense_input_stats, expert_block_hessians
from ..kernels.reference import nan_as_inf
from ..kernels.types import KernelImpl
from ..numerics.constants import BLOCK_SIZE

# Tokens per chunk when forming a float64 or full Hessian, bounding the temporary to ~chunk * cin values.
_TOKEN_CHUNK = 4096
# Columns per step when a full Hessian is normalised (a [cin, 1024] float64 temporary at most).
_NORMALISE_COLUMNS = 1024


@dataclass
class InputStats:
    """Statistics of the inputs of one weight (or of one expert)."""

    cin: int
    with_hessian: bool
    hessian_sum: torch.Tensor | None = field(default=None, repr=False)  # [cin/16, 16, 16] fp32
    tokens: int = 0
    amax: torch.Tensor | None = field(default=None, repr=False)  # 0-d fp32
    accum_dtype: torch.dtype = torch.float32  # dtype of hessian_sum (see the module docstring)
    full: bool = False  # hessian_sum is the whole [cin, cin] X^T X (float64)
    local_cols: tuple[int, int] | None = None  # full stats of a channel-split weight: its channels

    def __post_init__(self):
        if self.full:
            self.accum_dtype = torch.float64

    def _zeros(self, device) -> torch.Tensor:
        if self.full:
            return torch.zeros(self.cin, self.cin, dtype=self.accum_dtype, device=device)
        nb = self.cin // BLOCK_SIZE
        return torch.zeros(nb, BLOCK_SIZE, BLOCK_SIZE, dtype=self.accum_dtype, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add tokens ``x [..., cin]`` (any float dtype)."""
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.cin:
            raise ValueError(f"observed input has {x.shape[-1]} channels, expected {self.cin}")
        if self.amax is None:
            self.amax = torch.zeros((), dtype=torch.float32, device=x.device)
        self.tokens += x.shape[0]
        if x.shape[0] == 0:
            return
        # fp32 block Hessians (dense layers): with the amax, one launch on the GPU, as the
        # observer's launches are host time the forward waits for
        blocks = self.with_hessian and not self.full and self.accum_dtype == torch.float32
        if blocks and self.hessian_sum is None:
            self.hessian_sum = self._zeros(x.device)
        dense_input_stats(x, self.amax, self.hessian_sum if blocks else None)
        if not self.with_hessian or blocks:
            return
        if self.hessian_sum is None:
            self.hessian_sum = self._zeros(x.device)
        for start in range(0, x.shape[0], _TOKEN_CHUNK):
            xb = x[start:start + _TOKEN_CHUNK].float().to(self.accum_dtype)
            if self.full:
                self.hessian_sum.addmm_(xb.T, xb)  # in place: no [cin, cin] product temporary
            else:  # float64: exact products, one batched product per chunk
                xb = xb.reshape(-1, self.cin // BLOCK_SIZE, BLOCK_SIZE).transpose(0, 1)
                self.hessian_sum += torch.bmm(xb.transpose(1, 2), xb)  # [nb, n, 16]^T @ [nb, n, 16]

    def hessian(self) -> torch.Tensor | None:
        """Normalised per-block Hessian ``H_b / tokens`` ``[cin/16, 16, 16]``, fp32 (None when
        no token was seen); for full statistics, the diagonal 16x16 blocks of the full one."""
        if self.hessian_sum is None or self.tokens == 0:
            return None
        h = self._local_blocks() if self.full else self.hessian_sum
        # a tensor divisor: CUDA divides by a Python number through its rounded reciprocal
        tokens = torch.tensor(float(self.tokens), dtype=h.dtype, device=h.device)
        return (h / tokens).float()

    def full_hessian(self) -> torch.Tensor | None:
        """Normalised full Hessian ``X^T X / tokens`` ``[cin, cin]``, float64 (None without
        full statistics or tokens)."""
        if not self.full or self.hessian_sum is None or self.tokens == 0:
            return None
        tokens = torch.tensor(float(self.tokens), dtype=self.hessian_sum.dtype, device=self.hessian_sum.device)
        # rounded to fp32 once (see the module docstring), float64 for the Cholesky factorisations
        return (self.hessian_sum / tokens).float().to(torch.float64)

    def take_full_hessian(self) -> torch.Tensor | None:
        """:meth:`full_hessian`, laid out column-major (what GPTQ factorises in place), with these
        statistics reduced to their (local) diagonal blocks on the way, as :meth:`blocks_only`:
        the float64 ``[cin, cin]`` sum is freed before the caller factorises, so the two never
        live together. None (and nothing changed) without full statistics or tokens."""
        if not self.full or self.hessian_sum is None or self.tokens == 0:
            return None
        total = self.hessian_sum
        tokens = torch.tensor(float(self.tokens), dtype=total.dtype, device=total.device)
        out = torch.empty_strided(total.shape, (1, total.shape[0]), dtype=torch.float64, device=total.device)
        # the same values as full_hessian(), a slice of columns at a time (small temporaries)
        for start in range(0, total.shape[1], _NORMALISE_COLUMNS):
            part = slice(start, start + _NORMALISE_COLUMNS)
            out[:, part] = (total[:, part] / tokens).float()
        self._drop_full()
        return out

    def _drop_full(self) -> None:
        """Become :meth:`blocks_only`'s statistics in place (the store keeps this object)."""
        reduced = self.blocks_only()
        self.cin, self.hessian_sum, self.full, self.local_cols = reduced.cin, reduced.hessian_sum, False, None

    def _local_blocks(self) -> torch.Tensor:
        """The diagonal 16x16 blocks of the full sum on this rank's channels ``[nb, 16, 16]``."""
        start, stop = self.local_cols or (0, self.cin)
        nb = self.cin // BLOCK_SIZE
        h = self.hessian_sum.reshape(nb, BLOCK_SIZE, nb, BLOCK_SIZE).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return h[start // BLOCK_SIZE: stop // BLOCK_SIZE]

    def blocks_only(self) -> "InputStats":
        """These statistics with a full Hessian replaced by its (local) diagonal blocks, kept as
        float64 sums (:meth:`hessian` returns the same values); self when not full."""
        if not self.full:
            return self
        start, stop = self.local_cols or (0, self.cin)
        blocks = None if self.hessian_sum is None else self._local_blocks().clone()
        return InputStats(cin=stop - start, with_hessian=self.with_hessian, hessian_sum=blocks,
                          tokens=self.tokens, amax=self.amax, accum_dtype=torch.float64)

    def ensure_allocated(self, device: torch.device) -> None:
        """Materialise zero statistics (a rank that saw no token still joins the reduce)."""
        if self.amax is None:
            self.amax = torch.zeros((), dtype=torch.float32, device=device)
        if self.with_hessian and self.hessian_sum is None:
            self.hessian_sum = self._zeros(device)


class StatsStore(dict):
    """stats_key -> InputStats. ``full_hessian``: the statistics it creates accumulate the whole
    ``X^T X`` (GPTQ) instead of its diagonal blocks."""

    def __init__(self, *args, full_hessian: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_hessian = full_hessian

    def get_or_create(self, key: str, cin: int, with_hessian: bool,
                      accum_dtype: torch.dtype = torch.float32) -> InputStats:
        if key not in self:
            self[key] = InputStats(cin=cin, with_hessian=with_hessian, accum_dtype=accum_dtype,
                                   full=with_hessian and self.full_hessian)
        return self[key]


class ExpertStats:
    """The statistics of one projection of E fused experts, accumulated together on the device.

    Each call of :meth:`update` takes the inputs of all experts at once, their rows grouped by
    expert: the token counts in one addition (of the offsets), the block Hessians and the input
    amaxes in one launch (:func:`~nvfp4_dist.kernels.dispatch.expert_block_hessians`: float64
    sums of exact products in row order, continued across calls, so an expert's sums do not
    depend on how its tokens were batched; a projection without Hessian takes its amaxes from a
    few tensor operations, the same values). Nothing waits for the device until :meth:`flush` writes the
    totals into the experts' own :class:`InputStats` (``members[e]``), whose Hessian sums are
    then views of the stacked ``[E, cin/16, 16, 16]`` sums: the same values as
    :meth:`InputStats.update` of each expert's rows with ``accum_dtype=torch.float64`` gives, up
    to the float64 rounding of its other summation order; an expert no token reached keeps
    ``hessian_sum=None`` and gets amax 0, as there.
    """

    def __init__(self, members: list[InputStats], kernels: KernelImpl = KernelImpl.AUTO):
        self.members = members
        self.kernels = kernels
        self.hessian_sum: torch.Tensor | None = None
        # the sum of the calls' offsets [E + 1] (int64): its differences are the token counts (a
        # sum of differences is the difference of the sums), one launch per call instead of two
        self.offset_sum: torch.Tensor | None = None
        self.amax: torch.Tensor | None = None  # [E] fp32

    def update(self, x: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor,
               rows: torch.Tensor | None = None) -> None:
        """Add rows ``x [N, cin]`` grouped by expert: expert e's are ``offsets[e]:offsets[e+1]``
        (int64 ``[E + 1]``); ``row_expert [N]`` names each row's expert (E: a row no expert takes,
        outside every range). With ``rows`` (int64 ``[N]``), ``x`` holds token rows and the
        grouped rows are ``x[rows]``, read through the index (never gathered into a copy)."""
        n_experts, cin = len(self.members), self.members[0].cin if self.members else 0
        x = x.detach()
        if x.shape[-1] != cin:
            raise ValueError(f"observed input has {x.shape[-1]} channels, expected {cin}")
        if self.amax is None:
            self.offset_sum = torch.zeros(n_experts + 1, dtype=torch.int64, device=x.device)
            self.amax = torch.zeros(n_experts, dtype=torch.float32, device=x.device)
        self.offset_sum += offsets.to(self.offset_sum.device)
        if not (x.shape[0] if rows is None else rows.shape[0]):
            return
        if self.members and self.members[0].with_hessian:
            if self.hessian_sum is None:
                self.hessian_sum = torch.zeros(n_experts, cin // BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE,
                                               dtype=torch.float64, device=x.device)
            # the amax too, from the values the Hessian kernel loads anyway (in place: a max of
            # the fp32-rounded values, NaN as +inf, exactly the value computed below)
            expert_block_hessians(x, offsets, self.hessian_sum, amax=self.amax, kernels=self.kernels, rows=rows)
            return
        # a NaN row counts as +inf: the MAX keeps it, and non-finite statistics are refused
        row_amax = nan_as_inf(x.abs().amax(dim=-1).float())
        if rows is not None:
            row_amax = row_amax[rows]  # each token's max once, then one value per grouped row
        amax = torch.zeros(n_experts + 1, dtype=torch.float32, device=x.device)
        amax.scatter_reduce_(0, row_expert.long(), row_amax, reduce="amax")
        self.amax = torch.maximum(self.amax, amax[:n_experts])

    def flush(self) -> None:
        """Write the totals into ``members`` (one wait for the device); nothing when no call came."""
        if self.amax is None:
            return
        bounds = self.offset_sum.tolist()
        tokens = [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]
        # views of one copy (no launch per expert; the Hessian kernel updates self.amax in place)
        amax = self.amax.clone().unbind(0)
        sums = self.hessian_sum.unbind(0) if self.hessian_sum is not None else [None] * len(self.members)
        for e, stats in enumerate(self.members):
            stats.tokens = tokens[e]
            stats.amax = amax[e]
            stats.hessian_sum = sums[e] if tokens[e] else None
