"""quantize(): discover -> observe -> reduce -> search -> apply.

Stages (every rank runs every stage on what it holds):
  1. discover  (local)      modules -> WeightSlots via layout adapters; validate weights.
  2. observe   (local)      forward hooks accumulate per-block Hessians, token counts, input amax
                            while ``forward_loop(model)`` runs.
  3. reduce    (collective) statistics SUM/MAX over data-parallel (and sequence-parallel) groups;
                            global amax MAX over shards and fused groups (parallel.reduce).
  4. search    (local)      block scales of each rank's own shard (kernels.search_block_scales).
  5. apply     (local)      quantizer state stored as module buffers; fake-quant forward hooks.
  6. report    (collective) error sums over each weight's shard group.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import DeadExpertPolicy, QuantConfig
from ..errors import ConfigError
from ..kernels.dispatch import fake_quant_weight, search_block_scales
from ..kernels.reference import beta_grid
from ..kernels.types import Method
from ..moe import ExpertSummary, dead_input_amax, summarize_experts
from ..numerics import nvfp4
from ..parallel.access import local_shards, local_weight
from ..parallel.context import ParallelContext, check_groups, detect_context
from ..parallel.reduce import reduce_global_amax, reduce_report_sums, reduce_stats
from ..progress import progress
from .apply import install_fake_quant
from .discover import Inventory, discover, validate_weights
from .observers import StatsStore
from .report import LayerReport, error_sums, format_table
from .state import SlotState, attach_state


@dataclass
class QuantResult:
    """What a quantize() run produced (states are also stored on the modules as buffers)."""

    config: QuantConfig
    inventory: Inventory = field(repr=False)
    states: dict[str, SlotState] = field(repr=False)
    report: list[LayerReport] = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    experts: ExpertSummary = field(default_factory=lambda: ExpertSummary(()), repr=False)

    @property
    def slots(self):
        return self.inventory.slots

    @property
    def ignored(self) -> list[str]:
        return self.inventory.ignored

    @property
    def dead(self) -> list[str]:
        """Weights no calibration token reached: this rank's dense weights, and the experts of
        every expert-parallel rank."""
        return _dead_names(self.inventory.slots, self.states, self.experts)

    def table(self) -> str:
        experts = self.experts.format()
        return format_table(self.report) + ("\n" + experts if experts else "")


def _dead_names(slots, states, experts: ExpertSummary) -> list[str]:
    dense = [s.name for s in slots if s.moe is None and states[s.name].dead]
    return dense + [r.name for r in experts.dead]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def observe(model: nn.Module, inv: Inventory, config: QuantConfig,
            forward_loop: Callable[[nn.Module], None]) -> StatsStore:
    """Run ``forward_loop(model)`` with observers installed; hooks are always removed."""
    store = StatsStore()
    handles = []
    route_all = config.dead_experts is DeadExpertPolicy.ROUTE_ALL
    try:
        for module, adapter, slots in inv.modules.values():
            extra = {"route_all": route_all} if adapter.observes_experts else {}
            handles += adapter.observe(module, slots, store, config.needs_hessian, **extra)
        with torch.no_grad():
            forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    return store


def quantize(model: nn.Module, config: QuantConfig | None = None,
             forward_loop: Callable[[nn.Module], None] | None = None,
             ctx: ParallelContext | None = None, show_progress: bool = True) -> QuantResult:
    """Calibrate NVFP4 scales for ``model`` in place and make it compute with fake-quant weights.

    ``forward_loop(model)`` runs the calibration data through the model (needed for
    ``local_hessian`` and for W4A4 input scales). ``ctx`` names the process groups of a
    distributed layout (default: detected, see :func:`~nvfp4_dist.parallel.context.detect_context`).
    Returns a :class:`QuantResult` with per-slot states and a per-layer report.
    """
    config = config or QuantConfig()
    ctx = ctx or detect_context(model)
    seconds = {}
    t0 = time.perf_counter()
    with local_shards(model):  # FSDP1: discovery needs the 2-D weights
        inv = discover(model, config, ctx)
        check_groups(inv.slots, ctx)
        validate_weights(inv.slots, local_weight)
    device = _model_device(model)
    needs_stats = config.needs_hessian or config.quantize_inputs
    if needs_stats and forward_loop is None:
        raise ConfigError(f"method={config.method.value!r} with quantize_inputs={config.quantize_inputs} "
                          "needs calibration data: pass forward_loop=lambda model: ...")
    seconds["discover"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = observe(model, inv, config, forward_loop) if needs_stats else StatsStore()
    seconds["observe"] = time.perf_counter() - t0
    # FSDP2: reshard (the root keeps its weights unsharded after a forward); FSDP1: summon
    # the full weights with writeback (its fallback). Other layouts: local shards as they are.
    with local_shards(model):
        t0 = time.perf_counter()
        if needs_stats:
            reduce_stats(store, inv.slots, ctx, device)
        local_amax = {}
        for slot in inv.slots:
            w = local_weight(slot)
            local_amax[slot.name] = (w.detach().abs().amax().float() if w.numel()
                                     else torch.zeros((), dtype=torch.float32, device=w.device))
        global_amax = reduce_global_amax(inv.slots, local_amax, ctx)
        seconds["reduce"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        betas = beta_grid(config.dss_beta_min, config.dss_beta_max, config.dss_beta_step) if config.dss else None
        states: dict[str, SlotState] = {}
        sums = {}
        for slot in progress(inv.slots, desc="search", enabled=show_progress):
            stats = store.get(slot.stats_key)
            tokens = stats.tokens if stats is not None else 0
            dead = needs_stats and tokens == 0
            hessian = stats.hessian() if (stats is not None and config.needs_hessian) else None
            method = config.method
            if method is Method.LOCAL_HESSIAN and hessian is None:
                method = Method.MSE  # weight-only objective for weights no token reached
            g = global_amax[slot.fused_group]
            w = local_weight(slot).detach()
            if w.numel():
                choice = search_block_scales(w, g, method, hessian=hessian,
                                             dss_betas=betas if method is Method.LOCAL_HESSIAN else None,
                                             backend=config.backend)
                block_amax, beta = choice.block_amax, choice.dss_beta
            else:
                block_amax = torch.zeros(w.shape[0], w.shape[1] // 16, device=w.device)
                beta = None
            states[slot.name] = SlotState(
                global_amax=g.clone(), block_amax=block_amax, method=method, dss_beta=beta,
                input_amax=stats.amax.clone() if (config.quantize_inputs and stats is not None) else None,
                tokens=tokens, dead=dead)
            fq = fake_quant_weight(w, block_amax, g, beta, backend=config.backend)
            fq_max = fake_quant_weight(w, nvfp4.block_amax(w), g, backend=config.backend)
            sums[slot.name] = error_sums(w, fq, fq_max, hessian)
        seconds["search"] = time.perf_counter() - t0

    if config.quantize_inputs:
        for name, amax in dead_input_amax(inv.slots, states, ctx).items():
            states[name].input_amax = amax
    experts = summarize_experts(inv.slots, states, ctx)
    dead = _dead_names(inv.slots, states, experts)
    if dead:
        warnings.warn(f"nvfp4_dist: {len(dead)} weight(s) saw no calibration token and were "
                      f"calibrated weight-only: {', '.join(dead[:8])}"
                      + (" ..." if len(dead) > 8 else ""), stacklevel=2)

    t0 = time.perf_counter()
    for slot in inv.slots:
        attach_state(slot, states[slot.name])
    for module, _adapter, slots in inv.modules.values():
        install_fake_quant(module, sorted({s.param_name for s in slots}), backend=config.backend)
    # Imported here: nvfp4_dist.export imports this module (QuantResult).
    from ..export.checkpoint import register_checkpoint_state

    register_checkpoint_state(model, inv.slots, config)  # state travels with the model's checkpoints
    reduce_report_sums(inv.slots, sums, ctx)
    report = [LayerReport(name=s.name, shape=s.layout.global_shape, method=states[s.name].method.value,
                          tokens=states[s.name].tokens, dead=states[s.name].dead, sums=sums[s.name])
              for s in inv.slots]
    seconds["apply"] = time.perf_counter() - t0
    return QuantResult(config=config, inventory=inv, states=states, report=report, seconds=seconds,
                       experts=experts)
