"""MoE experts after calibration: the dead-expert policy and the experts summary of a run.

(Which tokens reach an expert is the adapters' business: :mod:`nvfp4_dist.parallel.routing`.)

Dead experts. An expert is dead when no calibration token reached it after the statistics were
reduced over its data-parallel replicas (with Megatron expert parallelism the token dispatcher
has already brought it the tokens of every EP rank). Under ``DeadExpertPolicy.WEIGHT_ONLY``:

* its block scales come from the weight-only objective, the 126-candidate MSE sweep, instead of
  the Hessian (the pipeline falls back whenever a weight has no Hessian);
* its static input amax (W4A4) is the documented safe value :func:`dead_input_amax` computes:
  the largest input amax of the live experts of the same layer and projection (its *family*),
  over every expert-parallel rank; if the whole family is dead, the largest input amax of every
  live weight the rank's expert-parallel group observed; if nothing was observed at all,
  :data:`UNOBSERVED_INPUT_AMAX`. Why the family max: a dead expert's gate/up input at inference
  is the same hidden state its siblings saw, so their largest value is the best estimate that
  does not clip; its down-projection input is the same kind of intermediate activation as theirs.
  A larger-than-needed input scale only coarsens the activation grid, a smaller one clips, and
  zero would turn into a zero/NaN scale in the engine;
* it is listed, with its layer, in :class:`ExpertSummary` (``QuantResult.experts``,
  ``QuantResult.dead`` and the run table), on every rank.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..layout.roles import GroupRole
from ..layout.slots import WeightSlot
from ..parallel.context import ParallelContext
from ..parallel.reduce import gather_objects, reduce_max_by_key

# Input amax used when no weight of the model saw a calibration token (nothing to borrow from):
# unit-scale activations, the scale normalised hidden states have.
UNOBSERVED_INPUT_AMAX = 1.0


def dead_input_amax(slots: list[WeightSlot], states: dict, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Safe input amax (fp32 0-d) of every dead weight on this rank (see the module docstring).

    ``states``: slot name -> SlotState after the search (``dead``, ``input_amax``). Collective
    over the expert-parallel groups named by the slots (every rank calls it, dead or not).
    """
    live_amax = [states[s.name].input_amax for s in slots
                 if not states[s.name].dead and states[s.name].input_amax is not None]
    device = live_amax[0].device if live_amax else torch.device("cpu")
    model_max = torch.stack(live_amax).float().amax() if live_amax else torch.zeros((), device=device)
    families: dict[str, list[WeightSlot]] = defaultdict(list)
    for slot in slots:
        if slot.moe is not None:
            families[slot.moe.family].append(slot)
    # One stacked MAX-reduce per expert-parallel group: [family maxima in sorted order..., model max].
    by_group: dict[str | None, list[str]] = defaultdict(list)
    for family in sorted(families):
        by_group[families[family][0].moe.group].append(family)
    stacked, group_of = {}, {}
    for group, names in by_group.items():
        values = []
        for family in names:
            live = [states[s.name].input_amax.float() for s in families[family]
                    if not states[s.name].dead and states[s.name].input_amax is not None]
            values.append(torch.stack(live).amax() if live else torch.zeros((), device=device))
        key = group or ""
        stacked[key] = torch.stack([*values, model_max.to(device)])
        group_of[key] = group
    reduce_max_by_key(stacked, group_of, ctx)
    family_max, family_positive = {}, {}
    for key, values in stacked.items():
        names = by_group[group_of[key]]
        family_max.update(zip(names, values[:-1].unbind(0)))
        family_positive.update(zip(names, (v > 0 for v in values[:-1].tolist())))  # one wait per group
        model_max = torch.maximum(model_max.to(device), values[-1])
    # Pipeline stages hold different layers: the model-wide maximum spans every stage.
    stage_max = {"model": model_max.to(device).clone()}
    reduce_max_by_key(stage_max, {"model": GroupRole.PP}, ctx)
    model_max = stage_max["model"]
    if float(model_max) <= 0:
        model_max = torch.tensor(UNOBSERVED_INPUT_AMAX, device=device)
    out = {}
    for slot in slots:
        if not states[slot.name].dead:
            continue
        family = slot.moe.family if slot.moe is not None else None
        out[slot.name] = (family_max[family] if family_positive.get(family) else model_max).clone()
    return out


@dataclass(frozen=True)
class ExpertRecord:
    """One expert weight of the model: its family (``<layer>.<projection>``), global index,
    logical name, reduced token count, whether it is dead, and the search method it got."""

    family: str
    index: int
    count: int
    name: str
    tokens: int
    dead: bool
    method: str

    @property
    def layer(self) -> str:
        return self.family.rpartition(".")[0]

    @property
    def projection(self) -> str:
        return self.family.rpartition(".")[2]


@dataclass(frozen=True)
class ExpertSummary:
    """Every expert weight of every MoE layer, gathered over expert-parallel ranks (sorted)."""

    records: tuple[ExpertRecord, ...]

    @property
    def dead(self) -> list[ExpertRecord]:
        return [r for r in self.records if r.dead]

    def families(self) -> dict[str, list[ExpertRecord]]:
        out: dict[str, list[ExpertRecord]] = defaultdict(list)
        for record in self.records:
            out[record.family].append(record)
        return dict(out)

    def missing(self) -> dict[str, list[int]]:
        """Family -> expert indices that have no calibrated weight (empty when complete)."""
        out = {}
        for family, records in self.families().items():
            seen = {r.index for r in records}
            gap = [i for i in range(records[0].count) if i not in seen]
            if gap:
                out[family] = gap
        return out

    def format(self) -> str:
        """Readable summary: counts per layer, then every dead expert with its layer."""
        if not self.records:
            return ""
        families = self.families()
        layers = sorted({r.layer for r in self.records})
        lines = [f"MoE: {len(layers)} layers, {len(families)} expert projections, "
                 f"{len(self.records)} expert weights calibrated, {len(self.dead)} dead"]
        missing = self.missing()
        for family, gap in sorted(missing.items()):
            lines.append(f"  MISSING {family}: experts {gap} have no calibrated weight")
        dead_by_layer: dict[tuple[str, int], list[str]] = defaultdict(list)
        for record in self.dead:
            dead_by_layer[(record.layer, record.index)].append(f"{record.projection} ({record.method})")
        for (layer, index), projections in sorted(dead_by_layer.items()):
            lines.append(f"  dead expert {index} of {layer}: no calibration token; "
                         f"weight-only scales for {', '.join(projections)}")
        return "\n".join(lines)


def summarize_experts(slots: list[WeightSlot], states: dict, ctx: ParallelContext) -> ExpertSummary:
    """The :class:`ExpertSummary` of a run, identical on every rank of an expert-parallel group
    (collective over the groups the expert slots name)."""
    local: dict[str | None, list[ExpertRecord]] = defaultdict(list)
    for slot in slots:
        if slot.moe is None:
            continue
        state = states[slot.name]
        local[slot.moe.group].append(ExpertRecord(
            family=slot.moe.family, index=slot.moe.index, count=slot.moe.count, name=slot.name,
            tokens=state.tokens, dead=state.dead, method=state.method.value))
    records = set()
    for group in sorted(local, key=lambda g: g or ""):
        for part in gather_objects(local[group], group, ctx):
            records.update(part)
    return ExpertSummary(tuple(sorted(records, key=lambda r: (r.family, r.index, r.name))))
