"""The search stage for fused experts, a whole projection at a time: the block scales of all E
experts of one MoE projection (same shape, same method) in a few launches instead of one search
per expert.

Per projection (the slots of one 3-D parameter, every expert present, unsharded, plain tensor):
the stacked weight ``[E, rows, cin]`` itself (no copy when every expert takes the same
objective), the experts' global amaxes ``[E]`` and normalised Hessians ``[E, cin/16, 16, 16]``
go to :func:`~nvfp4_dist.kernels.dispatch.search_block_scales_stacked`, whose results are each
expert's own search bit for bit. The per-expert rules of :func:`.stages.search` hold expert by
expert: an expert no token reached, or whose every Hessian block is empty, takes the weight-only
MSE objective; the empty blocks of the others take the MSE choice (beta 1.0 under DSS).
Anything else (GPTQ, sharded or partial expert sets) is left to the per-slot search.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..config import QuantConfig
from ..kernels.dispatch import search_block_scales_stacked
from ..kernels.types import Method
from ..layout.slots import WeightSlot
from ..numerics import nvfp4
from .state import SlotState

# A block column whose Hessian trace is below this fraction of the weight's largest one carries
# no signal (the rule of stages.empty_hessian_blocks, applied to every expert at once).
_EMPTY_HESSIAN_RATIO = 1e-12


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
        ref = next(b for b in blocks if b is not None)
        return torch.stack([b if b is not None else torch.zeros_like(ref) for b in blocks]), has
    ref = next(s.hessian_sum for s, h in zip(inputs, has) if h)
    sums = torch.stack([s.hessian_sum if h else torch.zeros_like(ref) for s, h in zip(inputs, has)])
    tokens = torch.tensor([float(s.tokens) if h else 1.0 for s, h in zip(inputs, has)],
                          dtype=sums.dtype, device=sums.device)
    # a tensor divisor, element by element: the bits of each expert's own division
    return (sums / tokens[:, None, None, None]).float(), has


def _search_group(slots: list[WeightSlot], stats, config: QuantConfig, betas) -> dict[str, SlotState]:
    w = slots[0].parameter().detach()
    n = len(slots)
    inputs = [stats.of(s) for s in slots]
    g = torch.stack([stats.global_amax[s.fused_group].reshape(()) for s in slots]).to(w.device)
    method = config.method
    hessian, has = _hessians(inputs, config.needs_hessian and method is Method.LOCAL_HESSIAN)
    empty_count = [0] * n
    if method is Method.LOCAL_HESSIAN and hessian is not None:
        hessian = hessian.to(w.device)
        trace = hessian.diagonal(dim1=-2, dim2=-1).sum(-1)
        empty = trace <= trace.amax(dim=-1, keepdim=True) * _EMPTY_HESSIAN_RATIO  # [E, nb]
        counts = empty.sum(-1).tolist()
        nb = empty.shape[1]
        empty_count = [int(c) if h else 0 for c, h in zip(counts, has)]
        hessian_live = [h and c < nb for c, h in zip(counts, has)]
    else:
        empty, hessian_live = None, [False] * n
    methods = [Method.LOCAL_HESSIAN if live else (Method.MSE if method is not Method.MAX else Method.MAX)
               for live in hessian_live]
    beta = None
    if method is Method.MAX:
        block_amax = nvfp4.block_amax(w)
    else:
        live = [e for e in range(n) if hessian_live[e]]
        # weight-only MSE: the experts without a usable Hessian, and those with empty blocks
        mse = [e for e in range(n) if not hessian_live[e] or empty_count[e]]
        block_amax = torch.empty(*w.shape[:-1], w.shape[-1] // 16, dtype=torch.float32, device=w.device)
        if live:
            idx = torch.tensor(live, device=w.device)
            full = len(live) == n
            choice = search_block_scales_stacked(w if full else w[idx], g if full else g[idx], Method.LOCAL_HESSIAN,
                                                 hessian=hessian if full else hessian[idx], dss_betas=betas,
                                                 kernels=config.kernels)
            block_amax[idx] = choice.block_amax
            if choice.dss_beta is not None:
                beta = torch.ones_like(block_amax)
                beta[idx] = choice.dss_beta
        if mse:
            idx = torch.tensor(mse, device=w.device)
            choice = search_block_scales_stacked(w if len(mse) == n else w[idx], g if len(mse) == n else g[idx],
                                                 Method.MSE, kernels=config.kernels)
            mse_amax = choice.block_amax
            for j, e in enumerate(mse):
                if hessian_live[e]:  # only its empty block columns
                    mask = empty[e].to(w.device)
                    block_amax[e] = torch.where(mask, mse_amax[j], block_amax[e])
                    if beta is not None:
                        beta[e] = torch.where(mask, torch.ones_like(beta[e]), beta[e])
                else:
                    block_amax[e] = mse_amax[j]
    states = {}
    for e, slot in enumerate(slots):
        inp = inputs[e]
        tokens = inp.tokens if inp is not None else 0
        states[slot.name] = SlotState(
            global_amax=g[e].clone(), block_amax=block_amax[e], method=methods[e],
            dss_beta=beta[e] if (beta is not None and hessian_live[e]) else None,
            input_amax=inp.amax.clone() if (config.quantize_inputs and inp is not None) else None,
            tokens=tokens, dead=stats.observed and tokens == 0, empty_blocks=empty_count[e])
    return states


def search_stacked(slots, stats, config: QuantConfig, betas: torch.Tensor | None) -> dict[str, SlotState]:
    """States of the fused-expert slots a stacked search takes (see the module docstring), by
    slot name; the other slots are not in the result. GPTQ takes none."""
    if config.method is Method.GPTQ:
        return {}
    states: dict[str, SlotState] = {}
    for group in stacked_groups(slots):
        states.update(_search_group(group, stats, config, betas))
    return states
