"""Input statistics of a weight (layout vocabulary): per-16-channel-block Hessians, token counts, input amax.

``H_b = sum_tokens x_b x_b^T`` is accumulated unnormalised in fp32 so that data-parallel ranks
can sum their partial Hessians and token counts; :meth:`InputStats.hessian` normalises by the
reduced token count afterwards.

``accum_dtype=torch.float64`` accumulates the same fp32 inputs in float64 instead (their
products are exact there), so the sum hardly depends on the order or the ranks the tokens
arrive in; :meth:`InputStats.hessian` rounds it to fp32 once. MoE expert adapters use it: an
expert's tokens arrive in a different order, on other ranks, at each expert-parallel size.

``full=True`` (GPTQ) accumulates the whole ``X^T X`` (``[cin, cin]``, always float64) instead of
its 16x16 diagonal blocks; :meth:`InputStats.hessian` still returns the per-block Hessians (the
diagonal blocks, for the block-scale searches and the report) and :meth:`InputStats.full_hessian`
the whole normalised matrix. A :class:`StatsStore` created with ``full_hessian=True`` makes every
statistics it creates full, so the adapters' observers need no change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..numerics.constants import BLOCK_SIZE

# Tokens per chunk when forming x_b x_b^T, bounding the temporary to ~chunk * cin floats.
_TOKEN_CHUNK = 4096


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
        amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.tokens += x.shape[0]
        if not self.with_hessian or x.shape[0] == 0:
            return
        if self.hessian_sum is None:
            self.hessian_sum = self._zeros(x.device)
        for start in range(0, x.shape[0], _TOKEN_CHUNK):
            xb = x[start:start + _TOKEN_CHUNK].float().to(self.accum_dtype)
            if self.full:
                self.hessian_sum += xb.T @ xb
                continue
            xb = xb.reshape(-1, self.cin // BLOCK_SIZE, BLOCK_SIZE)
            # [nb, n, 16]^T @ [nb, n, 16] -> [nb, 16, 16]
            xb = xb.transpose(0, 1)
            self.hessian_sum += torch.bmm(xb.transpose(1, 2), xb)

    def hessian(self) -> torch.Tensor | None:
        """Normalised per-block Hessian ``H_b / tokens`` ``[cin/16, 16, 16]``, fp32 (None when
        no token was seen); for full statistics, the diagonal 16x16 blocks of the full one."""
        if self.hessian_sum is None or self.tokens == 0:
            return None
        h = self.hessian_sum
        if self.full:
            nb = self.cin // BLOCK_SIZE
            h = h.reshape(nb, BLOCK_SIZE, nb, BLOCK_SIZE).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        # a tensor divisor: CUDA divides by a Python number through its rounded reciprocal
        tokens = torch.tensor(float(self.tokens), dtype=h.dtype, device=h.device)
        return (h / tokens).float()

    def full_hessian(self) -> torch.Tensor | None:
        """Normalised full Hessian ``X^T X / tokens`` ``[cin, cin]``, float64 (None without
        full statistics or tokens)."""
        if not self.full or self.hessian_sum is None or self.tokens == 0:
            return None
        tokens = torch.tensor(float(self.tokens), dtype=self.hessian_sum.dtype, device=self.hessian_sum.device)
        return self.hessian_sum / tokens

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
