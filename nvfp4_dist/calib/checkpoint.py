"""Quantizer state in the framework's own checkpoints: Megatron dist_checkpointing, torch DCP,
plain ``state_dict``; and restoring it into a fresh model at another layout.

The state lives in persistent buffers next to each weight (:mod:`nvfp4_dist.calib.state`):
``{param}_nvfp4_{global_amax,block_scale,dss_beta_code,input_amax}`` (fp32 amaxes, one uint8
code per 16-element block). Per framework:

* plain ``state_dict`` / ``load_state_dict``: the buffers are ordinary persistent buffers.
* torch DCP with FSDP2: the buffers are DTensors sharded like the weight
  (:func:`nvfp4_dist.parallel.fsdp.state_like`), so DCP reshards them like any parameter
  (2 ranks -> 1, 1 -> 2).
* Megatron ``sharded_state_dict``: Megatron's default wraps unknown tensors as replicated over
  TP, which would keep one TP rank's block scales only, and expert buffers would carry local
  indices. :func:`add_quantizer_sharded_state` replaces each buffer's entry with one DERIVED from
  the weight's own entry, so every transformation Megatron applied to the weight applies to its
  state: the layer axis a TransformerBlock prepends, the global expert axis (or the
  ``experts.{g}.`` key of ``singleton_local_shards``) a SequentialMLP prepends, the TP axis and
  fragmentation, DP replica ids, and the gate/up split of a gated ``linear_fc1`` (its
  ShardedTensorFactory is reused on the state). Key scheme, with one worked example: the
  SequentialMLP weight Megatron saves as ``decoder.layers.mlp.experts.experts.linear_fc1.weight``
  (global ``[L, E, 2F, H]``, rows split over expert TP) gives
  ``decoder.layers.mlp.experts.experts.linear_fc1.weight_nvfp4_block_scale`` (global
  ``[L, E, 2F, H/16]``, split the same way) and ``..._nvfp4_global_amax`` (global ``[L, E]``,
  replicated over TP: written by the piece at TP offset 0 of (expert-)data-parallel replica 0
  only). The global expert index is an axis, never part of a local name.

Why a wrapper on the ROOT model's ``sharded_state_dict`` (installed by ``quantize()`` and
:func:`~nvfp4_dist.calib.restore.init_quantizer_state`) rather than on each linear: the gate/up
factory is applied by the MLP above the linear and the expert axis by the SequentialMLP above
that, after the linear returns; only a pass over the finished dict sees the weight's final entry. Wrapping the method
keeps the usual flow unchanged, including Megatron's own training-loop checkpointing, which calls
``model.sharded_state_dict()`` through its DDP/Float16 wrappers::

    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)          # after quantize()
                                                          # (or save_megatron_checkpoint; CLI --save-dist-ckpt)
    init_quantizer_state(fresh_model, config)                              # any TP/EP layout
    state = dist_checkpointing.load(fresh_model.sharded_state_dict(), ckpt_dir)
    fresh_model.load_state_dict(state)                                     # fake-quant as after quantize()

Restore (:mod:`nvfp4_dist.calib.restore`) creates NaN-filled buffers from ``discover`` + the
QuantConfig. Every slot of a run carries the same set of buffers (a DSS run gives
weight-only-calibrated slots beta = 1.0, the bitwise identity), because a stacked Megatron tensor
must be fully covered when saved. Checkpoints written before the state was kept as one-byte codes
(fp32 ``_nvfp4_block_amax`` / ``_nvfp4_dss_beta``) are refused by name: they must be calibrated
again.

Errors: a load whose quantizer keys differ from the model's (no state in the checkpoint, DSS
betas or input amaxes missing or extra) raises :class:`~nvfp4_dist.errors.ExportError` naming
the keys and the fix: from ``load_state_dict`` (a post-hook), and before any read from
:func:`load_megatron_checkpoint` / :func:`load_dcp_checkpoint`, which check the checkpoint's
metadata first (the frameworks' own loaders raise their own missing-key errors, or ignore
checkpoint keys the model does not request).
"""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import ExportError, LayoutError
from ..layout.slots import WeightSlot
from ..numerics.compact import BETA_UNIT
from ..numerics.constants import BLOCK_SIZE
from ..parallel.access import local_shards, local_weight
from .state import SUFFIXES, attach_buffer, buffer_name, has_state

