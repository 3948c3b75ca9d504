"""Roles of the process groups a layout spreads a weight or its statistics over.

A :class:`~nvfp4_dist.layout.slots.ShardLayout` names the group its shards live on by role, and
a :class:`~nvfp4_dist.parallel.context.ParallelContext` maps each role to the framework's
ProcessGroup. The enum's values are the short names used in messages (``str`` subclass: a role
compares equal to its value).
"""

from __future__ import annotations

import enum


class GroupRole(str, enum.Enum):
    """Which ranks a process group spans."""

    TP = "tp"  # Megatron tensor parallel (dense linears)
    ETP = "etp"  # Megatron expert tensor parallel (expert linears)
    EP = "ep"  # expert parallel: the ranks a layer's experts are spread over
    EDP = "edp"  # expert data parallel: the replicas of one expert
    FSDP = "fsdp"  # the FSDP2 mesh dimension that shards a weight
    PP = "pp"  # pipeline parallel: the ranks at one position of every pipeline stage

    def __str__(self) -> str:
        return self.value
