"""The one place that knows every layout: its adapters, how its context is detected, its names.

Adapters are matched in the order listed here, the first match wins:

1. :class:`~nvfp4_dist.parallel.unsupported.UnsupportedFamilyAdapter`: TransformerEngine and
   grouped-GEMM families, refused by name (never skipped);
2. Megatron-core: :class:`~nvfp4_dist.parallel.megatron_moe.SequentialMLPExpertAdapter` (expert
   linears), then :class:`~nvfp4_dist.parallel.megatron.ColumnParallelAdapter` and
   :class:`~nvfp4_dist.parallel.megatron.RowParallelAdapter`;
3. :class:`~nvfp4_dist.parallel.hf_experts_fsdp.FSDPExpertsAdapter` (sharded by FSDP2), then
   :class:`~nvfp4_dist.parallel.hf_experts.HFExpertsAdapter`: transformers' fused 3-D experts;
4. :class:`~nvfp4_dist.parallel.adapters.LinearAdapter`: ``torch.nn.Linear``, plain or FSDP2.

The Megatron adapters are listed when megatron-core's tensor-parallel layers are loaded: a model
can only hold those layers once megatron.core is imported, and importing it for a model that
has none would cost seconds on every run.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from torch import nn

from ..layout.naming import ExportNaming
from .adapters import LayoutAdapter, LinearAdapter
from .context import ParallelContext, SINGLE_PROCESS
from .fsdp import DTensorNaming, fsdp_context, fsdp_mesh
from .hf_experts import HFExpertsAdapter
from .hf_experts_fsdp import FSDPExpertsAdapter
from .unsupported import UnsupportedFamilyAdapter

_MEGATRON_LAYERS = "megatron.core.tensor_parallel.layers"
_MEGATRON_STATE = "megatron.core.parallel_state"


def _megatron_loaded() -> bool:
    return _MEGATRON_LAYERS in sys.modules


def adapters() -> tuple[LayoutAdapter, ...]:
    """Every adapter, in matching order (see the module docstring)."""
    found: list[LayoutAdapter] = [UnsupportedFamilyAdapter()]
    if _megatron_loaded():
        # Imported here, not at the top: megatron.core is an optional dependency.
        from .megatron import ColumnParallelAdapter, RowParallelAdapter
        from .megatron_moe import SequentialMLPExpertAdapter

        found += [SequentialMLPExpertAdapter(), ColumnParallelAdapter(), RowParallelAdapter()]
    return (*found, FSDPExpertsAdapter(), HFExpertsAdapter(), LinearAdapter())


def find_adapter(module: nn.Module, candidates: tuple[LayoutAdapter, ...] | None = None) -> LayoutAdapter | None:
    """The first adapter that matches ``module`` (None when no layout handles it)."""
    for adapter in candidates if candidates is not None else adapters():
        if adapter.matches(module):
            return adapter
    return None


def _megatron_initialized() -> bool:
    # Only look when the user's program imported Megatron: importing it here would cost seconds.
    ps = sys.modules.get(_MEGATRON_STATE)
    return ps is not None and ps.model_parallel_is_initialized()


def detect_context(model: nn.Module) -> ParallelContext:
    """The context of ``model``'s layout when the caller gave none.

    * Megatron ``parallel_state`` initialised: its TP/EP groups, statistics summed over its
      data-parallel group (every DP rank feeds its own share of the calibration data).
    * FSDP2 (DTensor parameters): the shard mesh dimension's group as FSDP, statistics summed
      over the whole mesh (both dimensions of an HSDP mesh).
    * otherwise, under torch.distributed: every rank a data-parallel replica (WORLD).
    """
    if _megatron_initialized():
        from .megatron import megatron_context

        return megatron_context()
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    if fsdp_mesh(model) is not None:
        return fsdp_context(model)
    return ParallelContext(dp=dist.group.WORLD) if dist.get_world_size() > 1 else SINGLE_PROCESS


def export_naming(model: nn.Module, ctx: ParallelContext) -> ExportNaming:
    """The exported names of ``model``'s layout: Megatron GPT -> HF names, else state keys."""
    if _megatron_loaded():
        from .megatron import MegatronNaming, is_megatron_model

        if is_megatron_model(model):
            return MegatronNaming(ctx, model)
    return DTensorNaming()
