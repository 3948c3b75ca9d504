"""Megatron-core MoE experts: ``SequentialMLP`` local experts under expert parallelism.

A ``SequentialMLP`` (``...mlp.experts``) holds ``num_moe_experts / EP`` experts on each
expert-parallel rank as ``local_experts.{j}``, each an MLP whose ``linear_fc1`` (gate and up rows,
``is_expert=True``) and ``linear_fc2`` are Megatron Column/RowParallelLinear layers over the
expert-tensor-parallel group. This adapter turns each of them into a WeightSlot named and
indexed GLOBALLY: local expert ``j`` on EP rank ``r`` is expert ``g = r * E/EP + j``, and its slot
is ``...mlp.experts.local_experts.{g}.linear_fc1`` whatever the EP size, so states, reports and
export names (``model.layers.{l}.mlp.experts.{g}.gate_proj/up_proj/down_proj``) match EP=1.

Each rank calibrates the experts it holds: an expert's inputs are the tokens the dispatcher
brought it from every EP rank, observed on its own linears; its statistics are summed over the
expert-data-parallel group ("edp": the ranks holding the same expert), in float64 so that they
do not depend on the order tokens arrive in (observers.InputStats). Dead-expert fallbacks and the
experts summary reduce over the EP group ("ep").

``TEGroupedMLP`` (TransformerEngine grouped GEMM) and the legacy ``GroupedMLP`` are not adapted:
TransformerEngine is not installed where this was built and tested, and an adapter that no test
runs is not shipped. :mod:`.unsupported` refuses them by class name instead of passing them over.
Route-all (DeadExpertPolicy.ROUTE_ALL) needs every token of every EP rank at every expert and is
refused for Megatron experts.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist

from ..errors import ConfigError, LayoutError
from ..layout.roles import GroupRole
from ..layout.slots import ExpertInfo, ExportPart, WeightSlot
from .adapters import LayoutAdapter
from .context import ParallelContext, group_size
from .megatron import (ColumnParallelLinear, RowParallelLinear, column_layout, glu_export_parts,
                       renamed_globally, row_layout, tp_rank_size)

_LOCAL_EXPERT = re.compile(r"(?P<experts>.*)\.local_experts\.(?P<local>\d+)\.(?P<fc>linear_fc1|linear_fc2)")
_GPT_EXPERTS = re.compile(r"(?:.*\.)?decoder\.layers\.(?P<layer>\d+)\.mlp\.experts")


def expert_parallel_rank_size(name: str, module, ctx: ParallelContext) -> tuple[int, int]:
    """(rank, size) of this process in the expert-parallel group, checked against the model."""
    group = ctx.group(GroupRole.EP)
    size = group_size(group)
    expected = getattr(module.config, "expert_model_parallel_size", 1)
    if size != expected:
        raise LayoutError(f"{name}: the model is built for expert-parallel size {expected} but the "
                          f"ParallelContext's 'ep' group has {size} rank(s); pass "
                          "ctx=nvfp4_dist.parallel.megatron.megatron_context() (or no ctx)")
    return (dist.get_rank(group) if size > 1 else 0), size


def expert_export_parts(experts: str, index: int, fc: str, module) -> tuple[ExportPart, ...]:
    """HF per-expert names of a GPT expert linear (() for modules outside a GPT decoder)."""
    match = _GPT_EXPERTS.fullmatch(experts)
    if match is None:
        return ()
    prefix = f"model.layers.{match['layer']}.mlp.experts.{index}"
    if fc == "linear_fc2":
        return (ExportPart(f"{prefix}.down_proj", slice(0, module.output_size)),)
    if not module.config.gated_linear_unit:
        return (ExportPart(f"{prefix}.up_proj", slice(0, module.output_size)),)
    return glu_export_parts(prefix, module.output_size, tp_rank_size(module)[1])


class SequentialMLPExpertAdapter(LayoutAdapter):
    """The expert linears of a Megatron ``SequentialMLP`` (see the module docstring)."""

    def matches(self, module):
        return isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and bool(getattr(module, "is_expert", False))

    def slots(self, name, module, ctx):
        match = _LOCAL_EXPERT.fullmatch(name)
        if match is None:
            raise LayoutError(f"{name}: an expert linear outside a SequentialMLP's local_experts; "
                              "only SequentialMLP experts are supported (exclude this module)")
        ep_rank, ep_size = expert_parallel_rank_size(name, module, ctx)
        count = module.config.num_moe_experts
        index = ep_rank * (count // ep_size) + int(match["local"])
        experts, fc = match["experts"], match["fc"]
        logical = f"{experts}.local_experts.{index}.{fc}"
        layout = (column_layout if fc == "linear_fc1" else row_layout)(name, module, ctx)
        return [WeightSlot(name=logical, module=module, param_name="weight", layout=layout,
                           fused_group=logical, stats_key=logical,
                           export_parts=expert_export_parts(experts, index, fc, module),
                           moe=ExpertInfo(index=index, count=count, family=f"{experts}.{fc}",
                                          group=GroupRole.EP if ep_size > 1 else None,
                                          data_group=GroupRole.EDP))]

    def with_export_names(self, model, slots):
        """Slots named by their global decoder layer under pipeline parallelism (the expert
        index is global already): name, statistics key, expert family and HF names."""
        def rename(slot, name):
            match = _LOCAL_EXPERT.fullmatch(name)
            return dataclasses.replace(
                slot, name=name, fused_group=name, stats_key=name,
                export_parts=expert_export_parts(match["experts"], slot.moe.index, match["fc"], slot.module),
                moe=dataclasses.replace(slot.moe, family=f"{match['experts']}.{match['fc']}"))

        return renamed_globally(model, slots, rename)

    def observe(self, module, slots, store, *, with_hessian: bool, route_all: bool = False):
        if route_all:
            raise ConfigError(f"{slots[0].name}: dead_experts='route_all' is not supported for Megatron "
                              "experts (each rank only sees the tokens dispatched to its experts); "
                              "use dead_experts='weight_only'")
        layout = slots[0].layout
        if layout.shard_axis == 1 and not module.input_is_parallel:
            raise LayoutError(f"{slots[0].name}: an expert linear_fc2 that scatters its own input "
                              "(input_is_parallel=False) is not supported")
        # The input is this rank's own channels (column-parallel: all of them; row-parallel: the
        # expert-TP shard the dispatcher's layout gives it).
        stats = store.get_or_create(slots[0].stats_key, layout.local_shape[1], with_hessian,
                                    accum_dtype=torch.float64)

        def hook(mod, args):
            stats.update(args[0])

        return [module.register_forward_pre_hook(hook)]
