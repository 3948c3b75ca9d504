"""Layout adapter for transformers' fused MoE experts (``Qwen3MoeExperts``, ``MixtralExperts``, ...).

transformers 5.x stores the experts of a layer as 3-D parameters on one module (classes decorated
with ``use_experts_implementation``; checked on 5.23):

* ``gate_up_proj [E, 2I, H]``: per expert, gate rows then up rows (``is_concatenated``), or gate
  and up interleaved row by row; ``up_proj [E, I, H]`` instead when ``has_gate`` is False;
* ``down_proj [E, H, I]``;
* forward ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``, dispatched to an
  eager loop, ``batched_mm``, ``grouped_mm`` (the default) ... by ``config._experts_implementation``.

Each expert and projection is one WeightSlot (``slot.expert = e`` slices the 3-D parameter). A
gate_up slot covers both halves of one expert, so gate and up share one global amax by
construction; its export parts split the rows into the per-expert modules ``save_pretrained``
writes. Transposed layouts (``is_transposed``, e.g. gpt-oss), transformers' own expert
parallelism and DTensor-sharded experts outside FSDP2 are refused with a LayoutError (FSDP2's
are :mod:`nvfp4_dist.parallel.hf_experts_fsdp`'s, a subclass that sets each slot's layout).

Observation does not change the model's computation, whatever the implementation: a forward
pre-hook on the experts module reads its inputs and takes each expert's routed rows
(routing.routed_tokens) as the gate_up input; the down_proj input is each expert's intermediate
activation.

All experts at once (:func:`_observe_stacked`): one grouping of the routed rows by expert (a
stable order: one Triton launch on the GPU, a sort in torch elsewhere; the first projection's
statistics read them through that index, never a gathered copy), the activations are the ones
transformers' grouped forward computes (seen through the module's ``_apply_gate``) or, where the
forward does not compute them all in one call, one grouped GEMM (bf16 on the GPU; one GEMM per
expert elsewhere) recomputes them; each projection's statistics take one
:class:`~nvfp4_dist.layout.stats.ExpertStats` update (one kernel launch for all block Hessians);
the hooks never wait for the device, the totals reach the store when the handle is removed. The
hooks' host time matters as much as their GPU time: a forward leaves the host less than a
millisecond per MoE layer and batch before the GPU waits for it (H200, Qwen3-30B-A3B shapes), so
each hook issues a handful of launches. Full-Hessian statistics (GPTQ) keep the expert-by-expert
observer, which recomputes the activations.
"""

from __future__ import annotations

import dataclasses
import re
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayoutError
from ..kernels.dispatch import grouped_choices as expert_grouping
from ..layout.slots import ExpertInfo, ExportPart, ShardLayout, WeightSlot
from ..layout.stats import ExpertStats, StatsStore
from .adapters import LayoutAdapter
from .context import ParallelContext
from .routing import routed_tokens

