"""Megatron-core layouts: ColumnParallelLinear / RowParallelLinear adapters and the context.

Layouts (read from the module, never from global state):
  * ``ColumnParallelLinear`` (incl. the fused ``linear_qkv`` and gated ``linear_fc1``): output
    rows split evenly over the module's TP group -> ``shard_axis=0``. Every rank's shard belongs
    to ONE parameter, so q/k/v (and gate/up) share a global amax once it is MAX-reduced over TP.
    With sequence parallelism the module's input is this rank's slice of the sequence, so its
    statistics are summed over TP as well (``sequence_parallel=True``).
  * ``RowParallelLinear``: input channels split -> ``shard_axis=1``; each rank must own whole
    16-channel blocks. Its input is the full sequence (SP or not).
  * Expert linears (``is_expert=True``) use the expert-tensor-parallel group ("etp").

Group roles in :class:`~nvfp4_dist.parallel.context.ParallelContext` (see
:func:`megatron_context`): TP, ETP, EP, EDP (expert data parallel: the ranks holding the same
experts), and ``dp`` for the data-parallel group.

Export naming (:class:`MegatronNaming`): a GPT decoder's modules map back to Hugging Face
Llama/Qwen-style names (``GPT_TO_HF``) so that a Megatron run exports an HF checkpoint; ``linear_qkv`` rows go to
q_proj/k_proj/v_proj (interleaved per query group) and ``linear_fc1`` rows to gate_proj/up_proj
(``[gate_r; up_r]`` per TP rank r). Helpers here are public for the MoE adapters.

Pipeline parallelism: each stage holds a slice of the decoder and numbers its
``decoder.layers.{i}`` from 0. Slot names, statistics keys and exported names use the GLOBAL
layer index, read from Megatron itself: a ``TransformerLayer``'s ``layer_number`` is 1-based and
already includes the stage's offset (:func:`global_name`). The process groups Megatron builds
(TP, DP, EP, expert TP/DP) all lie inside one stage, so every reduce stays within the stage that
holds the weights. The first stage holds the embedding, the last the final norm and the output
layer; with tied embeddings the last stage's output layer is Megatron's copy of the embedding
(kept equal by its embedding group) and is exported once, under the embedding's name.
Virtual pipeline chunks (interleaved schedules) are refused (:func:`megatron_context`).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LayoutError
from ..layout.naming import ExportNaming, PassThrough
from ..layout.roles import GroupRole
from ..layout.slots import ExportPart, ShardLayout, WeightSlot
from ..layout.stats import InputStats, StatsStore
from ..numerics.constants import BLOCK_SIZE
from .adapters import LayoutAdapter
from .context import ParallelContext
from .reduce import gather_input_channels

from megatron.core.tensor_parallel.layers import (  # noqa: E402
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)

# Megatron GPT module name (regex) -> (HF module prefix, kind). Kinds: "qkv" (fused q/k/v rows),
# "glu" (fused gate/up rows), "plain" (one HF module).
GPT_TO_HF = (
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.self_attention\.linear_qkv", "model.layers.{0}.self_attn", "qkv"),
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.self_attention\.linear_proj", "model.layers.{0}.self_attn.o_proj", "plain"),
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.mlp\.linear_fc1", "model.layers.{0}.mlp", "glu"),
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.mlp\.linear_fc2", "model.layers.{0}.mlp.down_proj", "plain"),
    (r"(?:.*\.)?output_layer", "lm_head", "plain"),
)


def megatron_context(data_split: bool = True) -> ParallelContext:
    """Process groups of the initialised ``megatron.core.parallel_state``.

    ``data_split``: every data-parallel rank sees its own share of the calibration data, so
    statistics are summed over the DP group (False: every rank sees all the data; no DP reduce).
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise LayoutError("megatron parallel_state is not initialised; call "
                          "megatron.core.parallel_state.initialize_model_parallel (or "
                          "nvfp4_dist.launch.init_megatron) before quantize()")
    check_no_virtual_pipeline()
    # Pipeline stages: Megatron's TP/DP/EP/expert groups each lie inside one stage (checked by
    # the PP tests), so the statistics of a stage's weights are reduced among its own ranks.
    groups = {GroupRole.TP: ps.get_tensor_model_parallel_group(),
              GroupRole.EP: ps.get_expert_model_parallel_group(check_initialized=False),
              GroupRole.ETP: ps.get_expert_tensor_parallel_group(check_initialized=False),
              # only for model-wide values (e.g. the fallback input amax of wholly dead experts)
              GroupRole.PP: ps.get_pipeline_model_parallel_group()}
    if data_split:  # MoE experts: the replicas of one expert, whose statistics are summed
        groups[GroupRole.EDP] = ps.get_expert_data_parallel_group(check_initialized=False)
    groups = {k: g for k, g in groups.items() if g is not None}
    dp = ps.get_data_parallel_group() if data_split else None
    return ParallelContext(dp=dp, groups=groups)


