"""quantize(): discover -> observe -> reduce -> search -> settle -> apply (report on demand).

Stages (every rank runs every stage on what it holds; each is a function of :mod:`.discover`,
:mod:`.stages` or :mod:`.apply` over the frozen result of the one before):
  1. discover  (local)      modules -> WeightSlots via layout adapters; validate weights.
  2. observe   (local)      forward hooks accumulate per-block Hessians, token counts, input amax
                            while ``forward_loop(model)`` runs.
  3. reduce    (collective) statistics SUM/MAX over data-parallel (and sequence-parallel) groups;
                            global amax MAX over shards and fused groups (parallel.reduce).
  4. search    (local)      block scales of each rank's own shard (kernels.search_block_scales).
  5. settle    (collective) dead weights' input amax from live siblings; the experts summary.
  6. apply     (local)      quantizer state stored as module buffers; fake-quant forward hooks.
  7. report    (collective) error sums over each weight's shard group, computed only when asked
                            for (:meth:`QuantResult.layer_report`).

GPTQ with ``gptq_sequential``: stages 2-4 run once per decoder layer (in layer order, weights
outside numbered layers last), the layers done so far already computing with their quantized
weights, so a layer's statistics see the inputs the quantized model gives it. The decoder layers
run one at a time on inputs cached from one forward loop stopped at the first layer
(:mod:`.layerwise`); where that is not valid (Megatron, FSDP1, see
:func:`.layerwise.decoder_stack`) the forward loop is re-run in full once per layer group.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from ..layout.naming import ExportNaming
from ..layout.stats import StatsStore
from ..parallel.access import local_shards, local_weight
from ..parallel.context import ParallelContext, check_groups
from ..parallel.registry import detect_context, export_naming
from . import layerwise, stages
from .apply import apply_states, install_states
from .discover import Inventory, discover, validate_weights
from .moe import ExpertSummary
from .report import LayerReport, format_table
from .state import SlotState


@dataclass
class QuantResult:
    """What a quantize() run produced (states are also stored on the modules as buffers).

    model / ctx / naming: the calibrated model, the process groups of its layout and the names
    its layout exports (what :func:`nvfp4_dist.export.hf.export_checkpoint` needs besides the states).
    """

    config: QuantConfig
    inventory: Inventory = field(repr=False)
    states: dict[str, SlotState] = field(repr=False)
    statistics: stages.Statistics = field(repr=False)
    model: nn.Module = field(repr=False)
    ctx: ParallelContext = field(repr=False)
    naming: ExportNaming = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    experts: ExpertSummary = field(default_factory=lambda: ExpertSummary(()), repr=False)
    _report: list[LayerReport] | None = field(default=None, repr=False)

    @property
    def slots(self):
        return self.inventory.slots

    @property
    def ignored(self) -> tuple[str, ...]:
        return self.inventory.ignored

    @property
    def dead(self) -> list[str]:
        """Weights no calibration token reached: this rank's dense weights, and the experts of
        every expert-parallel rank."""
        return stages.dead_names(self.inventory.slots, self.states, self.experts)

    def layer_report(self) -> list[LayerReport]:
        """Per-layer errors of the model's current weights (computed on the first call, two
        fake-quants per weight). Collective under a sharded layout: call it on every rank."""
        if self._report is None:
            t0 = time.perf_counter()
            with local_shards(self.model):
                self._report = stages.report(self.inventory, self.states, self.statistics, self.config,
                                             self.ctx)
            self.seconds["report"] = time.perf_counter() - t0
        return self._report

    def table(self) -> str:
        """The per-layer table and the experts summary (see :meth:`layer_report`: collective)."""
        experts = self.experts.format()
        return format_table(self.layer_report()) + ("\n" + experts if experts else "")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _numbered_groups(inventory: Inventory) -> dict[int | None, Inventory]:
    """The inventory cut by decoder layer index (None: modules outside numbered layers)."""
    groups: dict[int | None, list[str]] = {}
    for name in inventory.modules:
        groups.setdefault(layerwise.layer_index(name), []).append(name)
    parts = {}
    for index, names in groups.items():
        modules = {n: inventory.modules[n] for n in names}
        slots = tuple(s for s in inventory.slots if any(s in m.slots for m in modules.values()))
        parts[index] = Inventory(slots, modules, inventory.ignored, inventory.skipped_reasons)
    return parts


def layer_groups(inventory: Inventory) -> list[Inventory]:
    """The inventory cut by decoder layer (the ``layers.N.`` of module names), in layer order;
    modules outside numbered layers form the last group."""
    parts = _numbered_groups(inventory)
    return [parts[k] for k in sorted(k for k in parts if k is not None)] + ([parts[None]] if None in parts else [])


def _calibrate(model: nn.Module, inventory: Inventory, config: QuantConfig, forward_loop, ctx: ParallelContext,
               observed: bool, show_progress: bool, seconds: dict) -> tuple[stages.Statistics, dict[str, SlotState]]:
    """Stages 2-4 over ``inventory`` (observe only when ``observed``); their times are added to
    ``seconds``."""
    t0 = time.perf_counter()
    store = stages.observe(model, inventory, config, forward_loop) if observed else StatsStore()
    seconds["observe"] = seconds.get("observe", 0.0) + time.perf_counter() - t0
    # FSDP2: reshard (the root keeps its weights unsharded after a forward); FSDP1: summon
    # the full weights with writeback (its fallback). Other layouts: local shards as they are.
    with local_shards(model):
        t0 = time.perf_counter()
        statistics = stages.reduce(inventory, store, observed, ctx, _model_device(model))
        seconds["reduce"] = seconds.get("reduce", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        states = stages.search(inventory, statistics, config, show_progress, ctx)
        seconds["search"] = seconds.get("search", 0.0) + time.perf_counter() - t0
    return statistics, states


def _sequential(model: nn.Module, inventory: Inventory, config: QuantConfig, forward_loop, ctx: ParallelContext,
                seconds: dict) -> tuple[stages.Statistics, dict[str, SlotState]]:
    """Stages 2-4 layer group by layer group; each group computes with its quantized weights
    before the next one is observed. Decoder layers run alone on cached inputs
    (:func:`.layerwise.calibrate_layers`: one forward loop, stopped at the first layer); the
    groups it leaves (modules outside the decoder layers; every group where running a layer
    alone is not valid) each re-run ``forward_loop`` in full.

    Memory: a group's full ``[cin, cin]`` Hessians live from its observation to the end of its
    search; what is kept afterwards (for the report) is their diagonal 16x16 blocks. A rank thus
    holds one layer's full Hessians plus the cached activations (samples x sequence x hidden in
    the model's dtype, on its device: see :mod:`.layerwise`)."""
    store = StatsStore()
    global_amax, weight_amax, states = {}, {}, {}

    def calibrate(part: Inventory, loop) -> None:
        part_stats, part_states = _calibrate(model, part, config, loop, ctx, True, False, seconds)
        install_states(part, part_states, config)
        store.update({key: inputs.blocks_only() for key, inputs in part_stats.inputs.items()})
        global_amax.update(part_stats.global_amax)
        weight_amax.update(part_stats.weight_amax)
        states.update(part_states)
        # the group's full Hessians (part_stats) are freed here, before the next group is observed

    rest = layerwise.calibrate_layers(model, inventory, _numbered_groups(inventory), calibrate, forward_loop,
                                      seconds)
    for part in rest:
        calibrate(part, forward_loop)
    return stages.Statistics(store, global_amax, weight_amax, True), states


