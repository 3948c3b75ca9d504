"""GPTQ's sequential mode, layer by layer on cached inputs (one calibration forward in all).

The model's decoder stack (the ``nn.ModuleList`` whose children are the numbered ``layers.N``
of the inventory: HF ``model.model.layers``, BERT ``encoder.layer``) is calibrated one layer at
a time without re-running the model:

  1. record   ``forward_loop(model)`` runs once; a forward pre-hook on the first layer stores
              each batch's call ``(args, kwargs)`` (hidden states, attention mask, position
              embeddings, ...) and stops that batch's forward there (a private exception,
              caught around the model's own forward, which returns None: the loop goes on
              to its next batch, and nothing past the first layer runs).
  2. per layer, in order:
              observe  the layer alone on every cached batch, with its slots' observers;
              reduce + search + install (the caller's group step: statistics, scales, GPTQ's
                       W', then the fake-quant forward);
              advance  the now quantized layer runs again on the cached batches; its outputs
                       replace the cached hidden states (the next layer's inputs, as the
                       quantized model computes them).
  3. the inventory's modules outside the stack (an ``lm_head`` a user included) are calibrated
     afterwards by the caller with one full ``forward_loop`` (all layers quantized by then).

Each layer sees exactly the inputs that the full-forward sequential mode gives it (the same
layer on the same batch tensors, the same kwargs): on a deterministic device the states and W'
are the same bit for bit (tests/gptq/test_layerwise.py). Keyword arguments are replayed as
recorded, except the KV cache: a cache object is replaced by None and ``use_cache`` by False,
so that replaying a layer never appends to (or attends over) a cache. The layer calls happen
outside ``forward_loop``; an autocast the loop had entered is recorded and re-entered.

Memory: the cached hidden states stay on the model's device in their dtype (samples x sequence
x hidden: 128 x 512 x 4096 bf16 = 512 MiB for a Qwen3-8B-shaped calibration), plus the kwargs
each batch was called with (masks, rotary cos/sin); a batch's outputs replace its inputs as they
are produced, so one extra batch lives at a time. With the caller keeping one layer's full
Hessians at a time, a rank holds one layer's full Hessians and the cached activations.

Not valid, so the caller keeps the full-forward path (:func:`decoder_stack` says why):
Megatron models (a layer's inputs may come from another pipeline stage, whose layout the
ParallelContext does not describe), FSDP1 (flat parameters unshard through the root), layers
that are called with different masks (alternating sliding-window / full attention), inventories
whose numbered modules are not all under one ``ModuleList``, and forward loops that call
something other than ``model(...)`` or read its outputs (detected while recording). FSDP2 is
supported: a ``fully_shard``-ed layer called alone unshards and reshards itself through its
own hooks.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..parallel.fsdp import is_fsdp1
from .discover import Inventory

_LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")  # layers.N (decoders), layer.N (BERT)
# keyword arguments that carry a KV cache (transformers: ``cache``; older ``past_key_values``)
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def layer_index(name: str) -> int | None:
    """The decoder layer index of a module name (``...layers.N....``), None outside layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


class _StopForward(BaseException):
    """Raised by the recording hook to end a batch's forward at the first layer. A
    BaseException, so that a loop's ``except Exception`` does not swallow it."""


@dataclass
class _Call:
    """One cached batch: the first layer's call with its hidden states replaced as layers go."""

    args: tuple
    kwargs: dict

    def with_hidden(self, hidden: torch.Tensor) -> "_Call":
        if self.args:
            return _Call((hidden,) + self.args[1:], self.kwargs)
        return _Call((), {**self.kwargs, "hidden_states": hidden})


def decoder_stack(model: nn.Module, inventory: Inventory) -> tuple[str, nn.ModuleList | None]:
    """``(prefix, stack)``: the ModuleList holding every numbered module of ``inventory`` as
    ``{prefix}.{N}.``; ``(reason, None)`` where layer-wise calibration is not valid."""
    numbered = [(n, layer_index(n)) for n in inventory.modules if layer_index(n) is not None]
    if not numbered:
        return "no module of the inventory lies in a numbered decoder layer", None
    if is_fsdp1(model):
        return "FSDP1 (flat parameters) unshards through the root module only", None
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if any(not name.isdigit() for name, _ in module.named_children()):
            continue
        if not all(n.startswith(f"{prefix}.{i}.") for n, i in numbered):
            continue
        first = module[0]
        # Megatron layers get their inputs from the previous pipeline stage under PP, which the
        # ParallelContext does not describe: keep the full forward there.
        if type(first).__module__.partition(".")[0] == "megatron":
            return "Megatron decoder layers run inside Megatron's pipeline schedule", None
        mixed = _mixed_attention(model, module)
        if mixed:  # each kind is called with its own mask, only the first layer's is recorded
            return f"the layers are called with different attention masks ({mixed})", None
        return prefix, module
    return "the numbered modules do not all lie in one nn.ModuleList", None


# Where HF models say which attention a layer runs (on the layer or its attention module)
_KIND_ATTRS = ("attention_type", "layer_type", "is_sliding", "sliding_window")