# Per-expert module names used when transformers has no save-time conversion for the model
# (it then saves the fused 3-D tensors): the convention of Qwen-style checkpoints and vLLM.
_DEFAULT_PART_NAMES = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",),
                       "down_proj": ("down_proj",)}


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: the ``use_experts_implementation`` attributes and 3-D
    ``down_proj`` plus ``gate_up_proj`` (or ``up_proj``) parameters."""
    if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        return False
    params = dict(module.named_parameters(recurse=False))
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return all(name in params and params[name].dim() == 3 for name in (first, "down_proj"))


def _param_names(module: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def _default_parts(name: str, param: str, expert: int, rows: int, interleaved: bool) -> tuple[ExportPart, ...]:
    names = _DEFAULT_PART_NAMES[param]
    if len(names) == 1:
        return (ExportPart(f"{name}.{expert}.{names[0]}", slice(0, rows)),)
    half = rows // 2
    if interleaved:  # gate rows 0, 2, 4, ...; up rows 1, 3, 5, ...
        return tuple(ExportPart(f"{name}.{expert}.{n}", torch.arange(i, rows, 2)) for i, n in enumerate(names))
    return tuple(ExportPart(f"{name}.{expert}.{n}", slice(i * half, (i + 1) * half)) for i, n in enumerate(names))


def saved_expert_names(model: nn.Module, name: str, module: nn.Module) -> dict | None:
    """(param, expert) -> ExportParts exactly as ``model.save_pretrained`` names the experts'
    weights, or None when transformers saves the fused parameters unchanged.

    Asks transformers itself: its save path reverts the load-time weight conversions
    (``revert_weight_conversion``: e.g. Mixtral's ``mlp.experts.gate_up_proj`` ->
    ``block_sparse_moe.experts.{i}.w1/w3``). We run that on probe tensors ``[E, rows, 1]`` that
    number every row of both parameters (disjoint ranges), so each saved tensor tells which
    parameter, expert and rows it holds, whatever shape the release's conversion gives it
    (checked on transformers 5.17 and 5.24).
    """
    from transformers.core_model_loading import revert_weight_conversion

    probes, ranges = {}, []
    offset = 0
    for param in _param_names(module):
        n_experts, rows = getattr(module, param).shape[:2]
        probes[f"{name}.{param}"] = (offset + torch.arange(n_experts * rows, dtype=torch.float64)
                                     ).reshape(n_experts, rows, 1)
        ranges.append((param, offset, rows))
        offset += n_experts * rows
    saved = revert_weight_conversion(model, dict(probes))
    if any(key in saved for key in probes):
        return None
    keys = list(saved)
    for key in keys:
        tensor = saved[key]
        # Each saved tensor holds probe rows of width 1: [rows, 1], or [rows] where a release's
        # save conversion drops the unit dimension (transformers 5.17 does); either way its
        # values, in order, number the rows it took.
        if (not key.endswith(".weight") or tensor.dim() not in (1, 2) or tensor.numel() != tensor.shape[0]
                or not tensor.numel()):
            raise LayoutError(f"{name}: transformers saves this experts module as {key} "
                              f"{tuple(tensor.shape)}, a layout nvfp4_dist cannot map to per-expert "
                              f"weights; exclude the module (exclude=['{name}'])")
    # Every saved tensor at once (a few operations per module, not per expert): its rows,
    # key after key, and per key the range of experts and rows it touches.
    sizes = [saved[key].numel() for key in keys]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    values = torch.cat([saved[key].reshape(-1) for key in keys]).long()
    firsts = values[bounds[:-1]].tolist()
    owner = [next(r for r in reversed(ranges) if first >= r[1]) for first in firsts]
    seg = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(sizes))
    local = values - torch.tensor([r[1] for r in owner])[seg]
    experts = local // torch.tensor([r[2] for r in owner])[seg]
    # a step other than +1 inside a key: its rows are no single ascending run
    broken = ((local[1:] - local[:-1]) != 1) & (seg[1:] == seg[:-1])
    lo_e, hi_e, lo, jumps = (torch.full((len(keys),), fill, dtype=torch.int64).scatter_reduce(
        0, index, src, reduce, include_self=False) for fill, index, src, reduce in (
        (0, seg, experts, "amin"), (0, seg, experts, "amax"), (0, seg, local, "amin"),
        (0, seg[1:], broken.long(), "amax")))
    found: dict[tuple[str, int], list[ExportPart]] = {}
    for i, (key, (e_min, e_max, low, jump)) in enumerate(zip(keys, torch.stack([lo_e, hi_e, lo, jumps], 1).tolist())):
        if e_min != e_max or low < 0:
            raise LayoutError(f"{name}: saved tensor {key} mixes experts or parameters; "
                              f"exclude the module (exclude=['{name}'])")
        param, _, rows = owner[i]
        start = firsts[i] - owner[i][1] - e_min * rows
        part_rows = (slice(start, start + sizes[i]) if not jump
                     else local[bounds[i]:bounds[i + 1]] % rows)  # interleaved: the row indices
        found.setdefault((param, e_min), []).append(ExportPart(key.removesuffix(".weight"), part_rows))
    for param, start, rows in ranges:
        for e in range(getattr(module, param).shape[0]):
            if not _covers_once(found.get((param, e), []), rows):
                raise LayoutError(f"{name}: transformers' saved names do not cover every row of "
                                  f"expert {e}'s {param} exactly once; exclude the module "
                                  f"(exclude=['{name}'])")
    return {k: tuple(sorted(v, key=lambda part: _first_row(part.rows))) for k, v in found.items()}


# Saved names of the experts modules of each model, per kind of module (its name with the layer
# index cut out, class, parameter shapes): [layer index asked, names, checked on a second layer].
_SAVED_BY_LAYER: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _same_parts(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.keys() != b.keys():
        return False
    for key, parts in a.items():
        other = b[key]
        if len(parts) != len(other):
            return False
        for p, q in zip(parts, other):
            if p.name != q.name or isinstance(p.rows, slice) != isinstance(q.rows, slice):
                return False
            if not (p.rows == q.rows if isinstance(p.rows, slice) else torch.equal(p.rows, q.rows)):
                return False
    return True


def _at_layer(names: dict | None, old: str, new: str) -> dict | None | bool:
    """``names`` asked for layer ``old``, renamed to layer ``new``; False where a saved name does
    not carry the ``layers.{old}.`` of its module."""
    if names is None:
        return None
    src, dst = f"layers.{old}.", f"layers.{new}."
    out = {}
    for key, parts in names.items():
        if not all(src in p.name for p in parts):
            return False
        out[key] = tuple(ExportPart(p.name.replace(src, dst, 1), p.rows) for p in parts)
    return out


def saved_expert_names_by_layer(model: nn.Module, name: str, module: nn.Module) -> dict | None:
    """:func:`saved_expert_names`, asked of transformers once per kind of experts module: the
    conversion rules are patterns over key names, the same at every layer index, so the names of
    ``layers.N`` follow from those of the first such module by the index (48 modules of a
    Qwen3-30B-A3B: one question instead of 48, ~30 ms each). The derivation is checked against
    transformers' own answer on the second module of each kind; any mismatch and every module of
    that kind is asked."""
    found = _LAYER_INDEX.search(name)
    if found is None:
        return saved_expert_names(model, name, module)
    layer = found.group(1)
    kind = (name[:found.start(1)] + "{}" + name[found.end(1):], type(module),
            tuple(tuple(getattr(module, p).shape) for p in _param_names(module)))
    cache = _SAVED_BY_LAYER.setdefault(model, {})
    entry = cache.get(kind)
    if entry is None:
        names = saved_expert_names(model, name, module)
        cache[kind] = [layer, names, False]
        return names
    first, names, checked = entry
    derived = _at_layer(names, first, layer)
    if derived is False or checked is None:  # not derivable: ask every time
        return saved_expert_names(model, name, module)
    if not checked:
        asked = saved_expert_names(model, name, module)
        entry[2] = True if _same_parts(asked, derived) else None
        return asked
    return derived


def _covers_once(parts: list[ExportPart], rows: int) -> bool:
    """Whether ``parts`` take every row ``0 .. rows-1`` exactly once (slices: by their bounds,
    no tensor operation; index tensors: sorted against ``arange``)."""
    if all(isinstance(p.rows, slice) for p in parts):
        end = 0
        for part in sorted(parts, key=lambda p: p.rows.start):
            if part.rows.start != end:
                return False
            end = part.rows.stop
        return end == rows
    covered = torch.cat([_as_index(p.rows) for p in parts] or [torch.empty(0)])
    return torch.equal(torch.sort(covered.long()).values, torch.arange(rows))


def _as_index(rows) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows


def _first_row(rows) -> int:
    return rows.start if isinstance(rows, slice) else int(rows[0])


class HFExpertsAdapter(LayoutAdapter):
    """transformers fused experts: one slot per expert and projection (see the module docstring)."""

    def matches(self, module):
        return is_fused_experts(module)

    def slots(self, name, module, ctx: ParallelContext):
        if module.is_transposed:
            raise LayoutError(f"{name}: {type(module).__name__} stores transposed expert weights "
                              "([E, in, out]), which nvfp4_dist does not quantize yet; exclude it "
                              f"(exclude=['{name}']) to keep it in high precision")
        sharded = [p for p in _param_names(module) if hasattr(getattr(module, p), "device_mesh")]
        if sharded and not self.accepts_dtensors:
            raise LayoutError(f"{name}: fused experts sharded as DTensors (FSDP2 or a tensor-parallel "
                              f"plan: {', '.join(sharded)}) are not supported; calibrate the experts "
                              "with the whole model on each rank (--backend hf) or as Megatron "
                              "SequentialMLP experts (--backend megatron --ep N)")
        if getattr(module, "_is_expert_parallel", False):
            raise LayoutError(f"{name}: transformers expert parallelism is not supported; load the "
                              "model without an 'ep' plan (or use the Megatron backend with --ep)")
        out = []
        for param in _param_names(module):
            weight = getattr(module, param)
            n_experts, rows, cin = weight.shape
            for e in range(n_experts):
                slot_name = f"{name}.{e}.{param}"
                out.append(WeightSlot(
                    name=slot_name, module=module, param_name=param,
                    layout=self.expert_layout(weight, e), fused_group=slot_name,
                    stats_key=f"{slot_name}.input", expert=e,
                    export_parts=_default_parts(name, param, e, rows, not module.is_concatenated),
                    moe=ExpertInfo(index=e, count=n_experts, family=f"{name}.{param}")))
        return out

    accepts_dtensors = False  # subclass hook: FSDP2 experts (hf_experts_fsdp)

    def expert_layout(self, weight: torch.Tensor, expert: int) -> ShardLayout:
        """This rank's part of expert ``expert`` of the 3-D ``weight`` (subclass hook): whole."""
        return ShardLayout.whole(weight.shape[1:])

    def with_export_names(self, model, slots):
        name = slots[0].moe.family.rpartition(".")[0]
        names = saved_expert_names_by_layer(model, name, slots[0].module)
        if names is None:
            return slots
        return [dataclasses.replace(s, export_parts=names[(s.param_name, s.expert)]) for s in slots]

    def observe(self, module, slots, store: StatsStore, *, with_hessian: bool, route_all: bool = False):
        first, down = _param_names(module)
        # float64 Hessian sums: an expert's statistics do not depend on how its tokens were batched.
        by_key = {(s.param_name, s.expert): store.get_or_create(s.stats_key, s.layout.local_shape[1],
                                                                 with_hessian, accum_dtype=torch.float64)
                  for s in slots}
        n_experts = getattr(module, first).shape[0]
        every = all((p, e) in by_key for p in (first, down) for e in range(n_experts))
        if every and not getattr(store, "full_hessian", False):
            return _observe_stacked(module, by_key, n_experts, route_all)

        def hook(mod, args, kwargs):  # full Hessians (GPTQ), or a part of the experts: one by one
            hidden, top_k_index = _experts_inputs(args, kwargs)
            for e, rows in enumerate(routed_tokens(top_k_index, n_experts, route_all)):
                x = hidden[rows]
                if (first, e) in by_key:
                    by_key[(first, e)].update(x)
                    by_key[(down, e)].update(expert_activation(mod, e, x))

        return [module.register_forward_pre_hook(hook, with_kwargs=True)]