def quantize(model: nn.Module, config: QuantConfig | None = None,
             forward_loop: Callable[[nn.Module], None] | None = None,
             ctx: ParallelContext | None = None, show_progress: bool = True) -> QuantResult:
    """Calibrate NVFP4 scales for ``model`` in place and make it compute with fake-quant weights.

    ``forward_loop(model)`` runs the calibration data through the model (needed for
    ``local_hessian`` and for W4A4 input scales). ``ctx`` names the process groups of a
    distributed layout (default: detected, see :func:`~nvfp4_dist.parallel.registry.detect_context`).
    Returns a :class:`QuantResult` with per-slot states; its per-layer report is computed when
    asked for (:meth:`QuantResult.layer_report`, :meth:`QuantResult.table`).
    """
    config = config or QuantConfig()
    ctx = ctx or detect_context(model)
    needs_stats = config.needs_hessian or config.quantize_inputs
    if needs_stats and forward_loop is None:
        raise ConfigError(f"method={config.method.value!r} with quantize_inputs={config.quantize_inputs} "
                          "needs calibration data: pass forward_loop=lambda model: ...")
    seconds = {}
    t0 = time.perf_counter()
    with local_shards(model):  # FSDP1: discovery needs the 2-D weights
        inventory = discover(model, config, ctx)
        check_groups(inventory.slots, ctx)
        validate_weights(inventory.slots, local_weight)
        stages.check_gptq_layouts(inventory, config, ctx)
    seconds["discover"] = time.perf_counter() - t0

    if config.gptq_sequential:
        statistics, states = _sequential(model, inventory, config, forward_loop, ctx, seconds)
    else:
        statistics, states = _calibrate(model, inventory, config, forward_loop, ctx, needs_stats, show_progress,
                                        seconds)

    t0 = time.perf_counter()
    settled = stages.settle(inventory, states, config, ctx)
    dead = stages.dead_names(inventory.slots, settled.states, settled.experts)
    if dead:
        warnings.warn(f"nvfp4_dist: {len(dead)} weight(s) saw no calibration token and were "
                      f"calibrated weight-only: {', '.join(dead[:8])}"
                      + (" ..." if len(dead) > 8 else ""), stacklevel=2)
    apply_states(model, inventory, settled.states, config)
    seconds["apply"] = time.perf_counter() - t0
    return QuantResult(config=config, inventory=inventory, states=settled.states, statistics=statistics,
                       model=model, ctx=ctx, naming=export_naming(model, ctx), seconds=seconds,
                       experts=settled.experts)