def check_no_virtual_pipeline(chunks: int = 1) -> None:
    """Refuse virtual pipeline (interleaved) chunks, naming the limit: each rank would hold
    several model chunks, which quantize(), the hook and the export take one at a time."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else None
    if chunks > 1 or (vpp is not None and vpp > 1):
        raise LayoutError(f"virtual pipeline parallelism ({chunks} model chunk(s), virtual pipeline size "
                          f"{vpp}) is not supported: one model chunk per pipeline stage only; use "
                          "pipeline parallelism without virtual stages (no "
                          "virtual_pipeline_model_parallel_size / --num-layers-per-virtual-pipeline-stage)")


_DECODER_LAYER = re.compile(r"(?P<head>(?:.*\.)?decoder\.layers\.)(?P<index>\d+)(?P<tail>(?:\..*)?)")


def global_name(model: nn.Module, name: str) -> str:
    """``name`` (a module or state key of ``model``) with its decoder layer index made global:
    under pipeline parallelism a stage's ``decoder.layers.{i}`` is Megatron's layer
    ``layer_number - 1`` (``layer_number``: 1-based, including the stage's offset). Names outside
    a decoder layer, and layers without a ``layer_number``, are returned unchanged."""
    match = _DECODER_LAYER.fullmatch(name)
    if match is None:
        return name
    try:
        layer = model.get_submodule(match["head"] + match["index"])
    except AttributeError:
        return name
    number = getattr(layer, "layer_number", None)
    if not isinstance(number, int):
        return name
    return f"{match['head']}{number - 1}{match['tail']}"


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


def tp_rank_size(module: nn.Module) -> tuple[int, int]:
    """(rank, size) of ``module`` in its own tensor-parallel group."""
    group = getattr(module, "tp_group", None)
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def tp_group_name(module: nn.Module) -> GroupRole:
    return GroupRole.ETP if getattr(module, "is_expert", False) else GroupRole.TP


def check_context_group(name: str, module: nn.Module, ctx: ParallelContext) -> GroupRole:
    """The context's name for ``module``'s TP group; raises unless the context holds that same
    group (a missing or different group would reduce amax/statistics over the wrong ranks)."""
    group_name = tp_group_name(module)
    _, size = tp_rank_size(module)
    if size == 1:
        return group_name
    group = ctx.group(group_name)
    if group is None or _ranks(group) != _ranks(module.tp_group):
        have = "missing" if group is None else f"ranks {_ranks(group)}"
        raise LayoutError(
            f"{name}: tensor-parallel over ranks {_ranks(module.tp_group)} but the ParallelContext's "
            f"{group_name.value!r} group is {have}; pass ctx=nvfp4_dist.parallel.megatron.megatron_context() "
            "(or let quantize() detect Megatron's parallel_state)")
    return group_name


def column_layout(name: str, module: nn.Module, ctx: ParallelContext) -> ShardLayout:
    """Layout of a ColumnParallelLinear weight: rows split evenly over its TP group."""
    rank, size = tp_rank_size(module)
    shape = (module.output_size, module.input_size)
    if size == 1:
        return ShardLayout.whole(shape)
    return ShardLayout.split(shape, 0, rank, size, check_context_group(name, module, ctx))


def row_layout(name: str, module: nn.Module, ctx: ParallelContext) -> ShardLayout:
    """Layout of a RowParallelLinear weight: input channels split evenly over its TP group,
    each shard a whole number of 16-channel NVFP4 blocks."""
    rank, size = tp_rank_size(module)
    shape = (module.output_size, module.input_size)
    if size == 1:
        return ShardLayout.whole(shape)
    per_rank = module.input_size // size
    if per_rank % BLOCK_SIZE:
        raise LayoutError(
            f"{name}: RowParallelLinear input size {module.input_size} split over TP={size} gives "
            f"{per_rank} channels per rank, not a multiple of {BLOCK_SIZE}: a rank would hold part "
            "of an NVFP4 block. Choose a TP size that divides input_size / 16, or exclude this layer.")
    return ShardLayout.split(shape, 1, rank, size, check_context_group(name, module, ctx))


def qkv_export_parts(prefix: str, config) -> tuple[ExportPart, ...]:
    """q_proj/k_proj/v_proj rows of Megatron's interleaved ``linear_qkv`` (TP-independent):
    group g occupies rows ``[g*(qpg+2)*hn, (g+1)*(qpg+2)*hn)`` as ``[q heads; k; v]``."""
    hn, groups = config.kv_channels, config.num_query_groups
    qpg = config.num_attention_heads // groups
    per_group = (qpg + 2) * hn
    base = torch.arange(groups, dtype=torch.int64)[:, None] * per_group
    q = (base + torch.arange(qpg * hn)).reshape(-1)
    k = (base + qpg * hn + torch.arange(hn)).reshape(-1)
    v = (base + (qpg + 1) * hn + torch.arange(hn)).reshape(-1)
    return (ExportPart(f"{prefix}.q_proj", q), ExportPart(f"{prefix}.k_proj", k),
            ExportPart(f"{prefix}.v_proj", v))


def glu_export_parts(prefix: str, rows: int, tp_size: int, gate: str = "gate_proj",
                     up: str = "up_proj") -> tuple[ExportPart, ...]:
    """gate/up rows of a gated ``linear_fc1`` with ``rows`` = 2 * ffn rows, laid out as
    ``[gate_0; up_0; gate_1; up_1; ...]`` over ``tp_size`` ranks."""
    local = rows // tp_size
    half = local // 2
    starts = torch.arange(tp_size, dtype=torch.int64)[:, None] * local
    gate_rows = (starts + torch.arange(half)).reshape(-1)
    up_rows = (starts + half + torch.arange(half)).reshape(-1)
    return (ExportPart(f"{prefix}.{gate}", gate_rows), ExportPart(f"{prefix}.{up}", up_rows))


def hf_export_parts(name: str, module: nn.Module) -> tuple[ExportPart, ...]:
    """Export parts of a GPT module under its HF names (() when ``name`` is not a GPT module,
    in which case the Megatron name is exported)."""
    for pattern, template, kind in GPT_TO_HF:
        match = re.fullmatch(pattern, name)
        if match is None:
            continue
        prefix = template.format(*match.groups())
        if kind == "qkv":
            return qkv_export_parts(prefix, module.config)
        if kind == "glu":
            if not module.config.gated_linear_unit:
                return (ExportPart(f"{prefix}.up_proj", slice(0, module.output_size)),)
            return glu_export_parts(prefix, module.output_size, tp_rank_size(module)[1])
        return (ExportPart(prefix, slice(0, module.output_size)),)
    return ()


def hf_module_names(model: nn.Module, names) -> list[str]:
    """HF module names of Megatron modules ``names`` (e.g. ``QuantResult.ignored``, for an
    export's ignore list: ``output_layer`` -> ``lm_head``, the MoE router
    ``decoder.layers.N.mlp.router`` -> ``model.layers.N.mlp.gate``); unknown names are kept."""
    out = []
    for name in names:
        module = model.get_submodule(name)
        name = global_name(model, name)
        parts = hf_export_parts(name, module)
        if parts:
            out += [p.name for p in parts]
            continue
        key = hf_state_key(name + ".weight")  # modules exported whole under their weight's HF name
        out.append(key[: -len(".weight")] if key.endswith(".weight") else name)
    return out


def renamed_globally(model: nn.Module, slots: list[WeightSlot], rename) -> list[WeightSlot]:
    """``slots`` whose name changes under :func:`global_name` (pipeline stages after the first)
    replaced by ``rename(slot, global name)``; the others, and every slot outside pipeline
    parallelism, unchanged."""
    out = []
    for slot in slots:
        name = global_name(model, slot.name)
        out.append(slot if name == slot.name else rename(slot, name))
    return out


def with_global_names(model: nn.Module, slots: list[WeightSlot]) -> list[WeightSlot]:
    """``slots`` named by their global decoder layer (:func:`global_name`), names, fused groups,
    statistics keys and export parts alike; unchanged outside pipeline parallelism."""
    return renamed_globally(model, slots, lambda slot, name: dataclasses.replace(
        slot, name=name, fused_group=global_name(model, slot.fused_group),
        stats_key=global_name(model, slot.stats_key), export_parts=hf_export_parts(name, slot.module)))


def _weight_or_none(module: nn.Module):
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


class ColumnParallelAdapter(LayoutAdapter):
    """Megatron ``ColumnParallelLinear``: rows split over TP; SP inputs summed over TP."""

    module_types = (ColumnParallelLinear,)

    def slots(self, name, module, ctx):
        if _weight_or_none(module) is None:  # weight passed at call time (tied output layer)
            return []
        layout = column_layout(name, module, ctx)
        return [WeightSlot(name=name, module=module, param_name="weight", layout=layout,
                           fused_group=name, stats_key=name,
                           sequence_parallel=bool(module.sequence_parallel) and layout.is_sharded,
                           export_parts=hf_export_parts(name, module))]

    def with_export_names(self, model, slots):
        return with_global_names(model, slots)


def observe_input_columns(module: nn.Module, stats: InputStats, start: int, stop: int):
    """Forward pre-hook feeding channels ``[start, stop)`` of ``module``'s input into ``stats``
    (a RowParallelLinear that scatters a full input itself); returns the handle."""

    def hook(mod, args):
        stats.update(args[0][..., start:stop])

    return module.register_forward_pre_hook(hook)


def observe_whole_input(module: nn.Module, slot: WeightSlot, store: StatsStore):
    """GPTQ of a row-parallel shard: a forward pre-hook feeding the layer's WHOLE input into full
    statistics (the channels of every TP rank, gathered in rank order when the input is already
    split), so that every rank accumulates the same full Hessian as TP=1; returns the handle."""
    layout = slot.layout
    stats = store.get_or_create(slot.stats_key, layout.global_shape[1], True)
    stats.local_cols = (layout.offset[1], layout.offset[1] + layout.local_shape[1])
    group = module.tp_group

    def hook(mod, args):
        x = args[0]
        stats.update(gather_input_channels(x, group) if mod.input_is_parallel else x)

    return module.register_forward_pre_hook(hook)


class RowParallelAdapter(LayoutAdapter):
    """Megatron ``RowParallelLinear``: input channels split over TP."""

    module_types = (RowParallelLinear,)

    def slots(self, name, module, ctx):
        if _weight_or_none(module) is None:
            return []
        return [WeightSlot(name=name, module=module, param_name="weight",
                           layout=row_layout(name, module, ctx), fused_group=name, stats_key=name,
                           export_parts=hf_export_parts(name, module))]

    def with_export_names(self, model, slots):
        return with_global_names(model, slots)

    def observe(self, module, slots, store: StatsStore, *, with_hessian: bool, route_all: bool = False):
        layout = slots[0].layout
        if store.full_hessian and with_hessian and layout.is_sharded:
            return [observe_whole_input(module, slots[0], store)]
        if module.input_is_parallel or not layout.is_sharded:
            return super().observe(module, slots, store, with_hessian=with_hessian)
        # The module scatters a full-width input itself: keep this rank's channels only.
        stats = store.get_or_create(slots[0].stats_key, layout.local_shape[1], with_hessian)
        start = layout.offset[1]
        return [observe_input_columns(module, stats, start, start + layout.local_shape[1])]


# Megatron GPT state key (regex) -> HF key, for tensors exported unquantized (linears excepted:
# their names come from GPT_TO_HF, rows and all).
GPT_STATE_TO_HF = (
    (r"(?:.*\.)?embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"(?:.*\.)?decoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.input_layernorm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.pre_mlp_layernorm\.weight",
     "model.layers.{0}.post_attention_layernorm.weight"),
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.self_attention\.q_layernorm\.weight", "model.layers.{0}.self_attn.q_norm.weight"),
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.self_attention\.k_layernorm\.weight", "model.layers.{0}.self_attn.k_norm.weight"),
    # MoE router (Qwen3-MoE's `mlp.gate`): always exported unquantized
    (r"(?:.*\.)?decoder\.layers\.(\d+)\.mlp\.router\.weight", "model.layers.{0}.mlp.gate.weight"),
)


def hf_state_key(key: str) -> str:
    """HF name of an unquantized Megatron GPT state tensor (the key itself when unknown)."""
    for pattern, template in GPT_STATE_TO_HF:
        match = re.fullmatch(pattern, key)
        if match is not None:
            return template.format(*match.groups())
    return key


class MegatronNaming(ExportNaming):
    """Exported names of a Megatron GPT: HF names of its unquantized tensors and how this rank
    holds them (linears and vocabulary embeddings split over TP; norms replicated). An
    unquantized fused linear is exported per HF module; the ignore list gets HF names."""

    def __init__(self, ctx: ParallelContext, model: nn.Module | None = None):
        self.ctx = ctx
        self.model = model

    def _tied_output_layer(self, module) -> bool:
        """``module`` is a last pipeline stage's output layer holding Megatron's copy of the
        first stage's (tied) word embeddings: exported once, as the embedding."""
        model = self.model
        return (model is not None and module is getattr(model, "output_layer", None)
                and bool(getattr(model, "share_embeddings_and_output_weights", False))
                and not getattr(model, "pre_process", True))

    def passthrough(self, key, module, tensor):
        ctx = self.ctx
        if self.model is not None:
            key = global_name(self.model, key)
        module_name, _, leaf = key.rpartition(".")
        tied = self._tied_output_layer(module) and leaf == "weight"
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and leaf == "weight" and not tied:
            layout = (column_layout if isinstance(module, ColumnParallelLinear) else row_layout)(
                module_name, module, ctx)
            parts = hf_export_parts(module_name, module) or (ExportPart(module_name, slice(None)),)
            outputs = tuple((f"{p.name}.weight", p.rows) for p in parts)
            if not layout.is_sharded:
                return PassThrough(outputs)
            axis = layout.shard_axis
            return PassThrough(outputs, axis, layout.offset[axis], ctx.group(layout.shard_group))
        if tied:  # vocabulary rows split over TP like the embedding's: the same piece, a replica
            key = "embedding.word_embeddings.weight"
        outputs = ((hf_state_key(key), slice(None)),)
        if isinstance(module, VocabParallelEmbedding) or tied:
            rank, size = tp_rank_size(module)
            if size > 1:
                return PassThrough(outputs, 0, rank * tensor.shape[0], ctx.group(tp_group_name(module)))
        return PassThrough(outputs)

    def module_names(self, model, names):
        return hf_module_names(model, names)


def is_megatron_model(model: nn.Module) -> bool:
    """Whether ``model`` holds Megatron tensor-parallel layers (its names are Megatron's)."""
    return any(isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
               for m in model.modules())
