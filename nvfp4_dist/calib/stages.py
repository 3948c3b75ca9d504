"""The stages of ``quantize()`` between discovery and apply, each a function over frozen results.

  observe  (local)      forward hooks accumulate per-block Hessians, token counts and input amax
                        while ``forward_loop(model)`` runs                   -> StatsStore
  reduce   (collective) statistics SUM/MAX over data-parallel (and sequence-parallel) groups;
                        global amax MAX over shards and fused groups         -> Statistics
  search   (local)      block scales of each rank's own shard                -> {slot: SlotState}
                        (GPTQ: the scales, then the error-compensated weight written into the
                        rank's own shard of the parameter; row-parallel shards pass their errors
                        down their TP group in rank order: point to point there)
  settle   (collective) dead weights' input amax borrowed from live siblings; the experts
                        summary                                               -> Settled
  report   (collective) per-layer errors against plain max calibration, on demand
Discovery is :mod:`.discover`, apply :mod:`.apply`; :mod:`.pipeline` chains them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import DeadExpertPolicy, QuantConfig
from ..errors import CalibrationError, LayoutError
from ..kernels.dispatch import fake_quant_weight, search_block_scales
from ..kernels.reference import beta_grid
from ..kernels.types import Method
from ..layout.roles import GroupRole
from ..layout.slots import WeightSlot, expert_stacks
from ..layout.stats import InputStats, StatsStore
from ..numerics import nvfp4
from ..numerics.compact import beta_codes, scale_bits
from ..numerics.constants import E4M3_MAX, E4M3_MIN_SCALE
from ..parallel.access import local_weight
from ..parallel.context import SINGLE_PROCESS, ParallelContext, group_size
from ..parallel.reduce import ErrorRelay, reduce_report_sums, reduce_stats, reduce_weight_amax
from ..progress import progress
from .batched import search_stacked
from .discover import Inventory
from .gptq_search import FactorCache, all_dead, gptq_one
from .moe import ExpertSummary, dead_input_amax, summarize_experts
from .report import LayerReport, error_sums
from .state import SlotState


def observe(model: nn.Module, inventory: Inventory, config: QuantConfig,
            forward_loop: Callable[[nn.Module], None]) -> StatsStore:
    """Run ``forward_loop(model)`` with observers installed; hooks are always removed."""
    store = StatsStore(full_hessian=config.needs_full_hessian)
    handles = []
    route_all = config.dead_experts is DeadExpertPolicy.ROUTE_ALL
    try:
        for module, adapter, slots in inventory.modules.values():
            handles += adapter.observe(module, list(slots), store, with_hessian=config.needs_hessian,
                                       route_all=route_all)
        with torch.no_grad():
            forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    return store


@dataclass(frozen=True)
class Statistics:
    """Reduced statistics of a run: input statistics by stats key (empty without calibration
    data) and the global amax of every fused group (fp32 0-d)."""

    inputs: StatsStore
    global_amax: dict[str, torch.Tensor]
    weight_amax: dict[str, torch.Tensor]  # slot name -> max |w| of the whole weight
    observed: bool  # a forward loop ran (False: weight-only max/mse without data)

    def of(self, slot: WeightSlot) -> InputStats | None:
        return self.inputs.get(slot.stats_key)


def reduce(inventory: Inventory, store: StatsStore, observed: bool, ctx: ParallelContext,
           device: torch.device) -> Statistics:
    """Sum/MAX the statistics over their groups and reduce each fused group's global amax.
    Call inside ``local_shards(model)`` (the amax is read from this rank's shards)."""
    if observed:
        reduce_stats(store, list(inventory.slots), ctx, device)
        check_finite(inventory, store)
    weight_amax = reduce_weight_amax(list(inventory.slots), local_weight_amax(inventory.slots), ctx)
    members: dict[str, list[torch.Tensor]] = {}
    for slot in inventory.slots:
        members.setdefault(slot.fused_group, []).append(weight_amax[slot.name])
    # q/k/v and gate/up share one global amax: the MAX over the members' whole-weight amaxes (a
    # group of one, e.g. each fused expert: its own amax, the same value and no operation)
    global_amax = {group: values[0] if len(values) == 1 else torch.stack(values).amax()
                   for group, values in sorted(members.items())}
    statistics = Statistics(store, global_amax, weight_amax, observed)
    check_shared_scales(inventory, statistics)
    return statistics


def local_weight_amax(slots) -> dict[str, torch.Tensor]:
    """slot name -> max |w| of this rank's shard (fp32 0-d; 0 for an empty shard). Fused experts:
    one min/max reduction per 3-D parameter, ``max(|min|, |max|)`` per expert (the same value:
    taking the absolute value is exact), whose ``[E]`` result the experts' values are views of."""
    stacks, rest = expert_stacks(slots)
    out = {}
    for param, members in stacks:
        if not param.numel():
            rest += members
            continue
        low, high = torch.aminmax(param.detach().reshape(param.shape[0], -1), dim=1)
        amax = torch.maximum(low.abs(), high.abs()).float().unbind(0)
        out.update((slot.name, amax[slot.expert]) for slot in members)
    for slot in rest:
        w = local_weight(slot)
        out[slot.name] = (w.detach().abs().amax().float() if w.numel()
                          else torch.zeros((), dtype=torch.float32, device=w.device))
    return {slot.name: out[slot.name] for slot in slots}


# A weight whose own amax is this far below its fused group's: even its largest block's FP8
# scale a * 448 / g falls under the E4M3 floor 2^-9, so the shared global scale cannot express
# its blocks and most of its elements quantize to zero.
_SHARED_SCALE_FLOOR = E4M3_MIN_SCALE / E4M3_MAX


def check_shared_scales(inventory: Inventory, statistics: Statistics) -> None:
    """Refuse, naming them, weights that their fused group's global scale would zero (a huge
    value in a sibling, e.g. one 1e30 in k_proj next to q_proj and v_proj)."""
    sizes: dict[str, int] = {}
    for slot in inventory.slots:
        sizes[slot.fused_group] = sizes.get(slot.fused_group, 0) + 1
    # a weight alone in its group (each fused expert) has g = a: never below a fraction of it
    shared = [slot for slot in inventory.slots if sizes[slot.fused_group] > 1]
    if not shared:
        return
    device = statistics.weight_amax[shared[0].name].device
    values = torch.stack([t.to(device) for t in [statistics.weight_amax[s.name] for s in shared]
                          + [statistics.global_amax[s.fused_group] for s in shared]]).tolist()  # one wait
    bad = []
    for slot, a, g in zip(shared, values[:len(shared)], values[len(shared):]):
        if 0 < a < g * _SHARED_SCALE_FLOOR:
            bad.append(f"{slot.name} (amax {a:.3g}; group {slot.fused_group} amax {g:.3g})")
    if bad:
        raise CalibrationError(
            "these weights share a global scale with a sibling whose values are so large that they "
            "would quantize to (nearly) zero:\n  " + "\n  ".join(bad[:20])
            + "\nFix the extreme weight (an amax above ~1e4 in a linear layer is a damaged checkpoint), "
            "or exclude the whole fused group to keep it in high precision.")


def check_finite(inventory: Inventory, store: StatsStore) -> None:
    """Raise once, naming every weight whose reduced input statistics hold NaN/Inf (after the
    reduce, every rank of a group holds the same values, so every rank raises together)."""
    keys = list(store)
    tensors = [[store[k].amax] + ([store[k].hessian_sum] if store[k].hessian_sum is not None else []) for k in keys]
    bad_keys = {key for key, ok in zip(keys, all_finite(tensors)) if not ok}
    if bad_keys:
        names = sorted(s.name for s in inventory.slots if s.stats_key in bad_keys)
        listed = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
        raise CalibrationError(
            f"the calibration forward produced non-finite inputs (the forward overflowed) for: {listed}. "
            "Fix: look for huge or non-finite weights upstream of these layers (nvfp4-dist inspect of "
            "the source, or torch.isfinite on the model's parameters), or calibrate in float32 "
            "(--dtype float32).")


def all_finite(groups: list[list[torch.Tensor]]) -> list[bool]:
    """Whether every tensor of each group is free of NaN/Inf, with one wait for the device.

    Tensors that are views of one stacked tensor (the fused experts' statistics, see
    :class:`~nvfp4_dist.layout.stats.ExpertStats`) are judged by one check of that tensor; only
    when it fails are its views checked one by one, to name them."""
    tensors = [t for group in groups for t in group]
    bases: dict[int, torch.Tensor] = {}
    for t in tensors:
        base = t._base if t._base is not None else t
        bases.setdefault(id(base), base)
    order = list(bases)
    verdict = dict(zip(order, _finite_flags([bases[i] for i in order])))
    failed = [t for t in tensors if not verdict[id(t._base if t._base is not None else t)]]
    bad = {id(t) for t, ok in zip(failed, _finite_flags(failed)) if not ok}
    return [not any(id(t) in bad for t in group) for group in groups]


def _finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """``torch.isfinite(t).all()`` of each tensor, one ``tolist`` per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [True] * len(tensors)
    for indices in by_device.values():
        flags = torch.stack([torch.isfinite(tensors[i]).all() for i in indices]).tolist()
        for i, ok in zip(indices, flags):
            out[i] = ok
    return out


# A block column whose Hessian trace is below this fraction of the weight's largest one carries
# no signal: its inputs are (numerically) always zero, every candidate scale has the same loss,
# and the Hessian search would pick the smallest scale, i.e. zero the block.
_EMPTY_HESSIAN_RATIO = 1e-12


def empty_hessian_blocks(hessian: torch.Tensor) -> torch.Tensor:
    """bool ``[cin/16]``: the 16-channel input blocks whose Hessian is zero or numerically empty."""
    trace = hessian.diagonal(dim1=1, dim2=2).sum(-1)
    return trace <= trace.max() * _EMPTY_HESSIAN_RATIO


def _search_one(w, g, method: Method, hessian, betas, config: QuantConfig):
    """(block_amax, dss_beta, method, empty block columns) of one local shard.

    Blocks whose Hessian is empty take the weight-only MSE choice (beta 1.0 under DSS); a weight
    whose every block is empty is searched weight-only, like a weight no token reached.
    """
    empty = 0
    if hessian is not None:
        mask = empty_hessian_blocks(hessian)
        empty = int(mask.sum())
        if empty == mask.numel():
            method, hessian = Method.MSE, None
    if method is not Method.LOCAL_HESSIAN:
        choice = search_block_scales(w, g, method, kernels=config.kernels)
        return choice.block_amax, None, method, empty
    choice = search_block_scales(w, g, method, hessian=hessian, dss_betas=betas, kernels=config.kernels)
    block_amax, beta = choice.block_amax, choice.dss_beta
    if empty:
        block_amax = torch.where(mask.to(w.device), search_block_scales(w, g, Method.MSE, kernels=config.kernels)
                                 .block_amax, block_amax)
        if beta is not None:
            beta = torch.where(mask.to(w.device), torch.ones_like(beta), beta)
    return block_amax, beta, method, empty


def check_gptq_layouts(inventory: Inventory, config: QuantConfig, ctx: ParallelContext = SINGLE_PROCESS) -> None:
    """GPTQ propagates each column's error along the input channels: a weight whose input
    channels are split over ranks needs its whole input observed on every rank. Megatron's dense
    row-parallel linears (split over TP) do that; refuse, naming them, the other channel-split
    weights (expert linears split over expert-tensor-parallel ranks, FSDP2 ``Shard(1)``).
    The sequential mode walks decoder layers in order, which pipeline stages (each numbering
    its own layers) cannot do yet: refused under pipeline parallelism."""
    if config.method is not Method.GPTQ:
        return
    pp = group_size(ctx.group(GroupRole.PP))
    if config.gptq_sequential and pp > 1:
        raise LayoutError(f"gptq_sequential is not supported under pipeline parallelism (pipeline size {pp}): "
                          "use one-shot GPTQ (gptq_sequential=False) or pipeline size 1")
    split = [s.name for s in inventory.slots
             if s.layout.shard_axis == 1 and s.layout.is_sharded and s.layout.shard_group != GroupRole.TP]
    if split:
        listed = ", ".join(split[:8]) + (f" ... ({len(split)} in all)" if len(split) > 8 else "")
        raise LayoutError(
            f"method='gptq' is not supported for these weights, whose input channels are split over "
            f"ranks other than Megatron's tensor-parallel group: {listed}. Use expert-tensor-parallel "
            "size 1 (or FSDP2 row sharding), exclude these layers, or use method='local_hessian'.")


def search(inventory: Inventory, stats: Statistics, config: QuantConfig,
           show_progress: bool = True, ctx: ParallelContext = SINGLE_PROCESS) -> dict[str, SlotState]:
    """Block scales of every slot's local shard (inside ``local_shards(model)``).

    A weight that no calibration token reached (dead) or whose Hessian is missing or empty is
    searched with the weight-only MSE objective instead of the Hessian one; so are the blocks
    whose own Hessian is empty (``SlotState.empty_blocks`` counts them).

    GPTQ (``config.method``): each live shard is quantized column by column with the full
    Hessian of its statistics key and its compensated weight W' is written into the parameter
    (``empty_blocks`` then counts dead input channels, zeroed as GPTQ does); a dead weight or
    one whose Hessian is all zero gets the weight-only MSE scales and keeps its values.
    Row-parallel shards relay their errors over their TP group (``ctx``): collective there.
    """
    relay = ErrorRelay()
    betas = beta_grid(config.dss_beta_min, config.dss_beta_max, config.dss_beta_step) if config.dss else None
    states: dict[str, SlotState] = {}
    stacked = search_stacked(inventory.slots, stats, config, betas)  # fused experts, per projection
    factors = (FactorCache([s for s in inventory.slots if s.name not in stacked], stats.inputs, config)
               if config.method is Method.GPTQ else None)
    for slot in progress(inventory.slots, desc="search", enabled=show_progress):
        if slot.name in stacked:
            states[slot.name] = stacked[slot.name]
            continue
        inputs = stats.of(slot)
        tokens = inputs.tokens if inputs is not None else 0
        hessian = inputs.hessian() if (inputs is not None and config.needs_hessian) else None
        method = config.method
        if method in (Method.LOCAL_HESSIAN, Method.GPTQ) and hessian is None:
            method = Method.MSE  # weight-only objective for weights no token reached
        w = local_weight(slot).detach()
        factor = factors.get(slot, inputs, w.device) if method is Method.GPTQ else None
        if factor is not None and all_dead(factor):
            method, hessian = Method.MSE, None  # every input channel dead: nothing to compensate
        g = stats.global_amax[slot.fused_group]
        empty = 0
        if w.numel() and method is Method.GPTQ:
            block_amax, method, _ = gptq_one(slot, w, g, factor, config, ctx, relay)
            beta, empty = None, int(empty_hessian_blocks(hessian).sum())
        elif w.numel():
            block_amax, beta, method, empty = _search_one(w, g, method, hessian, betas, config)
        else:
            block_amax = torch.zeros(w.shape[0], w.shape[1] // 16, device=w.device)
            beta = None
        states[slot.name] = SlotState(
            global_amax=g.clone(), block_scale=scale_bits(block_amax, g), method=method,
            dss_beta_code=None if beta is None else beta_codes(beta),
            input_amax=inputs.amax.clone() if (config.quantize_inputs and inputs is not None) else None,
            tokens=tokens, dead=stats.observed and tokens == 0, empty_blocks=empty)
        if factors is not None:
            factors.done(slot)
    relay.finish()
    return states


@dataclass(frozen=True)
class Settled:
    """States after the dead-weight policy, and the experts summary (identical on every rank
    of an expert-parallel group)."""

    states: dict[str, SlotState]
    experts: ExpertSummary


def settle(inventory: Inventory, states: dict[str, SlotState], config: QuantConfig,
           ctx: ParallelContext) -> Settled:
    """Give dead experts a safe input amax (W4A4; new states, the input ones are unchanged) and
    summarise the experts. Collective over expert-parallel groups.

    A dense weight that no token reached has no safe value to borrow: under W4A4 it is refused
    by name (weight-only runs calibrate it with the MSE objective and report it dead)."""
    slots = list(inventory.slots)
    states = dict(states)
    unreached = [s.name for s in slots if s.moe is None and states[s.name].dead]
    if config.quantize_inputs and unreached:
        listed = ", ".join(unreached[:8]) + (f" ... ({len(unreached)} in all)" if len(unreached) > 8 else "")
        raise CalibrationError(
            f"no calibration token reached {listed}: a static input scale (W4A4) needs data. Feed "
            "calibration data that runs through these layers, exclude them, or calibrate "
            "weight-only (quantize_inputs=False, --weight-only).")
    if config.quantize_inputs:
        for name, amax in dead_input_amax(slots, states, ctx).items():
            states[name] = dataclasses.replace(states[name], input_amax=amax)
    return Settled(states, summarize_experts(slots, states, ctx))


def dead_names(slots, states: dict[str, SlotState], experts: ExpertSummary) -> list[str]:
    """Weights no calibration token reached: this rank's dense weights, and the experts of
    every expert-parallel rank."""
    dense = [s.name for s in slots if s.moe is None and states[s.name].dead]
    return dense + [r.name for r in experts.dead]


def report(inventory: Inventory, states: dict[str, SlotState], stats: Statistics, config: QuantConfig,
           ctx: ParallelContext) -> list[LayerReport]:
    """Per-layer errors of the current weights under their states against plain max
    calibration (two fake-quants per weight; inside ``local_shards(model)``). Collective over
    each weight's shard group: every rank calls it."""
    sums = {}
    for slot in inventory.slots:
        state = states[slot.name]
        inputs = stats.of(slot)
        hessian = inputs.hessian() if (inputs is not None and config.needs_hessian) else None
        w = local_weight(slot).detach()
        g = state.global_amax
        fq = fake_quant_weight(w, state.block_scale, g, state.dss_beta_code, kernels=config.kernels)
        fq_max = fake_quant_weight(w, nvfp4.block_amax(w), g, kernels=config.kernels)
        sums[slot.name] = error_sums(w, fq, fq_max, hessian)
    reduce_report_sums(list(inventory.slots), sums, ctx)
    return [LayerReport(name=s.name, shape=s.layout.global_shape, method=states[s.name].method.value,
                        tokens=states[s.name].tokens, dead=states[s.name].dead, sums=sums[s.name],
                        empty_blocks=states[s.name].empty_blocks)
            for s in inventory.slots]