class _FlushingHandle:
    """Hook handles whose ``remove()`` first writes the stacked statistics into the store, and
    undoes the capture of the module's gate function."""

    def __init__(self, handles: list, stats: list[ExpertStats], module: nn.Module, gate=None):
        self.handles, self.stats, self.module, self.gate = handles, stats, module, gate

    def remove(self) -> None:
        for stats in self.stats:
            stats.flush()
        for handle in self.handles:
            handle.remove()
        if self.gate is not None and vars(self.module).get("_apply_gate") is self.gate:
            del self.module._apply_gate  # the gate function as it was


def _observe_stacked(module: nn.Module, by_key: dict, n_experts: int, route_all: bool) -> list:
    """Observe all experts of ``module`` at once: per forward, the routed rows grouped by expert
    in one launch (:func:`grouped_rows`), each projection's statistics in one
    :class:`~nvfp4_dist.layout.stats.ExpertStats` update; no wait for the device until the
    handle is removed.

    The down_proj inputs are the activations the forward itself computes where it can be seen:
    a gated module's ``_apply_gate`` is wrapped for the observation, and when the forward called
    it once on all its routed rows sorted by expert (transformers' ``grouped_mm``: routing
    sentinels last) that output is observed as it is: grouped like the inputs, the same counts
    per expert (the order within an expert may differ, which changes the float64 sums only by
    their rounding). Otherwise (other implementations, e.g. the eager loop or ``batched_mm``'s
    token order; ``route_all``; no gate) they are recomputed from the grouped rows
    (:func:`grouped_activations`).
    """
    first, down = _param_names(module)
    stacked = [ExpertStats([by_key[(p, e)] for e in range(n_experts)]) for p in (first, down)]
    capture = module.has_gate and not route_all
    seen: list[torch.Tensor] = []  # the gate outputs of the forward in flight
    pending: list = []  # its grouped rows, offsets and row experts

    def pre_hook(mod, args, kwargs):
        hidden, top_k_index = _experts_inputs(args, kwargs)
        with torch.no_grad():
            rows, offsets, row_expert = grouped_rows(top_k_index, n_experts, route_all)
            tokens = hidden.detach().reshape(-1, hidden.shape[-1])
            stacked[0].update(tokens, offsets, row_expert, rows=rows)  # read through the index
        pending[:] = [(tokens, rows, offsets, row_expert, capture and _sorts_by_expert(mod))]
        seen.clear()

    def post_hook(mod, args, output):
        if not pending:
            return
        (tokens, rows, offsets, row_expert, sorted_rows), = pending
        pending.clear()
        with torch.no_grad():
            if sorted_rows and len(seen) == 1 and seen[0].shape[0] == rows.shape[0]:
                act = seen[0]  # every routed row at once, grouped by expert as ``rows``
            else:  # the grouped rows formed only here, for the recompute
                act = grouped_activations(mod, tokens[rows], offsets, row_expert)
            seen.clear()
            stacked[1].update(act, offsets, row_expert)

    recorded_gate = None
    if capture:
        gate = module._apply_gate

        def recorded_gate(h):
            out = gate(h)
            if pending:  # inside an observed forward (not grouped_activations' own call)
                seen.append(out.detach())
            return out

        module._apply_gate = recorded_gate
    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
               module.register_forward_hook(post_hook, always_call=True)]
    return [_FlushingHandle(handles, stacked, module, recorded_gate)]


