"""WeightSlot and ShardLayout: the one description of a quantizable weight, as this rank sees it.

Everything downstream of discovery (observers, reduce, search, apply, persist, export) reads the
layout from the slot; no other module asks which framework a module came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LayoutError
from ..numerics.constants import BLOCK_SIZE
from .roles import GroupRole


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard sits in the logical ``[cout, cin]`` weight.

    shard_axis: 0 when rows (cout) are split (column-parallel, FSDP dim-0), 1 when input
        channels are split (row-parallel), None when this rank holds the whole weight.
    shard_group: role of the process group the shards are spread over (a
        :class:`~nvfp4_dist.layout.roles.GroupRole`, looked up in the run's ParallelContext),
        None when not split.
    """

    global_shape: tuple[int, int]
    local_shape: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    shard_axis: int | None = None
    shard_group: GroupRole | None = None

    def __post_init__(self):
        if self.shard_axis not in (None, 0, 1):
            raise LayoutError(f"shard_axis must be None, 0 or 1, got {self.shard_axis}")
        for axis in (0, 1):
            if self.offset[axis] + self.local_shape[axis] > self.global_shape[axis]:
                raise LayoutError(f"shard {self.local_shape} at {self.offset} exceeds {self.global_shape}")
        # Only a split of the input channels has block boundaries to respect; a whole weight whose
        # cin is not a multiple of 16 is skipped (or refused) by discovery, with its name.
        if self.shard_axis == 1 and (self.offset[1] % BLOCK_SIZE or self.local_shape[1] % BLOCK_SIZE):
            raise LayoutError(
                f"input-channel shard [{self.offset[1]}, {self.offset[1] + self.local_shape[1]}) of a "
                f"weight with cin={self.global_shape[1]} does not fall on 16-channel NVFP4 block "
                "boundaries; choose a tensor-parallel size that divides cin/16")

    @classmethod
    def whole(cls, shape) -> "ShardLayout":
        shape = (int(shape[0]), int(shape[1]))
        return cls(global_shape=shape, local_shape=shape)

    @classmethod
    def split(cls, global_shape, axis: int, rank: int, world: int, group: GroupRole) -> "ShardLayout":
        """Even split of ``global_shape`` along ``axis`` into ``world`` parts; this is part ``rank``."""
        global_shape = (int(global_shape[0]), int(global_shape[1]))
        if global_shape[axis] % world:
            raise LayoutError(f"dimension {axis} of {global_shape} is not divisible by {world}")
        size = global_shape[axis] // world
        local = list(global_shape)
        local[axis] = size
        offset = [0, 0]
        offset[axis] = rank * size
        return cls(global_shape, tuple(local), tuple(offset), axis, group)

    @property
    def is_sharded(self) -> bool:
        return self.shard_axis is not None and self.local_shape != self.global_shape


@dataclass(frozen=True)
class ExportPart:
    """One exported module cut from a slot: ``name`` (module FQN in the exported model) and the
    slot's global rows it takes: a ``slice``, or a 1-D int64 tensor of row indices when the rows
    are interleaved (e.g. Megatron's fused ``linear_qkv`` with grouped-query heads)."""

    name: str
    rows: object


@dataclass(frozen=True)
class ExpertInfo:
    """Where an MoE expert's weight sits among its siblings (the same at every EP size).

    index: global expert index in its layer (0 .. count-1), whichever rank holds it.
    count: experts in the layer (global).
    family: key shared by the same projection of every expert of one layer (e.g.
        ``model.layers.0.mlp.experts.gate_up_proj``): dead-expert fallbacks and the report group by it.
    group: role of the process group the layer's experts are spread over (expert parallel), None
        when every expert is local.
    data_group: role of the group over which this expert's statistics are summed instead of the
        context's ``dp`` (Megatron: the expert-data-parallel ranks holding the same expert); None
        keeps ``dp``. A role the context lacks means no reduce (every rank saw all the data).
    """

    index: int
    count: int
    family: str
    group: GroupRole | None = None
    data_group: GroupRole | None = None


@dataclass(frozen=True, eq=False)
class WeightSlot:
    """One quantizable weight.

    name: logical name of the weight's module in the full model (e.g. ``model.layers.0.mlp.down_proj``,
        or ``...experts.3.gate_up_proj`` for an expert slice); unique per weight.
    module / param_name: where the parameter lives on this rank.
    expert: index into the leading dimension of a 3-D fused-experts parameter, else None.
    layout: this rank's shard of the logical ``[cout, cin]`` weight.
    fused_group: slots with the same key share one global amax (q/k/v, gate/up).
    stats_key: key of the input statistics (Hessian, tokens, amax) that feed this slot.
    sequence_parallel: inputs are split over the sequence across ``layout.shard_group`` ranks
        (the statistics are then summed over that group too).
    export_parts: how the slot's rows map to exported module names.
    moe: the expert this weight belongs to (None for dense weights).
    """

    name: str
    module: nn.Module = field(repr=False)
    param_name: str
    layout: ShardLayout
    fused_group: str
    stats_key: str
    expert: int | None = None
    sequence_parallel: bool = False
    export_parts: tuple[ExportPart, ...] = ()
    moe: ExpertInfo | None = None

    def parameter(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)

    def parts(self) -> tuple[ExportPart, ...]:
        return self.export_parts or (ExportPart(self.name, slice(0, self.layout.global_shape[0])),)


def expert_stacks(slots) -> tuple[list[tuple[torch.Tensor, list[WeightSlot]]], list[WeightSlot]]:
    """``(stacks, rest)``: the fused-expert slots that read whole slices of one plain 3-D
    parameter, grouped by parameter (``(param.data [E, rows, cin], its slots in the given
    order)``, in order of first appearance), and every other slot in the given order.

    What a stage computes per expert (finiteness, amax) it then computes once per 3-D parameter
    and indexes by ``slot.expert``: a few tensor operations per projection instead of per
    expert. A DTensor parameter (FSDP2) or a slot holding part of its expert stays in ``rest``.
    """
    stacks: dict[tuple[int, str], tuple[torch.Tensor, list[WeightSlot]]] = {}
    rest = []
    for slot in slots:
        if slot.expert is not None and not slot.layout.is_sharded:
            key = (id(slot.module), slot.param_name)
            if key not in stacks:
                param = slot.parameter()
                if param.dim() != 3 or hasattr(param, "device_mesh"):
                    rest.append(slot)
                    continue
                stacks[key] = (param.data, [])
            stacks[key][1].append(slot)
        else:
            rest.append(slot)
    return list(stacks.values()), rest
