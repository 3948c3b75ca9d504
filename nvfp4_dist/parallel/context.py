"""ParallelContext: the named process groups a run uses; all None in a single process."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


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
