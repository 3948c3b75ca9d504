"""How a layout exports the tensors it does not quantize, and under which names.

Each layout (plain / FSDP2 DTensors, Megatron tensor parallelism) describes an unquantized state
tensor as a :class:`PassThrough`: the exported keys and rows it becomes, and how this rank holds
it (whole, or a shard along an axis of a process group). An :class:`ExportNaming` makes those
descriptions for one model and maps module names of the run (its ignore list) to exported names;
the parallel layer provides one per layout and ``quantize()`` records it in its result, so the
exporter never asks which framework a model came from.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class PassThrough:
    """How one unquantized state tensor is exported and held.

    outputs: ``(exported key, rows)`` pairs; rows (a slice or int64 index tensor) select rows of
        the whole tensor (e.g. Megatron's fused qkv of an unquantized layer -> q/k/v weights).
    axis / offset / group: the tensor is split along ``axis`` over ``group`` and this rank's
        piece starts at ``offset`` (axis None: this rank holds it whole).
    """

    outputs: tuple[tuple[str, object], ...]
    axis: int | None = None
    offset: int = 0
    group: object = field(default=None, repr=False)


class ExportNaming(abc.ABC):
    """Exported names of one layout (see the module docstring)."""

    @abc.abstractmethod
    def passthrough(self, key: str, module: nn.Module, tensor: torch.Tensor) -> PassThrough:
        """The export of state tensor ``key`` of ``module`` (as this rank holds ``tensor``)."""

    def module_names(self, model: nn.Module, names) -> list[str]:
        """Exported module names of the run's modules ``names`` (default: the same names)."""
        return list(names)
