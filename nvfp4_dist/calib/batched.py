"""The search stage for fused experts, a whole projection at a time: the block scales of all E
experts of one MoE projection (same shape, same method) in a few launches instead of one search
per expert.

Per projection (the slots of one 3-D parameter, every expert present, unsharded, plain tensor):
the stacked weight ``[E, rows, cin]`` itself (views of it: never copied), the experts' global
amaxes ``[E]`` and normalised Hessians ``[E, cin/16, 16, 16]`` go to
:func:`~nvfp4_dist.kernels.dispatch.search_block_scales_stacked`, whose results are each expert's
own search bit for bit. The per-expert rules of :func:`.stages.search` hold expert by expert: an
expert no token reached, or whose every Hessian block is empty, takes the weight-only MSE
objective; the empty blocks of the others take the MSE choice (beta 1.0 under DSS).
Anything else (GPTQ, sharded or partial expert sets) is left to the per-slot search.

Cost per projection, whatever E (12,288 expert slots in a 48-layer, 128-expert model):
- memory: the results, the scales' E4M3 bits (and DSS's beta codes) ``[E, rows, cin/16]``
  uint8 (:mod:`nvfp4_dist.numerics.compact`), allocated once; each slot's state holds views of
  them (and of the stacked ``[E]`` global and input amaxes), no per-slot copy. The searches run
  over chunks of experts whose fp32 temporaries stay within :data:`TEMP_BUDGET` and are encoded
  into the results chunk by chunk.
- work: a fixed number of torch operations per chunk, one host sync for the empty-block counts
  (one ``tolist``) and one for the token divisor; nothing per expert but Python bookkeeping.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..config import QuantConfig
from ..kernels.dispatch import search_block_scales_stacked
from ..kernels.types import Method
from ..layout.slots import WeightSlot
from ..numerics import nvfp4
from ..numerics.compact import BETA_UNIT, beta_codes, scale_bits
from ..numerics.constants import BLOCK_SIZE
from .state import SlotState

# A block column whose Hessian trace is below this fraction of the weight's largest one carries
# no signal (the rule of stages.empty_hessian_blocks, applied to every expert at once).
_EMPTY_HESSIAN_RATIO = 1e-12

# Temporaries of the stacked search are bounded by taking the experts of a projection in chunks:
# at most about this many bytes beside the results (the weight itself is never copied).
TEMP_BUDGET = 256 << 20

# Bytes of temporaries per weight block of one chunk's search: the sweep's candidates (int32) and
# losses (fp32), the ScaleChoice's int64 candidates, table lookup and block amax (fp32), DSS's
# beta (fp32), the chunk's block amax after the MSE choice (fp32). The chunk's MSE pass runs
# after the Hessian pass's candidates and losses are dropped.
_SEARCH_BYTES_PER_BLOCK = 4 + 4 + 8 + 4 + 4 + 4 + 4


def expert_chunks(n_experts: int, bytes_per_expert: int, budget: int = TEMP_BUDGET) -> list[tuple[int, int]]:
    """``[(start, stop)]``: the experts in even chunks whose temporaries stay within ``budget``
    (at least one expert per chunk)."""
    if n_experts == 0:
        return []
    per = max(1, budget // max(1, bytes_per_expert))
    count = -(-n_experts // per)
    size = -(-n_experts // count)
    return [(start, min(start + size, n_experts)) for start in range(0, n_experts, size)]


def stacked_groups(slots) -> list[list[WeightSlot]]:
    """The slots that one stacked search can take: per (module, parameter), all experts
    ``0..E-1`` of an unsharded plain 3-D parameter, in expert order."""
    groups: dict[tuple[int, str], list[WeightSlot]] = defaultdict(list)
    for slot in slots:
        if slot.moe is not None and slot.expert is not None:
            groups[(id(slot.module), slot.param_name)].append(slot)
    out = []
    for members in groups.values():
        param = members[0].parameter()
        members = sorted(members, key=lambda s: s.expert)
        if (param.dim() == 3 and not hasattr(param, "device_mesh") and param.numel()
                and [s.expert for s in members] == list(range(param.shape[0]))
                and not any(s.layout.is_sharded for s in members)):
            out.append(members)
    return out


def _hessians(inputs, needs_hessian: bool) -> tuple[torch.Tensor | None, list[bool]]:
    """``([E, nb, 16, 16]`` fp32 normalised Hessians (zeros where none), has-a-Hessian per
    expert)``: ``InputStats.hessian()`` of each expert, divided for all at once."""
    if not needs_hessian:
        return None, [False] * len(inputs)
    has = [s is not None and s.hessian_sum is not None and s.tokens > 0 for s in inputs]
    if not any(has):
        return None, has
    if any(s is not None and s.full for s in inputs):  # full (GPTQ) statistics: their own blocks
        blocks = [s.hessian() if h else None for s, h in zip(inputs, has)]
        zero = torch.zeros_like(next(b for b in blocks if b is not None))
        return torch.stack([b if b is not None else zero for b in blocks]), has
    ref = next(s.hessian_sum for s, h in zip(inputs, has) if h)
    zero = None if all(has) else torch.zeros_like(ref)  # one tensor for every expert without statistics
    sums = torch.stack([s.hessian_sum if h else zero for s, h in zip(inputs, has)])
    tokens = torch.tensor([float(s.tokens) if h else 1.0 for s, h in zip(inputs, has)],
                          dtype=sums.dtype, device=sums.device)
    # a tensor divisor, element by element: the bits of each expert's own division
    return (sums / tokens[:, None, None, None]).float(), has


def _stacked_amax(values: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Copies of the 0-d tensors ``values`` (None stays None) as views of one stacked tensor:
    two operations instead of one clone per expert."""
    present = [v for v in values if v is not None]
    if not present or any(v.shape != present[0].shape for v in present):
        return [None if v is None else v.clone() for v in values]
    views = iter(torch.stack(present).unbind(0))
    return [None if v is None else next(views) for v in values]


