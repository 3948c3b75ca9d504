"""ParallelContext: the named process groups a run uses; all None in a single process.

Groups always come from the framework that laid the model out: Megatron's ``parallel_state``
(:func:`nvfp4_dist.parallel.megatron.megatron_context`), the FSDP2 device mesh
(:func:`nvfp4_dist.parallel.fsdp.fsdp_context`), or WORLD for plain data parallelism.
:func:`detect_context` picks among them for :func:`nvfp4_dist.quantize` when no context is given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch.distributed as dist

from ..errors import LayoutError


@dataclass(frozen=True)
class ParallelContext:
    """Process groups by role. ``groups`` maps a role name used in layouts ("tp", "ep", "fsdp",
    ...) to its ProcessGroup; ``dp`` is the group over which calibration data is split (its
    statistics are summed). A missing name or None means a group of one."""

    dp: object | None = None
    groups: dict = field(default_factory=dict)

    def group(self, name: str | None):
        return None if name is None else self.groups.get(name)

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.is_distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.is_distributed else 1


def group_size(group) -> int:
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


SINGLE_PROCESS = ParallelContext()


def _megatron_initialized() -> bool:
    # Only look when the user's program imported Megatron: importing it here would cost seconds.
    ps = sys.modules.get("megatron.core.parallel_state")
    return ps is not None and ps.model_parallel_is_initialized()


def detect_context(model) -> ParallelContext:
    """The context of ``model``'s layout when the caller gave none.

    * Megatron ``parallel_state`` initialised: its TP/EP groups, statistics summed over its
      data-parallel group (every DP rank feeds its own share of the calibration data).
    * FSDP2 (DTensor parameters): the shard mesh dimension's group as "fsdp", statistics summed
      over the whole mesh (both dimensions of an HSDP mesh).
    * otherwise, under torch.distributed: every rank a data-parallel replica (WORLD).
    """
    if _megatron_initialized():
        from .megatron import megatron_context

        return megatron_context()
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    from .fsdp import fsdp_context, fsdp_mesh

    if fsdp_mesh(model) is not None:
        return fsdp_context(model)
    return ParallelContext(dp=dist.group.WORLD) if dist.get_world_size() > 1 else SINGLE_PROCESS


def check_groups(slots, ctx: ParallelContext) -> None:
    """Raise once, naming every sharded slot whose shard group the context does not hold: its
    global amax would silently be a per-shard amax."""
    missing = sorted({f"{s.name} (group {s.layout.shard_group!r})" for s in slots
                      if s.layout.is_sharded and ctx.group(s.layout.shard_group) is None})
    if missing:
        raise LayoutError("these weights are sharded over process groups the ParallelContext does "
                          "not name:\n  " + "\n  ".join(missing[:10])
                          + "\nPass ctx=megatron_context() / fsdp_context(model), or no ctx to detect it.")
