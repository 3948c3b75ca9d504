"""GPTQ inside the search stage: one factorisation per statistics key, one sweep per local shard.

The weights that share a statistics key (q/k/v, gate/up) share its full Hessian, so the
factorisation GPTQ needs (dead channels, damped inverse, its upper Cholesky factor U) is the
same for all of them: :class:`FactorCache` computes it once, at the key's first weight, and
drops it after the key's last. Taking the Hessian reduces the key's statistics to their
diagonal 16x16 blocks (what the report and the checkpoints read) before the factorisation
starts, so the float64 ``[cin, cin]`` sum and the matrix being factorised never live together:
at its peak a rank holds one float64 ``[cin, cin]`` matrix (two while cuSOLVER forms the
inverse) and U's fp32 columns, on top of the other keys' sums not yet used.

A row-parallel shard (input channels split over TP) keeps U's columns of its own channels
only; its rank relays errors as :func:`.stages.search` describes.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..config import QuantConfig
from ..errors import LayoutError
from ..kernels.gptq import GPTQFactor, gptq_factor, gptq_quantize
from ..kernels.types import Method
from ..layout.slots import WeightSlot
from ..layout.stats import InputStats, StatsStore
from ..parallel.context import ParallelContext
from ..parallel.reduce import ErrorRelay


def _columns(slot: WeightSlot) -> tuple[int, int]:
    """The input channels of ``slot``'s local shard."""
    layout = slot.layout
    if layout.shard_axis == 1 and layout.is_sharded:
        return layout.offset[1], layout.offset[1] + layout.local_shape[1]
    return 0, layout.global_shape[1]


class FactorCache:
    """The :class:`~nvfp4_dist.kernels.gptq.GPTQFactor` of each statistics key of ``slots``,
    computed on first use and released when :meth:`done` has been called for the key's last
    slot (every slot of ``slots`` must be passed to :meth:`done` once, GPTQ'd or not)."""

    def __init__(self, slots, store: StatsStore, config: QuantConfig):
        self.store, self.damp = store, config.gptq_damp
        self.left = Counter(s.stats_key for s in slots)
        spans: dict[str, tuple[int, int]] = {}
        for s in slots:  # the channels of every shard that shares the key
            lo, hi = _columns(s)
            old = spans.get(s.stats_key, (lo, hi))
            spans[s.stats_key] = (min(old[0], lo), max(old[1], hi))
        self.spans = spans
        self.factors: dict[str, GPTQFactor] = {}

    def get(self, slot: WeightSlot, inputs: InputStats, device: torch.device) -> GPTQFactor:
        key = slot.stats_key
        if key not in self.factors:
            cin = slot.layout.global_shape[1]
            if not inputs.full or inputs.cin != cin:
                raise LayoutError(f"{slot.name}: GPTQ needs the whole [{cin}, {cin}] input Hessian but its "
                                  f"observer gave {inputs.cin} channels; exclude this layer or use "
                                  "method='local_hessian'")
            hessian = inputs.take_full_hessian()  # the stats keep their diagonal blocks only
            self.factors[key] = gptq_factor(hessian, self.damp, columns=self.spans[key], consume=True,
                                            device=device)
            del hessian
        return self.factors[key]

    def done(self, slot: WeightSlot) -> None:
        key = slot.stats_key
        self.left[key] -= 1
        if self.left[key] == 0:
            self.factors.pop(key, None)


def all_dead(factor: GPTQFactor) -> bool:
    """Every input channel of the key is dead (no token had a nonzero value there)."""
    return bool(factor.dead.all())


def gptq_one(slot: WeightSlot, w: torch.Tensor, g: torch.Tensor, factor: GPTQFactor, config: QuantConfig,
             ctx: ParallelContext, relay: ErrorRelay):
    """GPTQ of one local shard: writes W' into ``w`` (the parameter's local rows) and returns
    ``(block_amax, method, dead input channels)``.

    A row-parallel shard (input channels split over TP) runs in rank order: rank r first applies
    the scaled errors of ranks 0 .. r-1 (received through ``relay``, in column order, the order one
    process applies them), sweeps its own columns, and sends its scaled errors to the later ranks.
    Every update to a column is then the one-process update in the one-process order: bit for
    bit the TP=1 result.
    """
    layout = slot.layout
    cin = layout.global_shape[1]
    split = layout.shard_axis == 1 and layout.is_sharded
    group = ctx.group(layout.shard_group) if split else None
    offset = layout.offset[1] if split else 0
    earlier = relay.incoming(tuple(w.shape), group, w.device) if split and offset else ()
    result = gptq_quantize(w, factor, g, scales=config.gptq_scales, timing=config.gptq_scale_timing.value,
                           kernels=config.kernels, offset=offset, earlier=earlier,
                           keep_errors=split and offset + w.shape[1] < cin, keep_quant=False)
    if result.errors is not None:
        relay.send(result.errors, group)
    with torch.no_grad():
        w.copy_(result.weight)
    return result.block_amax, Method.GPTQ, result.dead