def _sorts_by_expert(module: nn.Module) -> bool:
    """Whether ``module``'s forward is transformers' ``grouped_mm`` implementation, which gates
    all routed rows in one call, sorted by expert (the implementation is chosen per forward by
    the model config's ``_experts_implementation``)."""
    return getattr(getattr(module, "config", None), "_experts_implementation", None) == "grouped_mm"


def grouped_rows(top_k_index: torch.Tensor, n_experts: int, route_all: bool = False):
    """``(rows [N], offsets [E + 1], row_expert [N])``: the token rows every expert computes on
    (:func:`.routing.routed_tokens`'s rows, ascending per expert), grouped by expert
    (:func:`grouped_choices`), without waiting for the device. Indices outside ``[0, E)``
    (expert-parallel sentinels) come last with ``row_expert = E``, outside every expert's range."""
    tokens, k = top_k_index.shape
    device = top_k_index.device
    if route_all:
        rows = torch.arange(tokens, device=device).repeat(n_experts)
        row_expert = torch.arange(n_experts, device=device).repeat_interleave(tokens)
        offsets = torch.arange(n_experts + 1, device=device) * tokens
        return rows, offsets, row_expert
    return expert_grouping(top_k_index, n_experts, divisor=k)


def grouped_choices(top_k_index: torch.Tensor, n_experts: int):
    """``(choices [T * k], offsets [E + 1], row_expert [T * k])``: the flat positions
    ``token * k + slot`` of ``top_k_index [T, k]`` grouped by expert, stably (so ascending per
    expert, the order of ``(top_k_index == e).nonzero()``), without waiting for the device;
    indices outside ``[0, E)`` come last with ``row_expert = E``. One Triton launch on the GPU
    (a sort and a search in torch cost the host ~15 launches per MoE layer and batch);
    semantics in :func:`nvfp4_dist.kernels.reference.grouped_choices`."""
    return expert_grouping(top_k_index, n_experts)


