"""Restore: prepare a fresh model (any TP/EP/FSDP layout) to receive saved quantizer state.

Restore creates the buffers from ``discover`` + the QuantConfig (not from checkpoint metadata):
the same code path serves every framework, needs no checkpoint access before the framework's own
load, and knows which keys to expect (see :mod:`nvfp4_dist.calib.checkpoint`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..numerics.constants import BLOCK_SIZE
from ..parallel.access import local_shards, local_weight
from ..parallel.context import ParallelContext, check_groups
from ..parallel.registry import detect_context
from .apply import apply_states
from .discover import Inventory, discover
from .state import SlotState


def init_quantizer_state(model: nn.Module, config: QuantConfig | None = None,
                         ctx: ParallelContext | None = None) -> Inventory:
    """Prepare a fresh ``model`` (any TP/EP/FSDP layout) to receive saved quantizer state.

    Discovers the slots ``quantize(model, config)`` would calibrate, gives each one NaN-filled
    buffers of this rank's LOCAL shapes (``block_amax``/``dss_beta [rows_local, cin_local/16]``,
    ``dss_beta`` only with ``config.dss``, ``input_amax`` only with ``config.quantize_inputs``),
    installs the fake-quant forward and the checkpoint hooks. Then load as usual
    (``load_state_dict``, Megatron ``dist_checkpointing.load`` + ``load_state_dict``, torch DCP, or
    :func:`~nvfp4_dist.calib.checkpoint.load_megatron_checkpoint` /
    :func:`~nvfp4_dist.calib.checkpoint.load_dcp_checkpoint`): the model computes exactly as
    after ``quantize()``. ``config`` must match the saved run's method options (dss,
    quantize_inputs, include/exclude); a mismatch raises on load, naming the keys. The buffers
    are NaN until loaded, so a model used without its state fails loudly.
    """
    config = config or QuantConfig()
    ctx = ctx or detect_context(model)
    with local_shards(model):  # FSDP2: the DTensor shards, whose placements the state takes
        inv = discover(model, config, ctx)
        check_groups(inv.slots, ctx)
        states = {}
        for slot in inv.slots:
            w = local_weight(slot)
            blocks = (w.shape[0], w.shape[1] // BLOCK_SIZE)
            states[slot.name] = SlotState(
                global_amax=_nan((), w.device), block_amax=_nan(blocks, w.device),
                dss_beta=_nan(blocks, w.device) if config.dss else None,
                input_amax=_nan((), w.device) if config.quantize_inputs else None)
    apply_states(model, inv, states, config)
    return inv


def _nan(shape, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