STATE_KEY = re.compile(r"^(?P<param>.+)_nvfp4_(?P<suffix>" + "|".join(SUFFIXES) + r")$")
# the fp32 block state of nvfp4_dist 0.1.0's first checkpoints, now one-byte codes
LEGACY_KEY = re.compile(r"_nvfp4_(block_amax|dss_beta)$")
PER_TENSOR = ("global_amax", "input_amax")  # 0-d per weight; the rest are per 16-channel block
_LOAD_CHECK = "_nvfp4_load_check_handle"


def register_checkpoint_state(model: nn.Module, slots: list[WeightSlot], config: QuantConfig) -> None:
    """Make ``model``'s quantizer state travel with its checkpoints (idempotent): every slot gets
    the same buffers, ``load_state_dict`` checks the quantizer keys, and a Megatron model's
    ``sharded_state_dict`` carries the state sharded like the weights (module docstring)."""
    _complete_state(model, slots, config)
    if getattr(model, _LOAD_CHECK, None) is None:
        setattr(model, _LOAD_CHECK, model.register_load_state_dict_post_hook(_check_loaded_keys))
    method = getattr(model, "sharded_state_dict", None)
    if callable(method) and getattr(method, "__func__", None) is not _sharded_state_dict:
        # A method bound to the model (not a closure): copy.deepcopy rebinds it to the copy.
        model.sharded_state_dict = types.MethodType(_sharded_state_dict, model)


def _sharded_state_dict(model: nn.Module, prefix: str = "", *args, **kwargs) -> dict:
    """``model``'s class ``sharded_state_dict`` with the quantizer state added."""
    sharded = type(model).sharded_state_dict(model, prefix, *args, **kwargs)
    return add_quantizer_sharded_state(model, sharded, prefix)