def _search_chunks(w, g, hessian, empty, live: list[bool], needs_mse: list[bool], betas, config: QuantConfig,
                   budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale bits, beta codes or None)`` ``[E, rows, nb]`` uint8 of every expert: the Hessian search
    (DSS with ``betas``) of the chunks holding a live expert, the MSE search of those holding an
    expert that needs it, the MSE choice taken where ``empty [E, nb]`` (every block of an expert
    that is not live). Experts without a usable Hessian are swept with their zero Hessian along
    with the chunk's live ones (per block, as a live expert's empty blocks are) and overwritten."""
    n, rows, nb = w.shape[0], w.shape[1], w.shape[2] // BLOCK_SIZE
    bits = torch.empty(n, rows, nb, dtype=torch.uint8, device=w.device)
    codes = (torch.empty_like(bits) if betas is not None and hessian is not None and any(live) else None)
    for a, b in expert_chunks(n, rows * nb * _SEARCH_BYTES_PER_BLOCK, budget):
        any_live, any_mse = any(live[a:b]), any(needs_mse[a:b])
        amax = None
        if any_live:
            choice = search_block_scales_stacked(w[a:b], g[a:b], Method.LOCAL_HESSIAN, hessian=hessian[a:b],
                                                 dss_betas=betas, kernels=config.kernels)
            amax = choice.block_amax
            if codes is not None:
                codes[a:b] = beta_codes(choice.dss_beta)
            del choice
        elif codes is not None:
            codes[a:b] = BETA_UNIT  # beta 1.0, neutral: no expert of this chunk has a DSS state
        if any_mse:
            mse_amax = search_block_scales_stacked(w[a:b], g[a:b], Method.MSE, kernels=config.kernels).block_amax
            if any_live:  # the empty block columns (all of them for the chunk's other experts)
                mask = empty[a:b, None, :]
                torch.where(mask, mse_amax, amax, out=amax)
                if codes is not None:
                    codes[a:b].masked_fill_(mask, BETA_UNIT)  # beta 1.0
            else:
                amax = mse_amax
            del mse_amax
        bits[a:b] = scale_bits(amax, g[a:b])
        del amax
    return bits, codes


def _max_chunks(w, g, budget: int) -> torch.Tensor:
    """Scale bits ``[E, rows, nb]`` uint8 of every expert's block amaxes (``|w|`` of one chunk at a time)."""
    n, rows, cin = w.shape
    bits = torch.empty(n, rows, cin // BLOCK_SIZE, dtype=torch.uint8, device=w.device)
    for a, b in expert_chunks(n, rows * cin * w.element_size() + rows * (cin // BLOCK_SIZE) * 12, budget):
        bits[a:b] = scale_bits(nvfp4.block_amax(w[a:b]), g[a:b])
    return bits


def _search_group(slots: list[WeightSlot], stats, config: QuantConfig, betas, budget: int) -> dict[str, SlotState]:
    w = slots[0].parameter().detach()
    n, nb = w.shape[0], w.shape[-1] // BLOCK_SIZE
    inputs = [stats.of(s) for s in slots]
    g = torch.stack([stats.global_amax[s.fused_group] for s in slots]).reshape(n).to(w.device)
    method = config.method
    hessian, has = _hessians(inputs, config.needs_hessian and method is Method.LOCAL_HESSIAN)
    empty_count, empty = [0] * n, None
    if method is Method.LOCAL_HESSIAN and hessian is not None:
        hessian = hessian.to(w.device)
        trace = hessian.diagonal(dim1=-2, dim2=-1).sum(-1)
        # [E, nb]; every block of an expert without statistics (a zero Hessian) counts as empty
        empty = trace <= trace.amax(dim=-1, keepdim=True) * _EMPTY_HESSIAN_RATIO
        counts = empty.sum(-1).tolist()  # the one wait for the device of this projection
        empty_count = [int(c) if h else 0 for c, h in zip(counts, has)]
    live = [h and c < nb for c, h in zip(empty_count, has)]
    methods = [Method.LOCAL_HESSIAN if lv else (Method.MSE if method is not Method.MAX else Method.MAX)
               for lv in live]
    codes = None
    if method is Method.MAX:
        bits = _max_chunks(w, g, budget)
    else:
        # weight-only MSE: the experts without a usable Hessian, and those with empty blocks
        needs_mse = [not lv or c > 0 for lv, c in zip(live, empty_count)]
        bits, codes = _search_chunks(w, g, hessian, empty, live, needs_mse, betas, config, budget)
    # the states: views of the stacked results (one unbind each), no per-expert operation
    g_views, bits_views = g.unbind(0), bits.unbind(0)
    code_views = codes.unbind(0) if codes is not None else [None] * n
    input_amax = (_stacked_amax([inp.amax if inp is not None else None for inp in inputs])
                  if config.quantize_inputs else [None] * n)
    states = {}
    for e, slot in enumerate(slots):
        tokens = inputs[e].tokens if inputs[e] is not None else 0
        states[slot.name] = SlotState(
            global_amax=g_views[e], block_scale=bits_views[e], method=methods[e],
            dss_beta_code=code_views[e] if live[e] else None, input_amax=input_amax[e],
            tokens=tokens, dead=stats.observed and tokens == 0, empty_blocks=empty_count[e])
    return states


def search_stacked(slots, stats, config: QuantConfig, betas: torch.Tensor | None,
                   budget: int = TEMP_BUDGET) -> dict[str, SlotState]:
    """States of the fused-expert slots a stacked search takes (see the module docstring), by
    slot name; the other slots are not in the result. GPTQ takes none. ``budget``: bytes of
    temporaries per chunk of experts (:data:`TEMP_BUDGET`)."""
    if config.method is Method.GPTQ:
        return {}
    states: dict[str, SlotState] = {}
    for group in stacked_groups(slots):
        states.update(_search_group(group, stats, config, betas, budget))
    return states