def _grouped_mm():
    """torch's grouped GEMM (what transformers' ``grouped_mm`` experts run), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_gemm(x: torch.Tensor, weight: torch.Tensor):
    """torch's grouped GEMM where it runs ``x`` against the experts' ``weight`` (bf16 on a
    Hopper-class GPU), else None (then one GEMM per expert)."""
    grouped = _grouped_mm()
    if (grouped is not None and x.is_cuda and weight.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)):
        return grouped
    return None


@torch.no_grad()
def grouped_activations(module: nn.Module, x: torch.Tensor, offsets: torch.Tensor,
                        row_expert: torch.Tensor) -> torch.Tensor:
    """:func:`expert_activation` of every expert's rows of ``x`` (grouped as ``offsets``) at once.

    bf16 on a Hopper-class GPU: one grouped GEMM for all experts (torch's ``grouped_mm``, as
    transformers' ``grouped_mm`` experts). Elsewhere one ``F.linear`` per expert, as
    :func:`expert_activation`. Either way the values are the expert's GEMM rounded to the
    model's dtype, which may differ from the model's own forward by the rounding of another
    GEMM kernel (the former per-expert recomputation did too).
    """
    first = _param_names(module)[0]
    weight = getattr(module, first)
    bias = getattr(module, f"{first}_bias") if getattr(module, "has_bias", False) else None
    x = x.to(weight.dtype)
    grouped = grouped_gemm(x, weight)
    if grouped is not None:
        h = grouped(x, weight.transpose(-2, -1), offs=offsets[1:].to(torch.int32))
        if bias is not None:
            h = h + bias[row_expert.clamp(max=weight.shape[0] - 1)]
    else:
        h = x.new_zeros(x.shape[0], weight.shape[1])
        bounds = offsets.tolist()
        for e in range(weight.shape[0]):
            if bounds[e + 1] > bounds[e]:
                h[bounds[e]:bounds[e + 1]] = F.linear(x[bounds[e]:bounds[e + 1]], weight[e],
                                                      None if bias is None else bias[e])
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def _experts_inputs(args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states [T, H], top_k_index [T, k])`` of an experts forward, passed positionally
    or by keyword."""
    bound = dict(zip(("hidden_states", "top_k_index"), args)) | kwargs
    return bound["hidden_states"].detach(), bound["top_k_index"]


@torch.no_grad()
def expert_activation(module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Input of expert ``expert``'s down projection for its routed rows ``x [n, H]``: the
    expert's gate/up projection (plus bias) followed by the module's own gate function
    (``act(gate) * up`` for Qwen3-MoE and Mixtral), in the model's dtype."""
    first = _param_names(module)[0]
    weight = getattr(module, first)[expert]
    bias = getattr(module, f"{first}_bias")[expert] if getattr(module, "has_bias", False) else None
    h = F.linear(x.to(weight.dtype), weight, bias)
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)