def _complete_state(model: nn.Module, slots: list[WeightSlot], config: QuantConfig) -> None:
    """Under DSS, a slot whose search ran weight-only (no token reached it) has no beta: give it
    beta = 1.0, for which ``fl(1.0 * d) = d`` makes the fake-quant bitwise unchanged."""
    if not config.dss:
        return
    with local_shards(model):
        for slot in slots:
            # the buffers' presence, not their values (no per-expert slicing of a 3-D state): once
            # a fused expert's beta buffer exists, its other experts hold the fill 1.0 or their own
            if not hasattr(slot.module, buffer_name(slot.param_name, "dss_beta_code")) and has_state(
                    slot.module, slot.param_name):
                w = local_weight(slot)
                ones = torch.full((w.shape[0], w.shape[1] // BLOCK_SIZE), BETA_UNIT, dtype=torch.uint8,
                                  device=w.device)  # beta 1.0
                attach_buffer(slot, "dss_beta_code", ones)


# ---------------------------------------------------------------------------------- Megatron


def add_quantizer_sharded_state(model: nn.Module, sharded_state_dict: dict, prefix: str = "") -> dict:
    """Replace (or add) the entry of every quantizer buffer of ``model`` in Megatron's flat
    ``sharded_state_dict`` (as ``model.sharded_state_dict(prefix)`` returned it) with one derived
    from its weight's entry; returns the same dict. See the module docstring.

    A weight's entry is found by the parameter it holds (Megatron's wrappers, e.g. Float16Module
    and DDP, return their inner module's keys without their own ``module.`` prefix), else by name.
    """
    by_param = {id(entry.data): key for key, entry in sharded_state_dict.items()
                if isinstance(getattr(entry, "data", None), torch.Tensor)}
    missing = []
    for module_name, module in model.named_modules():
        for param, suffix, buf in _state_buffers(module):
            weight_key = by_param.get(id(module._parameters[param]))
            if weight_key is None:
                weight_key = f"{prefix}{module_name}.{param}" if module_name else f"{prefix}{param}"
            weight = sharded_state_dict.get(weight_key)
            if weight is None:
                missing.append(weight_key)
                continue
            derived = _derive(weight, buffer_name(weight.key, suffix), buf, suffix in PER_TENSOR)
            sharded_state_dict[buffer_name(weight_key, suffix)] = derived
    if missing:
        raise LayoutError("cannot place quantizer state in the sharded state dict: it has no entry "
                          f"for the weights {sorted(set(missing))[:8]}; call sharded_state_dict() on "
                          "the model quantize() / init_quantizer_state() was given")
    return sharded_state_dict


def _state_buffers(module: nn.Module):
    """(param, suffix, buffer) of ``module``'s own quantizer buffers."""
    for name, buf in module.named_buffers(recurse=False):
        match = STATE_KEY.match(name)
        if match is not None and match["param"] in module._parameters:
            yield match["param"], match["suffix"], buf


def _derive(weight, key: str, data: torch.Tensor, per_tensor: bool):
    """The ShardedTensor (or factory) of quantizer tensor ``data`` under ``key``, sharded like
    the weight's entry ``weight``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(weight, ShardedTensor):
        return _per_tensor(weight, key, data) if per_tensor else _per_block(weight, key, data)
    if not isinstance(weight, ShardedTensorFactory):
        raise LayoutError(f"{key}: the weight's sharded entry is a {type(weight).__name__}; only "
                          "ShardedTensor and ShardedTensorFactory weights can carry quantizer state")
    pieces = list(nested_values(weight.build()))
    if per_tensor:  # replicated over the weight's pieces: derived from the first one
        return _per_tensor(pieces[0], key, data)
    derived = ShardedTensorFactory(key, data, weight.build_fn, weight.merge_fn, weight.replica_id,
                                   flattened_range=weight.flattened_range)
    ours = list(nested_values(derived.build()))
    expected = [_per_block(p, key, torch.empty(_blocks(p.local_shape), device="meta")) for p in pieces]
    geometry = ("local_shape", "global_shape", "global_offset", "axis_fragmentations", "replica_id")
    if len(ours) != len(expected) or any(getattr(o, f) != getattr(e, f) for o, e in zip(ours, expected)
                                         for f in geometry):
        raise LayoutError(f"{key}: the weight's ShardedTensorFactory does not split its per-block "
                          "state the way it splits the weight; this weight layout is not supported")
    return derived


def _blocks(shape) -> tuple[int, ...]:
    # The input-channel axis is last; shards hold whole 16-channel blocks (ShardLayout checks it),
    # so shapes and offsets divide exactly.
    return (*shape[:-1], shape[-1] // BLOCK_SIZE)


def _per_block(weight, key: str, data: torch.Tensor):
    if tuple(data.shape) != _blocks(weight.local_shape):
        raise LayoutError(f"{key}: local shape {tuple(data.shape)} does not match the weight's "
                          f"{tuple(weight.local_shape)} (expected {_blocks(weight.local_shape)})")
    return dataclasses.replace(weight, key=key, data=data, dtype=data.dtype, local_shape=tuple(data.shape),
                               global_shape=_blocks(weight.global_shape),
                               global_offset=_blocks(weight.global_offset))


def _per_tensor(weight, key: str, data: torch.Tensor):
    """0-d state: only the prepended axes (layer, global expert) remain; replicated over the
    weight's own shards, so the piece at offset 0 alone stays a main replica."""
    if data.dim() != 0:
        raise LayoutError(f"{key}: per-tensor quantizer state must be 0-d, got {tuple(data.shape)}")
    n = weight.prepend_axis_num
    index = 0  # linear index of this piece among the weight's shards (Megatron: the TP rank)
    for axis in range(n, len(weight.global_shape)):
        size = weight.local_shape[axis - n]
        index = index * weight.axis_fragmentations[axis] + (weight.global_offset[axis] // size if size else 0)
    return dataclasses.replace(weight, key=key, data=data, dtype=data.dtype, local_shape=(),
                               global_shape=tuple(weight.global_shape[:n]),
                               global_offset=tuple(weight.global_offset[:n]),
                               axis_fragmentations=tuple(weight.axis_fragmentations[:n]),
                               replica_id=_shift_replica(weight.replica_id, index))


def _shift_replica(replica_id, index: int):
    """A replica id that is main iff ``replica_id`` is main and ``index`` is 0; Megatron's
    (PP, TP, DP) tuples get ``index`` in the TP slot, as Megatron gives TP-replicated tensors."""
    if index == 0:
        return replica_id
    if isinstance(replica_id, int):
        return replica_id + index
    if len(replica_id) >= 2:
        return (replica_id[0], replica_id[1] + index, *replica_id[2:])
    return (replica_id[0] + index,)


def load_megatron_checkpoint(model: nn.Module, checkpoint_dir: str) -> None:
    """``dist_checkpointing.load`` + ``load_state_dict`` after checking, from the checkpoint's
    metadata, that it holds exactly the quantizer tensors ``model`` expects (see
    :func:`init_quantizer_state`); raises :class:`ExportError` naming the keys otherwise."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    stored = set(dist_checkpointing.load_tensors_metadata(checkpoint_dir))
    ours = {k: e for k, e in sharded.items() if STATE_KEY.match(k.rpartition(".")[2])}
    expected = {key for entry in ours.values() for key in _stored_keys(entry)}
    weights = {key for entry in sharded.values() for key in _stored_keys(entry)}
    _raise_on_mismatch(expected, stored, weights, f"Megatron checkpoint {checkpoint_dir}")
    model.load_state_dict(dist_checkpointing.load(sharded, checkpoint_dir))


def save_megatron_checkpoint(model: nn.Module, checkpoint_dir) -> None:
    """``dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)`` (every rank calls
    it): the model's weights with their quantizer state, into a new or empty directory.
    Megatron's DistributedDataParallel / Float16Module wrappers are unwrapped first, so the keys
    are the model's own (as Megatron's training-loop save writes them) whatever ``model`` is."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import unwrap_model

    path = Path(checkpoint_dir)
    check_empty_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    inner = unwrap_model(model, (DistributedDataParallel, Float16Module))
    dist_checkpointing.save(inner.sharded_state_dict(), str(path))