def _mixed_attention(model: nn.Module, stack: nn.ModuleList) -> str | None:
    """Why the stack's layers get different masks (sliding-window vs full attention: the
    config's ``layer_types``, or the per-layer attributes HF models set), None if they do not."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(set(types[:len(stack)])) > 1:
            return f"layer_types {sorted(set(map(str, types)))}"
    per_layer = {tuple(repr(getattr(m, a, None)) for m in (layer, *layer.children()) for a in _KIND_ATTRS)
                 for layer in stack}
    return f"layers differ in {'/'.join(_KIND_ATTRS)}" if len(per_layer) > 1 else None


def _without_cache(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for key, value in kwargs.items():
        if key in _CACHE_KWARGS or hasattr(value, "get_seq_length"):  # HF Cache objects
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def record_inputs(model: nn.Module, first: nn.Module, forward_loop: Callable[[nn.Module], None]
                  ) -> tuple[list[_Call], tuple | None] | str:
    """Run ``forward_loop(model)`` with every batch stopped at ``first``; returns the cached
    calls and the autocast they ran under (``(device type, dtype)``, None: none), or the reason
    the loop cannot be used this way."""
    calls: list[_Call] = []
    autocast: list = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            device = hidden.device.type
            autocast.append((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        calls.append(_Call(tuple(args), _without_cache(kwargs)))
        raise _StopForward

    had_forward = "forward" in vars(model)
    inner = model.forward

    def stopping_forward(*args, **kwargs):  # the model's own forward, ended at the first layer
        try:
            return inner(*args, **kwargs)
        except _StopForward:
            return None

    handle = first.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)  # before FSDP2's unshard
    model.forward = stopping_forward
    try:
        with torch.no_grad():
            forward_loop(model)
    except _StopForward:
        return "the forward loop reached the first layer other than through model(...)"
    except Exception as error:  # noqa: BLE001 - the loop read the None our forward returned
        if not calls:
            raise
        return f"the forward loop uses the model's outputs ({type(error).__name__}: {error})"
    finally:
        handle.remove()
        if had_forward:
            model.forward = inner
        else:
            del model.forward
    if len(set(autocast)) > 1:
        return "the forward loop changes autocast between batches"
    spec = (autocast[0][0], autocast[0][2]) if autocast and autocast[0][1] else None  # (device type, dtype)
    return calls, spec


def _hidden(output) -> torch.Tensor:
    # HF layers return the hidden states (transformers 5) or a tuple led by them (older ones)
    return output[0] if isinstance(output, (tuple, list)) else output


class CachedInputs:
    """The cached calls of the current layer; :meth:`run` observes, :meth:`advance` moves on."""

    def __init__(self, calls: list[_Call], autocast):
        self.calls = calls
        self._autocast = autocast

    def _context(self):
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self._autocast[0], dtype=self._autocast[1])

    def run(self, layer: nn.Module) -> None:
        """``layer`` on every cached batch, outputs discarded (the observers see its inputs)."""
        with torch.no_grad(), self._context():
            for call in self.calls:
                layer(*call.args, **call.kwargs)

    def advance(self, layer: nn.Module) -> None:
        """Replace each batch's hidden states by ``layer``'s outputs (one batch at a time)."""
        with torch.no_grad(), self._context():
            for i, call in enumerate(self.calls):
                self.calls[i] = call.with_hidden(_hidden(layer(*call.args, **call.kwargs)))


def calibrate_layers(model: nn.Module, inventory: Inventory, parts: dict[int | None, Inventory],
                     calibrate: Callable[[Inventory, Callable[[nn.Module], None]], None],
                     forward_loop: Callable[[nn.Module], None], seconds: dict) -> list[Inventory]:
    """Calibrate the layer groups ``parts`` (by layer index; None: modules outside layers) of
    the decoder stack on cached inputs, calling ``calibrate(part, loop)`` (observe with
    ``loop``, reduce, search, install) per layer in order. Returns the groups left for the
    caller's full-forward path: the outside group, or every group (in order) where layer-wise
    calibration is not valid (warned when a recording attempt told why)."""
    ordered = [parts[k] for k in sorted(k for k in parts if k is not None)]
    rest = [parts[None]] if None in parts else []
    _, stack = decoder_stack(model, inventory)
    if stack is None:
        return ordered + rest
    t0 = time.perf_counter()
    recorded = record_inputs(model, stack[0], forward_loop)
    seconds["forward"] = seconds.get("forward", 0.0) + time.perf_counter() - t0
    if isinstance(recorded, str):
        warnings.warn(f"nvfp4_dist: gptq_sequential runs one full forward loop per layer: {recorded}",
                      stacklevel=3)
        return ordered + rest
    cache = CachedInputs(*recorded)
    last = max(k for k in parts if k is not None)
    for index in range(last + 1):
        layer = stack[index]
        if index in parts:
            calibrate(parts[index], lambda _model, layer=layer: cache.run(layer))
        if index < last:
            t0 = time.perf_counter()
            cache.advance(layer)
            seconds["forward"] = seconds.get("forward", 0.0) + time.perf_counter() - t0
    del cache
    return rest
