"""Per-slot quantizer state and its home on the module (buffers that checkpoints carry).

For a parameter ``p`` of a module, the buffers are (sharded like the weight):
  ``{p}_nvfp4_global_amax``    fp32 0-d (or [E] for fused experts)
  ``{p}_nvfp4_block_scale``    uint8 [rows, cin/16] (or [E, rows, cin/16]): the E4M3 bits of each
                               block's stored FP8 scale (:mod:`nvfp4_dist.numerics.compact`)
  ``{p}_nvfp4_dss_beta_code``  uint8 like block_scale, only when DSS ran: beta in hundredths
  ``{p}_nvfp4_input_amax``     fp32 0-d (or [E]), only for W4A4

One byte per block, not an fp32 block amax: the fake-quant and the export read nothing of a block
but its scale (and beta), and the state of a model's every weight is held at once (an fp32 amax
and an fp32 beta were a quarter of the bf16 weights' size; these are 1/16). :meth:`SlotState.block_amax`
and :meth:`SlotState.dss_beta` decode them, exactly, for the kernels that take fp32 values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.types import Method
from ..numerics.compact import BETA_UNIT, beta_of_codes, block_amax_of_bits
from ..parallel.fsdp import is_dtensor, state_like
from ..parallel.hf_experts_fsdp import attach_expert_state, expert_state
from ..layout.slots import WeightSlot, expert_stacks

SUFFIXES = ("global_amax", "block_scale", "dss_beta_code", "input_amax")
BLOCK_CODES = ("block_scale", "dss_beta_code")  # uint8, one per 16-element block
# the fill of an [E, ...] buffer's experts not (yet) attached: the smallest scale (what an amax
# of 0 gives), beta 1.0 (the bitwise identity), zero amaxes
FILL = {"global_amax": 0.0, "block_scale": 1, "dss_beta_code": BETA_UNIT, "input_amax": 0.0}


def buffer_name(param_name: str, suffix: str) -> str:
    return f"{param_name}_nvfp4_{suffix}"


@dataclass(frozen=True)
class SlotState:
    """Calibration result of one slot (local shard); later stages derive new states with
    ``dataclasses.replace`` (e.g. a dead expert's borrowed input amax)."""

    global_amax: torch.Tensor = field(repr=False)  # fp32 0-d
    block_scale: torch.Tensor = field(repr=False)  # uint8 [rows, cin/16]: E4M3 bits of the scales
    method: Method = Method.MAX
    dss_beta_code: torch.Tensor | None = field(default=None, repr=False)  # uint8: beta in hundredths
    input_amax: torch.Tensor | None = field(default=None, repr=False)
    tokens: int = 0
    dead: bool = False  # no calibration token reached this weight (after the reduce)
    empty_blocks: int = 0  # local 16-channel block columns whose Hessian was empty (MSE instead)

    def block_amax(self) -> torch.Tensor:
        """fp32 block amaxes whose scales are :attr:`block_scale` (what a sweep chose, exactly)."""
        return block_amax_of_bits(self.block_scale, self.global_amax)

    def dss_beta(self) -> torch.Tensor | None:
        """fp32 DSS betas (None without DSS)."""
        return None if self.dss_beta_code is None else beta_of_codes(self.dss_beta_code)


def attach_state(slot: WeightSlot, state: SlotState) -> None:
    """Store ``state`` as buffers on ``slot.module`` (expert slots fill their index)."""
    values = {suffix: getattr(state, suffix) for suffix in SUFFIXES}
    for suffix, value in values.items():
        if value is not None:
            attach_buffer(slot, suffix, value)


def attach_states(slots, states: dict) -> None:
    """:func:`attach_state` of every slot (``states``: slot name -> SlotState), the fused experts
    of a plain 3-D parameter a projection at a time: each ``[E, ...]`` buffer from one stack of
    the experts' values, or, where the values are the consecutive slices of one stacked tensor
    (the stacked search's block state), that tensor itself, shared like a dense slot's. The
    buffers hold what one :func:`attach_buffer` per expert writes."""
    stacks, rest = expert_stacks(slots)
    for param, members in stacks:
        if len({s.expert for s in members}) != len(members) or not param.shape[0]:
            rest += members
            continue
        for suffix in SUFFIXES:
            values = {s.expert: getattr(states[s.name], suffix) for s in members}
            _attach_stacked(members[0], suffix, {e: v for e, v in values.items() if v is not None},
                            param.shape[0])
    for slot in rest:
        attach_state(slot, states[slot.name])


def _stacked_base(values: dict[int, torch.Tensor], n_experts: int) -> torch.Tensor | None:
    """The ``[E, ...]`` tensor whose slice ``e`` is ``values[e]`` for every expert, when the
    values are exactly its slices (no copy needed), else None."""
    if len(values) != n_experts:
        return None
    base = next(iter(values.values()))._base
    if base is None or base.dtype != values[0].dtype or base.shape != (n_experts, *values[0].shape):
        return None
    for e, v in values.items():
        if (v._base is not base or v.stride() != base.stride()[1:]
                or v.storage_offset() != base.storage_offset() + e * base.stride(0)):
            return None
    return base


def _attach_stacked(slot: WeightSlot, suffix: str, values: dict[int, torch.Tensor], n_experts: int) -> None:
    """One buffer of a projection's experts: ``values`` (expert -> its tensor) written as
    :func:`attach_buffer` writes each (an expert without a value keeps the buffer's entry: the
    neutral fill in a new buffer)."""
    if not values:
        return
    values = dict(sorted(values.items()))
    module, name = slot.module, buffer_name(slot.param_name, suffix)
    first = next(iter(values.values()))
    buf = getattr(module, name, None)
    fresh = buf is None or buf.shape[1:] != first.shape
    every = list(values) == list(range(n_experts))
    with torch.no_grad():
        base = _stacked_base(values, n_experts) if every else None
        if base is not None and base.device == first.device:
            if fresh:
                module.register_buffer(name, base, persistent=True)
            elif buf is not base:
                buf.copy_(base)
            return
        device = first.device if fresh else buf.device
        stacked = torch.stack([state_tensor(suffix, v).to(device) for v in values.values()])
        if fresh and every:
            module.register_buffer(name, stacked, persistent=True)
            return
        if fresh:
            buf = torch.full((n_experts, *first.shape), FILL[suffix], dtype=stacked.dtype, device=device)
            module.register_buffer(name, buf, persistent=True)
        if every:
            buf.copy_(stacked)
        else:
            buf[torch.tensor(list(values), device=device)] = stacked


def state_tensor(suffix: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the dtype of its buffer: uint8 codes per block, fp32 amaxes."""
    value = value.detach()
    if suffix in BLOCK_CODES:
        if value.dtype != torch.uint8:
            raise TypeError(f"{suffix} is held as uint8 codes, got {value.dtype}")
        return value
    return value.float()


def attach_buffer(slot: WeightSlot, suffix: str, value: torch.Tensor) -> None:
    """Store one quantizer tensor of ``slot`` (this rank's shard) as a persistent buffer.

    Dense slots: the buffer is ``value`` (FSDP2: a DTensor sharded like the weight). Fused-expert
    slots: ``value`` fills the expert's index of an ``[E, ...]`` buffer, created on first use with
    the neutral :data:`FILL` for experts not yet attached.
    """
    module, name = slot.module, buffer_name(slot.param_name, suffix)
    value = state_tensor(suffix, value)
    if slot.expert is None:
        # no copy: the buffer shares storage with ``value`` (the QuantResult's state), which
        # would otherwise be held twice (1.6 GiB per copy of an 8B model's block amaxes)
        module.register_buffer(name, state_like(slot.parameter(), value), persistent=True)
        return
    if is_dtensor(slot.parameter()):  # FSDP2 experts: a DTensor buffer sharded like the weight
        attach_expert_state(module, name, slot.parameter(), slot.expert, value, FILL[suffix])
        return
    n_experts = slot.parameter().shape[0]
    buf = getattr(module, name, None)
    if buf is None or buf.shape[1:] != value.shape:
        buf = torch.full((n_experts, *value.shape), FILL[suffix], dtype=value.dtype, device=value.device)
        module.register_buffer(name, buf, persistent=True)
    buf[slot.expert] = value


def read_state(module: torch.nn.Module, param_name: str, expert: int | None = None) -> dict:
    """The quantizer buffers of one parameter (one expert's slice when ``expert`` is given)."""
    out = {}
    for suffix in SUFFIXES:
        buf = getattr(module, buffer_name(param_name, suffix), None)
        if buf is not None:
            out[suffix] = buf if expert is None else expert_state(buf, expert)
    return out


def has_state(module: torch.nn.Module, param_name: str) -> bool:
    return hasattr(module, buffer_name(param_name, "block_scale"))


def read_state_values(module: torch.nn.Module, param_name: str, expert: int | None = None) -> dict:
    """:func:`read_state` decoded to fp32 values: ``global_amax``, ``block_amax`` (the amaxes
    whose scales are stored), ``dss_beta`` and ``input_amax`` where present (for inspection and
    the reference numerics; FSDP2 DTensor buffers stay DTensors, as read)."""
    state = read_state(module, param_name, expert)
    out = {k: state[k] for k in ("global_amax", "input_amax") if k in state}
    if "block_scale" in state:
        out["block_amax"] = block_amax_of_bits(state["block_scale"], state["global_amax"])
    if "dss_beta_code" in state:
        out["dss_beta"] = beta_of_codes(state["dss_beta_code"])
    return out