def check_empty_dir(path: Path) -> None:
    """Refuse a non-empty checkpoint directory (stale pieces of another save would mix in)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"{path} exists and is not an empty directory; a distributed checkpoint "
                          "is written into a new or empty one: choose another path or remove it")


def _stored_keys(entry) -> list[str]:
    """Checkpoint keys an entry of a sharded state dict is saved under (factories: their pieces')."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        return [piece.key for piece in nested_values(entry.build())]
    return [entry.key] if isinstance(entry, ShardedTensor) else []


# ---------------------------------------------------------------------------------- torch DCP


def load_dcp_checkpoint(model: nn.Module, checkpoint_id: str) -> None:
    """torch DCP load into ``model`` (FSDP2 or plain, any world size) after checking the
    checkpoint's metadata for the quantizer tensors ``model`` expects."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    stored = set(dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)
    expected = {k for k in state if STATE_KEY.match(k.rpartition(".")[2])}
    _raise_on_mismatch(expected, stored, set(state), f"DCP checkpoint {checkpoint_id}")
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state)


def save_dcp_checkpoint(model: nn.Module, checkpoint_dir) -> None:
    """torch DCP save of ``model``'s weights with their quantizer state (FSDP2: every rank calls
    it; a plain model in one process too) into a new or empty directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    path = Path(checkpoint_dir)
    check_empty_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(get_model_state_dict(model), checkpoint_id=str(path))


# ---------------------------------------------------------------------------------- errors


