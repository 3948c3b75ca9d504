"""What one rank holds of the export: its pieces, and what the other ranks must know about them.

A :class:`Piece` is one unit of the checkpoint as this rank holds it: a quantized slot (its
shard of the packed codes and FP8 scales) or an unquantized state tensor (named by the layout's
:class:`~nvfp4_dist.layout.naming.ExportNaming`). A piece held whole has ``axis`` None; a shard
says along which axis of which process group it is split and where this rank's part starts.
Its key is the same on every rank that holds part or all of it (the slot name, or the first
exported name of a pass-through tensor), which is how the plan finds its holders.

Codes are packed only when the piece is written or gathered (``Piece.local()``): a rank that
holds a replica another rank writes never quantizes it.

:class:`RankInventory` is the small, picklable summary exchanged between ranks: piece keys in
this rank's order, tied duplicates, the global amax of every exported NVFP4 module, the modules
left dense, the ignore list and every problem found. Problems are collected, never raised here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..calib.pipeline import QuantResult
from ..calib.state import SUFFIXES, SlotState
from ..kernels.dispatch import quantize_pack_weight
from ..kernels.types import KernelImpl
from ..layout.naming import PassThrough
from ..layout.slots import WeightSlot
from ..parallel.access import local_tensor, local_weight
from ..parallel.hf_experts_fsdp import held_elsewhere
from .formats import ExportFormat, build_tensors

Tensors = dict[str, torch.Tensor]


def quantize_pack(w: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                  dss_beta: torch.Tensor | None = None,
                  kernels: KernelImpl = KernelImpl.AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes (uint8 ``[rows, cin // 2]``) and FP8 block scales (float8_e4m3fn
    ``[rows, cin // 16]``) of ``w [rows, cin]``: exactly the codes the fake-quant forward uses
    (DSS: codes from the quant scale fl(beta * d), the stored scale unchanged).

    The one place the export turns weights into codes: the kernels' cast/pack (Triton on CUDA,
    the torch reference elsewhere; both bit-identical to the fake-quant numerics).
    """
    return quantize_pack_weight(w, block_amax, global_amax, dss_beta, kernels=kernels)


@dataclass
class Piece:
    """One exported unit as this rank holds it (see the module docstring).

    local: this rank's tensors (computed on demand). offsets: per tensor, where this rank's part
    starts along ``axis``. emit: the whole tensors -> ``(exported key, tensor)`` pairs.
    """

    key: str
    local: Callable[[], Tensors]
    emit: Callable[[Tensors], Iterable[tuple[str, torch.Tensor]]]
    axis: int | None = None
    offsets: dict[str, int] = field(default_factory=dict)
    group: object = None


@dataclass(frozen=True)
class RankInventory:
    """What a rank tells the others before anything is written (picklable, small).

    keys: its piece keys, in its state_dict order. tied: keys of its pieces that are tied to an
    earlier one (written once, under the first name). parts: ``(exported NVFP4 module, slot
    name, fp32 0-d global amax on the CPU)`` in slot order. dense: modules it exports in high
    precision. ignore: exported names of the modules the run kept in high precision.
    """

    keys: tuple[str, ...]
    tied: frozenset[str]
    parts: tuple[tuple[str, str, torch.Tensor], ...]
    dense: tuple[str, ...]
    ignore: tuple[str, ...]
    problems: tuple[str, ...]


def is_quantizer_buffer(key: str) -> bool:
    """A quantizer state buffer (``<param>_nvfp4_<suffix>``): never exported, the formats
    carry the state in their own tensors."""
    leaf = key.rpartition(".")[2]
    return "_nvfp4_" in leaf and leaf.rsplit("_nvfp4_", 1)[1] in SUFFIXES


def _storage_key(t: torch.Tensor) -> tuple | None:
    """Identity of a tensor's memory: tied parameters (one storage, same view) share it. None
    for an empty tensor (an FSDP2 rank may hold no rows; empty tensors share no data)."""
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _rows(rows, device):
    return rows.to(device) if isinstance(rows, torch.Tensor) else rows


