"""Layout adapters: one per module family, each turning a module into WeightSlots.

An adapter knows how a family stores its weight (plain, tensor-parallel, FSDP2 DTensor, fused
experts) and how to observe the inputs of each slot. Adding a model family means adding one
adapter and listing it in :mod:`nvfp4_dist.parallel.registry`; the rest of the pipeline reads
:class:`~nvfp4_dist.layout.slots.WeightSlot` only.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from ..layout.fused import fused_keys
from ..layout.slots import ShardLayout, WeightSlot
from ..layout.stats import InputStats, StatsStore
from .context import ParallelContext
from .fsdp import dtensor_layout, is_dtensor


class LayoutAdapter(abc.ABC):
    """Turns one module family into WeightSlots and observes their inputs."""

    module_types: tuple[type, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        """Whether this adapter handles ``module`` (default: an instance of ``module_types``)."""
        return isinstance(module, self.module_types)

    @abc.abstractmethod
    def slots(self, name: str, module: nn.Module, ctx: ParallelContext) -> list[WeightSlot]:
        """The module's quantizable weights as this rank holds them."""

    def observe(self, module: nn.Module, slots: list[WeightSlot], store: StatsStore, *,
                with_hessian: bool, route_all: bool = False) -> list:
        """Install hooks feeding the slots' input statistics; returns removable handles.

        ``with_hessian``: accumulate per-block Hessians (else token counts and amax only).
        ``route_all``: MoE experts only (DeadExpertPolicy.ROUTE_ALL); dense adapters ignore it.

        Default: the module's first input feeds every slot (a linear layer). Slots whose
        statistics another module already feeds (shared-input siblings) are not observed twice.
        """
        key = slots[0].stats_key
        if key in store:
            return []
        cin = slots[0].layout.local_shape[1]
        stats = store.get_or_create(key, cin, with_hessian)
        return [observe_first_input(module, stats)]

    def with_export_names(self, model: nn.Module, slots: list[WeightSlot]) -> list[WeightSlot]:
        """``slots`` with ``export_parts`` naming the modules of the exported checkpoint, for
        adapters whose names depend on the whole model (default: unchanged)."""
        return slots


def observe_first_input(module: torch.nn.Module, stats: InputStats):
    """Forward pre-hook feeding ``module``'s first positional (or ``input``/``hidden_states``)
    argument into ``stats``; returns the handle."""

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        if x is not None:
            stats.update(x)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def local_layout(param) -> ShardLayout:
    """Layout of a 2-D parameter: whole for a plain tensor, from the placement for a DTensor."""
    return dtensor_layout(param) if is_dtensor(param) else ShardLayout.whole(param.shape)


class LinearAdapter(LayoutAdapter):
    """``torch.nn.Linear`` (plain or FSDP2-sharded): weight ``[cout, cin]``."""

    module_types = (nn.Linear,)

    def slots(self, name, module, ctx):
        group, stats_key = fused_keys(name)
        layout = local_layout(module.weight)
        return [WeightSlot(name=name, module=module, param_name="weight", layout=layout,
                           fused_group=group, stats_key=stats_key)]
