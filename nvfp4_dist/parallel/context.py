"""ParallelContext: the process groups a run uses, by role; all None in a single process.

Groups always come from the framework that laid the model out: Megatron's ``parallel_state``
(:func:`nvfp4_dist.parallel.megatron.megatron_context`), the FSDP2 device mesh
(:func:`nvfp4_dist.parallel.fsdp.fsdp_context`), or WORLD for plain data parallelism.
:func:`nvfp4_dist.parallel.registry.detect_context` picks among them for
:func:`nvfp4_dist.quantize` when no context is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from ..errors import LayoutError
from ..layout.roles import GroupRole


@dataclass(frozen=True)
class ParallelContext:
    """Process groups by role. ``groups`` maps a :class:`~nvfp4_dist.layout.roles.GroupRole`
    (the roles layouts name) to its ProcessGroup; ``dp`` is the group over which calibration
    data is split (its statistics are summed). A missing role or None means a group of one."""

    dp: object | None = None
    groups: dict = field(default_factory=dict)

    def group(self, role: GroupRole | None):
        return None if role is None else self.groups.get(GroupRole(role))

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


def check_groups(slots, ctx: ParallelContext) -> None:
    """Raise once, naming every sharded slot whose shard group the context does not hold: its
    global amax would silently be a per-shard amax."""
    missing = sorted({f"{s.name} (group {s.layout.shard_group!r})" for s in slots
                      if s.layout.is_sharded and ctx.group(s.layout.shard_group) is None})
    if missing:
        raise LayoutError("these weights are sharded over process groups the ParallelContext does "
                          "not name:\n  " + "\n  ".join(missing[:10])
                          + "\nPass ctx=megatron_context() / fsdp_context(model), or no ctx to detect it.")