def _refuse_legacy(keys: Iterable[str], source: str) -> None:
    """Raise on quantizer state in the fp32 format of the first checkpoints (``LEGACY_KEY``)."""
    legacy = sorted(k for k in keys if LEGACY_KEY.search(k))
    if legacy:
        raise ExportError(f"{source} holds quantizer state in the fp32 format of earlier nvfp4_dist "
                          f"versions ({legacy[0]}, ...), which this version no longer reads (it keeps "
                          "one-byte scale codes): calibrate the model again with quantize()")


def _check_loaded_keys(module: nn.Module, incompatible) -> None:
    """load_state_dict post-hook: quantizer keys missing from the state dict, or present for
    weights that expect none of that kind, fail the load (whatever ``strict`` says: NaN state or
    ignored betas would change what the model computes)."""
    _refuse_legacy(incompatible.unexpected_keys, "state dict")
    missing = [k for k in incompatible.missing_keys if STATE_KEY.match(k.rpartition(".")[2])]
    unexpected = [k for k in incompatible.unexpected_keys if STATE_KEY.match(k.rpartition(".")[2])]
    if missing or unexpected:
        raise ExportError(_mismatch_message(missing, unexpected, "state dict"))


def _raise_on_mismatch(expected: set[str], stored: set[str], weights: set[str], source: str) -> None:
    """Raise unless ``stored`` holds every expected quantizer key, and no quantizer key of a
    weight in ``weights`` that the model does not expect."""
    _refuse_legacy(stored, source)
    missing = sorted(expected - stored)
    extra = sorted(k for k in stored - expected
                   if (m := STATE_KEY.match(k)) is not None and m["param"] in weights)
    if missing or extra:
        raise ExportError(_mismatch_message(missing, extra, source))


def _mismatch_message(missing: Iterable[str], unexpected: Iterable[str], source: str) -> str:
    def by_weight(keys) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key in sorted(keys):
            head, _, leaf = key.rpartition(".")
            match = STATE_KEY.match(leaf)
            out.setdefault(f"{head}.{match['param']}" if head else match["param"], []).append(match["suffix"])
        return out

    def listing(weights: dict[str, list[str]]) -> str:
        shown = [f"{w}_nvfp4_{{{','.join(s)}}}" for w, s in list(weights.items())[:20]]
        more = f"\n    ... ({len(weights)} weights in all)" if len(weights) > 20 else ""
        return "\n    " + "\n    ".join(shown) + more

    missing, unexpected = by_weight(missing), by_weight(unexpected)
    absent = {s for suffixes in missing.values() for s in suffixes}
    extra = {s for suffixes in unexpected.values() for s in suffixes}
    lines = [f"NVFP4 quantizer state of the model does not match the {source}:"]
    if missing:
        lines.append("  expected but absent:" + listing(missing))
    if unexpected:
        lines.append("  present but not expected by the model:" + listing(unexpected))
    hints = []
    if "block_scale" in absent:
        hints.append("the checkpoint has no quantizer state for these weights: save it after "
                     "nvfp4_dist.quantize() (or quantize this model instead of restoring), and "
                     "restore with the QuantConfig's include/exclude of that run")
    elif "block_scale" in extra:
        hints.append("prepare the model with init_quantizer_state(model, config) before loading, "
                     "with the include/exclude of the saved run")
    else:
        if "dss_beta_code" in absent:
            hints.append("the checkpoint was saved without DSS: init_quantizer_state(model, "
                         "QuantConfig(..., dss=False))")
        if "dss_beta_code" in extra:
            hints.append("the checkpoint was saved with DSS betas: init_quantizer_state(model, "
                         "QuantConfig(method='local_hessian', dss=True))")
        if "input_amax" in absent:
            hints.append("the checkpoint is weight-only (W4A16): QuantConfig(quantize_inputs=False)")
        if "input_amax" in extra:
            hints.append("the checkpoint carries input scales (W4A4): QuantConfig(quantize_inputs=True)")
    return "\n".join(lines + [f"Fix: {h}." for h in hints])
