"""Restore: prepare a fresh model (any TP/EP/FSDP layout) to receive saved quantizer state, and
turn a model whose state was loaded into an exportable :class:`~nvfp4_dist.calib.pipeline.QuantResult`.

Restore creates the buffers from ``discover`` + the QuantConfig (not from checkpoint metadata):
the same code path serves every framework, needs no checkpoint access before the framework's own
load, and knows which keys to expect (see :mod:`nvfp4_dist.calib.checkpoint`).

Export from a checkpoint, in a new process and at any layout::

    result = restore(model, config, megatron_checkpoint=ckpt_dir)   # or dcp_checkpoint=...
    export_checkpoint(model, result, out_dir, config=hf_config)

:func:`clear_quantizer_state` undoes ``quantize()`` / :func:`init_quantizer_state` on a model
(fake-quant hooks and state buffers), so that a re-calibration starts from the plain model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError, ExportError
from ..layout.stats import StatsStore
from ..numerics.compact import UNSET
from ..numerics.constants import BLOCK_SIZE
from ..parallel.access import local_shards, local_tensor, local_weight
from ..parallel.context import ParallelContext, check_groups
from ..parallel.registry import detect_context, export_naming
from .apply import apply_states, remove_fake_quant
from .checkpoint import STATE_KEY, load_dcp_checkpoint, load_megatron_checkpoint
from .discover import Inventory, discover
from .pipeline import QuantResult
from .stages import Statistics
from .state import SlotState, read_state


def init_quantizer_state(model: nn.Module, config: QuantConfig | None = None,
                         ctx: ParallelContext | None = None) -> Inventory:
    """Prepare a fresh ``model`` (any TP/EP/FSDP layout) to receive saved quantizer state.

    Discovers the slots ``quantize(model, config)`` would calibrate, gives each one NaN-filled
    buffers of this rank's LOCAL shapes (``block_scale``/``dss_beta_code [rows_local,
    cin_local/16]``, ``dss_beta_code`` only with ``config.dss``, ``input_amax`` only with
    ``config.quantize_inputs``),
    installs the fake-quant forward and the checkpoint hooks. Then load as usual
    (``load_state_dict``, Megatron ``dist_checkpointing.load`` + ``load_state_dict``, torch DCP, or
    :func:`~nvfp4_dist.calib.checkpoint.load_megatron_checkpoint` /
    :func:`~nvfp4_dist.calib.checkpoint.load_dcp_checkpoint`): the model computes exactly as
    after ``quantize()``. ``config`` must match the saved run's method options (dss,
    quantize_inputs, include/exclude); a mismatch raises on load, naming the keys. The buffers
    are placeholders until loaded (NaN amaxes, one-byte codes 0, which no state holds), so a
    model used without its state computes NaN (its global scale is NaN) and fails loudly.
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
                global_amax=_nan((), w.device), block_scale=_unset(blocks, w.device),
                dss_beta_code=_unset(blocks, w.device) if config.dss else None,
                input_amax=_nan((), w.device) if config.quantize_inputs else None)
    apply_states(model, inv, states, config)
    return inv


def clear_quantizer_state(model: nn.Module) -> int:
    """Remove the fake-quant forward and every quantizer buffer (``*_nvfp4_*``) from the modules
    of ``model``: it computes with its own weights again and its checkpoints carry no quantizer
    state (the checkpoint hooks stay installed and add nothing). Returns the number of buffers
    removed. Local: no collective. ``quantize()`` or :func:`init_quantizer_state` afterwards
    attach a fresh, single set of state."""
    removed = 0
    for module in model.modules():
        remove_fake_quant(module)
        for name in [n for n, _ in module.named_buffers(recurse=False) if STATE_KEY.match(n)]:
            delattr(module, name)  # nn.Module: drops the buffer and its persistence flag
            removed += 1
    return removed


def _nan(shape, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


def _unset(shape, device) -> torch.Tensor:
    return torch.full(shape, UNSET, dtype=torch.uint8, device=device)


def _unloaded(value: torch.Tensor) -> bool:
    """A placeholder :func:`init_quantizer_state` made that no load filled (in part)."""
    return bool((value == UNSET).any() if value.dtype == torch.uint8 else torch.isnan(value).any())


def restored_result(model: nn.Module, inventory: Inventory, config: QuantConfig,
                    ctx: ParallelContext | None = None) -> QuantResult:
    """The QuantResult of ``model`` after its quantizer state was loaded into the buffers
    :func:`init_quantizer_state` made: each slot's state read back from them (this rank's
    shard). It exports like the calibrating run's result; it carries no statistics (its report
    has no Hessian columns) and no dead-expert record (a checkpoint does not hold one).
    Raises ExportError naming the weights whose state is still NaN (never loaded)."""
    ctx = ctx or detect_context(model)
    states, unloaded = {}, []
    with local_shards(model):
        for slot in inventory.slots:
            # FSDP2: the state is a DTensor sharded like the weight: this rank's part
            buffers = {k: local_tensor(v).detach()
                       for k, v in read_state(slot.module, slot.param_name, slot.expert).items()}
            if any(_unloaded(v) for v in buffers.values()):
                unloaded.append(slot.name)
                continue
            states[slot.name] = SlotState(
                global_amax=buffers["global_amax"], block_scale=buffers["block_scale"],
                method=config.method, dss_beta_code=buffers.get("dss_beta_code"),
                input_amax=buffers.get("input_amax"))
    if unloaded:
        raise ExportError(f"no quantizer state was loaded for {len(unloaded)} weight(s): "
                          + ", ".join(unloaded[:8]) + ("..." if len(unloaded) > 8 else "")
                          + "; load the checkpoint after init_quantizer_state(model, config)")
    statistics = Statistics(StatsStore(), {}, {}, observed=False)
    return QuantResult(config=config, inventory=inventory, states=states, statistics=statistics, model=model,
                       ctx=ctx, naming=export_naming(model, ctx))


def restore(model: nn.Module, config: QuantConfig | None = None, *, megatron_checkpoint=None,
            dcp_checkpoint=None, ctx: ParallelContext | None = None) -> QuantResult:
    """Load weights and quantizer state from a saved checkpoint into ``model`` (built at any
    TP/EP/FSDP layout, every rank calls it) and return an exportable QuantResult, without
    calibrating. ``config`` must name the saved run's ``dss``, ``quantize_inputs`` and
    include/exclude: a checkpoint without quantizer state, or with other settings, is refused
    naming the keys. Exactly one of ``megatron_checkpoint`` (a ``dist_checkpointing``
    directory) and ``dcp_checkpoint`` (torch DCP; also for one process) is given."""
    if (megatron_checkpoint is None) == (dcp_checkpoint is None):
        raise ConfigError("restore: give exactly one of megatron_checkpoint= and dcp_checkpoint=")
    config = config or QuantConfig()
    ctx = ctx or detect_context(model)
    inventory = init_quantizer_state(model, config, ctx)
    if megatron_checkpoint is not None:
        load_megatron_checkpoint(model, str(megatron_checkpoint))
    else:
        load_dcp_checkpoint(model, str(dcp_checkpoint))
    return restored_result(model, inventory, config, ctx)
