"""Layout adapters: one per module family, each turning a module into WeightSlots.

An adapter knows how a family stores its weight (plain, tensor-parallel, FSDP2 DTensor, fused
experts) and how to observe the inputs of each slot. Adding a model family means adding one
adapter and registering it with :func:`register_adapter`; the rest of the pipeline reads
:class:`~nvfp4_dist.calib.slots.WeightSlot` only.
"""

from __future__ import annotations

import abc

from torch import nn

from ..calib.observers import StatsStore, observe_first_input
from ..calib.slots import ShardLayout, WeightSlot
from .context import ParallelContext

# Sibling module names that inference engines fuse, so they must share one global scale;
# value: (fused-group suffix, whether the siblings read the same input tensor).
FUSED_SIBLINGS = {
    "q_proj": ("qkv", True), "k_proj": ("qkv", True), "v_proj": ("qkv", True),
    "gate_proj": ("gate_up", True), "up_proj": ("gate_up", True),
    "w1": ("w13", True), "w3": ("w13", True),
    "q_a_proj": ("mla_a", True), "kv_a_proj_with_mqa": ("mla_a", True),
    "query": ("qkv", True), "key": ("qkv", True), "value": ("qkv", True),
}


def fused_keys(name: str) -> tuple[str, str]:
    """(fused_group, stats_key) of a linear named ``name`` from the sibling table."""
    parent, _, leaf = name.rpartition(".")
    if leaf in FUSED_SIBLINGS:
        suffix, shared_input = FUSED_SIBLINGS[leaf]
        group = f"{parent}.{suffix}" if parent else suffix
        return group, (group + ".input" if shared_input else name)
    return name, name


class LayoutAdapter(abc.ABC):
    """Turns one module family into WeightSlots and observes their inputs."""

    module_types: tuple[type, ...] = ()
    # MoE expert adapters take ``route_all`` in :meth:`observe` (DeadExpertPolicy.ROUTE_ALL).
    observes_experts: bool = False

    def matches(self, module: nn.Module) -> bool:
        """Whether this adapter handles ``module`` (default: an instance of ``module_types``)."""
        return isinstance(module, self.module_types)

    @abc.abstractmethod
    def slots(self, name: str, module: nn.Module, ctx: ParallelContext) -> list[WeightSlot]:
        """The module's quantizable weights as this rank holds them."""

    def observe(self, module: nn.Module, slots: list[WeightSlot], store: StatsStore,
                with_hessian: bool) -> list:
        """Install hooks feeding the slots' input statistics; returns removable handles.

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


_ADAPTERS: list[LayoutAdapter] = []


def register_adapter(adapter_cls: type[LayoutAdapter]) -> type[LayoutAdapter]:
    """Class decorator: register an adapter (later registrations are matched first)."""
    _ADAPTERS.insert(0, adapter_cls())
    return adapter_cls


def find_adapter(module: nn.Module) -> LayoutAdapter | None:
    for adapter in _ADAPTERS:
        if adapter.matches(module):
            return adapter
    return None


def local_layout(param, ctx: ParallelContext) -> ShardLayout:
    """Layout of a 2-D parameter: whole for a plain tensor, from the placement for a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from .fsdp import dtensor_layout

        return dtensor_layout(param)
    return ShardLayout.whole(param.shape)


@register_adapter
class LinearAdapter(LayoutAdapter):
    """``torch.nn.Linear`` (plain or FSDP2-sharded): weight ``[cout, cin]``."""

    module_types = (nn.Linear,)

    def slots(self, name, module, ctx):
        group, stats_key = fused_keys(name)
        layout = local_layout(module.weight, ctx)
        return [WeightSlot(name=name, module=module, param_name="weight", layout=layout,
                           fused_group=group, stats_key=stats_key)]


# Registered wherever layouts are: families no adapter handles are refused, not skipped.
from . import unsupported  # noqa: E402,F401