def _slot_piece(fmt: ExportFormat, slot: WeightSlot, state: SlotState, w4a4: bool, result: QuantResult,
                kernels: KernelImpl) -> Piece:
    layout = slot.layout
    axis = layout.shard_axis if layout.is_sharded else None
    # Packed codes hold 2 input channels per byte, FP8 scales one per 16-channel block: an input
    # channel split (row parallel) becomes a column offset in each; a row split stays as it is.
    offsets = {"packed": layout.offset[1] // 2 if axis == 1 else layout.offset[0],
               "scale": layout.offset[1] // 16 if axis == 1 else layout.offset[0]}
    input_amax = state.input_amax if w4a4 else None

    def local():
        packed, scale = quantize_pack(local_weight(slot).detach(), state.block_scale, state.global_amax,
                                      state.dss_beta_code, kernels)
        return {"packed": packed, "scale": scale}

    def emit(whole):
        for part in slot.parts():
            rows = _rows(part.rows, whole["packed"].device)
            yield from build_tensors(fmt, part.name, whole["packed"][rows], whole["scale"][rows],
                                     state.global_amax, input_amax).items()

    return Piece(slot.name, local, emit, axis, offsets,
                 result.ctx.group(layout.shard_group) if axis is not None else None)


def _passthrough_piece(spec: PassThrough, tensor: torch.Tensor) -> Piece:
    def emit(whole, outputs=spec.outputs):
        t = whole["t"]
        return [(name, t[_rows(rows, t.device)]) for name, rows in outputs]

    return Piece(spec.outputs[0][0], lambda: {"t": local_tensor(tensor).detach()}, emit, spec.axis,
                 {"t": spec.offset}, spec.group)


def _slot_problems(slots: list[WeightSlot], names: dict[int, str], result: QuantResult,
                   w4a4: bool) -> tuple[dict[str, list[WeightSlot]], list[str]]:
    """state_dict key -> its slots (slot order), and the problems of the quantized slots."""
    problems: list[str] = []
    by_key: dict[str, list[WeightSlot]] = defaultdict(list)
    for slot in slots:
        module_name = names.get(id(slot.module))
        if module_name is None:
            problems.append(f"{slot.name}: its module is not part of the exported model")
            continue
        state = result.states.get(slot.name)
        if state is None:
            problems.append(f"{slot.name}: no calibration state in the QuantResult; run quantize() first")
        elif w4a4 and state.input_amax is None:
            problems.append(f"{slot.name}: W4A4 export needs an input amax; calibrate with a forward_loop")
        if local_weight(slot).device.type == "meta":
            problems.append(f"{slot.name}: a meta tensor (no data); materialise the model before exporting")
        by_key[f"{module_name}.{slot.param_name}" if module_name else slot.param_name].append(slot)
    for key, members in by_key.items():
        param = members[0].parameter()
        if param.dim() == 3 and len({s.expert for s in members}) != param.shape[0]:
            problems.append(f"{key}: only {len(members)} of {param.shape[0]} experts are quantized; a "
                            "fused-experts parameter is exported whole or not at all (adjust include/exclude)")
    return by_key, problems


def _sharding_problem(piece: Piece) -> str | None:
    if piece.axis is not None and piece.group is None:
        return (f"{piece.key}: this rank holds a shard along axis {piece.axis} but the layout names "
                "no process group to gather it over")
    return None


def local_pieces(model: nn.Module, result: QuantResult, fmt: ExportFormat, w4a4: bool,
                 kernels: KernelImpl) -> tuple[list[Piece], RankInventory]:
    """This rank's pieces in state_dict order (a quantized parameter's slots at its place, in
    slot order) and its inventory. Skipped: quantizer buffers, ``._extra_state`` (Megatron /
    TransformerEngine bookkeeping), non-tensor entries and tied duplicates."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    modules = dict(model.named_modules())
    slots = list(result.slots)
    by_key, problems = _slot_problems(slots, names, result, w4a4)
    emitted: set[str] = set()
    pieces: list[Piece] = []
    parts: list[tuple[str, str, torch.Tensor]] = []
    dense: list[str] = []
    tied: set[str] = set()
    seen: dict[tuple, str] = {}

    def add_slots(key):
        for slot in by_key[key]:
            state = result.states.get(slot.name)
            if state is None:
                continue  # a problem already
            if held_elsewhere(slot):
                continue  # an expert another rank holds whole (FSDP2 experts axis): it exports it
            pieces.append(_slot_piece(fmt, slot, state, w4a4, result, kernels))
            amax = state.global_amax.detach().float().cpu()
            parts.extend((part.name, slot.name, amax) for part in slot.parts())
        emitted.add(key)

    for key, tensor in model.state_dict().items():
        if key in by_key:
            add_slots(key)
            continue
        if (is_quantizer_buffer(key) or key.endswith("._extra_state")
                or not isinstance(tensor, torch.Tensor)):
            continue
        local = local_tensor(tensor).detach()
        if local.device.type == "meta":
            problems.append(f"{key}: a meta tensor (no data); materialise the model before exporting")
            continue
        spec = result.naming.passthrough(key, modules.get(key.rpartition(".")[0], model), tensor)
        piece = _passthrough_piece(spec, tensor)
        storage = _storage_key(local)
        if storage is not None and storage in seen:
            tied.add(piece.key)  # tied to seen[storage] (e.g. lm_head and the embeddings): written once
            continue
        if storage is not None:
            seen[storage] = piece.key
        pieces.append(piece)
        dense += [name[: -len(".weight")] for name, _ in spec.outputs if name.endswith(".weight")]
    for key in by_key:  # parameters missing from the state_dict (none in the usual layouts)
        if key not in emitted:
            add_slots(key)
    problems += [p for p in map(_sharding_problem, pieces) if p is not None]
    ignore = tuple(result.naming.module_names(model, result.ignored))
    inventory = RankInventory(tuple(p.key for p in pieces), frozenset(tied), tuple(parts), tuple(dense),
                              ignore, tuple(problems))
    return pieces, inventory
