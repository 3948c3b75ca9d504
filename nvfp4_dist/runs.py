"""The CLI's distributed runs: lay the loaded HF model out, calibrate, export one checkpoint.

    torchrun --nproc-per-node N -m nvfp4_dist quantize --backend {hf,fsdp2,megatron} [--tp T] [--ep E] [--pp P] ...

(``--backend`` names the layout, :class:`Layout`; ``--layout`` is the same option.)

* ``hf``: every rank holds the whole model (data parallel).
* ``fsdp2``: ``fully_shard`` per decoder layer over all ranks; the search reads DTensor shards.
* ``megatron``: a Megatron-core GPT built from the same HF weights at TP=T over P pipeline
  stages (DP = N / (T * P)); each stage holds layers / P decoder layers and calibrates them, the
  calibration forward running through Megatron's pipeline schedule; an MoE model (Qwen3-MoE
  style) becomes SequentialMLP experts spread over EP=E ranks of a stage.
Calibration data: every rank feeds all of it and nothing is summed (default; the result equals
one process's), or, with ``--split-calib``, each data-parallel rank feeds its own share and the
statistics are summed (faster; equal up to fp32 summation order). ``--float64-calib`` runs the
calibration forward in float64, which makes Hessian statistics identical across TP sizes (see
:mod:`nvfp4_dist.parallel.invariance`). Every layout exports an HF checkpoint, named by the
layout's own :class:`~nvfp4_dist.layout.naming.ExportNaming` (recorded in the QuantResult).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .calib.checkpoint import save_dcp_checkpoint, save_megatron_checkpoint
from .calib.moe import ExpertSummary
from .calib.pipeline import QuantResult, quantize
from .calib.report import format_table
from .calib.restore import restore
from .config import QuantConfig
from .errors import ConfigError
from .export.hf import export_checkpoint
from .export.output import base_config
from .launch import collective_failures, init_distributed, init_megatron, launched_world_size, shard_fsdp2
from .models.loading import DTYPES, load_calibration, load_model, make_forward_loop
from .models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
from .models.megatron_moe import build_megatron_moe_gpt
from .parallel.context import SINGLE_PROCESS, ParallelContext
from .parallel.fsdp import fsdp_context
from .parallel.invariance import float64_forward
from .parallel.reduce import world_objects


class Layout(str, enum.Enum):
    """How the CLI lays the model out across ranks (``--backend`` / ``--layout``)."""

    HF = "hf"  # whole model on every rank (data parallel); no sharding
    FSDP2 = "fsdp2"  # torch FSDP2 shards of every weight; least memory per rank
    MEGATRON = "megatron"  # Megatron-core GPT with tensor parallelism (needs megatron-core)


@dataclass
class PreparedRun:
    """A laid-out model with its calibration loop and context."""

    model: nn.Module
    forward_loop: Callable[[nn.Module], None]
    ctx: ParallelContext
    hf_config: dict  # config.json content of the source model
    data_ranks: int  # ranks the calibration data is split over (1: every rank sees all of it)


def is_launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return launched_world_size() > 1


def _share(tokens: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    if tokens.shape[0] < ranks:
        raise ConfigError(f"--calib-samples {tokens.shape[0]} cannot be split over {ranks} "
                          "data-parallel ranks; use more samples or drop --split-calib")
    return tokens.chunk(ranks)[rank]


def check_layout_options(layout: Layout | str, tp: int, ep: int, replicas: int, pp: int = 1) -> None:
    """Refuse layout options that ``layout`` would ignore (the CLI calls this before any work)."""
    layout = Layout(layout)
    if layout is not Layout.MEGATRON and (tp != 1 or ep != 1 or pp != 1):
        sizes = f"--tp {tp} / --ep {ep}" + (f" / --pp {pp}" if pp != 1 else "")
        raise ConfigError(f"{sizes} need --backend megatron")
    if layout is not Layout.FSDP2 and replicas != 1:
        raise ConfigError(f"--replicas {replicas} (HSDP) needs --backend fsdp2")


def lay_out(hf_model: nn.Module, layout: Layout | str, *, tp: int = 1, ep: int = 1, replicas: int = 1,
            pp: int = 1, timeout_s: float, device: torch.device,
            data_split: bool) -> tuple[nn.Module, ParallelContext]:
    """``hf_model`` laid out for ``layout`` on this rank, and the run's context (see the module
    docstring); ``data_split``: the ranks feed shares of the data whose statistics are summed."""
    layout = Layout(layout)
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_layout_options(layout, tp, ep, replicas, pp)
    if layout is Layout.MEGATRON:
        ctx = init_megatron(tp, timeout_s=timeout_s, data_split=data_split, ep=ep, pp=pp)
        build = build_megatron_moe_gpt if getattr(hf_model.config, "num_experts", 0) else build_megatron_gpt
        return build(hf_model, device=device), ctx
    if layout is Layout.FSDP2:
        model = shard_fsdp2(hf_model.to(device), device, replicas)
        return model, fsdp_context(model, data_split=data_split)
    ctx = ParallelContext(dp=dist.group.WORLD) if (data_split and world > 1) else SINGLE_PROCESS
    return hf_model.to(device), ctx


def prepare_run(hf_model: nn.Module, tokens: torch.Tensor, layout: Layout, tp: int,
                batch_size: int, split_calib: bool, float64_calib: bool, timeout_s: float,
                device: torch.device, show_progress: bool, ep: int = 1, replicas: int = 1,
                pp: int = 1) -> PreparedRun:
    """Lay ``hf_model`` out for ``layout`` on this rank with its calibration loop (see module
    docstring)."""
    layout = Layout(layout)
    config = base_config(hf_model, None, None)  # the HF model's, before any layout
    model, ctx = lay_out(hf_model, layout, tp=tp, ep=ep, replicas=replicas, pp=pp, timeout_s=timeout_s,
                         device=device, data_split=split_calib)
    if layout is Layout.MEGATRON:
        # megatron-core is optional: imported only for this layout.
        from megatron.core import parallel_state as ps

        ranks, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        batches = megatron_forward_loop
    else:
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        batches = make_forward_loop
    data = _share(tokens, rank, ranks) if split_calib else tokens
    loop = batches(data, batch_size, show_progress)
    if float64_calib:
        loop = float64_forward(loop)
    return PreparedRun(model, loop, ctx, config, ranks if split_calib else 1)


@dataclass(frozen=True)
class RunSummary:
    """What a distributed run did, for the CLI to report (rank 0 prints it)."""

    result: QuantResult
    out: Path
    world_size: int
    data_ranks: int
    tokens: tuple[int, int]
    seconds: float
    table: str = ""  # the per-layer report of every pipeline stage (quantize runs)
    ignore: tuple[str, ...] = ()  # the export's ignore list (every rank's, exported names)


def whole_table(result: QuantResult) -> str:
    """The per-layer table of the whole model (collective: every rank calls it). Each rank's
    report covers its own weights (identical on the ranks of a shard group); under pipeline
    parallelism the stages' rows (and MoE experts summaries) are joined in stage (rank) order,
    each weight once."""
    rows, records = {}, set()
    for report, experts in world_objects((result.layer_report(), result.experts.records)):
        for row in report:
            rows.setdefault(row.name, row)
        records.update(experts)  # each stage's MoE layers (identical over its EP group)
    summary = ExpertSummary(tuple(sorted(records, key=lambda r: (r.family, r.index, r.name)))).format()
    return format_table(list(rows.values())) + ("\n" + summary if summary else "")


def run_quantize(args, config: QuantConfig) -> RunSummary:
    """``nvfp4-dist quantize`` for a distributed layout or a torchrun launch (CLI args).
    Collective: every rank runs it and gets the summary."""
    show = not args.no_progress
    t_start = time.perf_counter()
    info = init_distributed(timeout_s=args.dist_timeout, single_group=args.backend != "hf")
    with collective_failures(args.dist_timeout):
        loaded = load_model(args.model, seed=args.seed, dtype=DTYPES[args.dtype], device="cpu")
        tokens = load_calibration(loaded, args.calib_samples, args.seq_len, args.seed, args.calib_file)
        run = prepare_run(loaded.model, tokens, args.backend, args.tp, args.batch_size, args.split_calib,
                          args.float64_calib, args.dist_timeout, info.device, show, ep=args.ep,
                          replicas=args.replicas, pp=args.pp)
        result = quantize(run.model, config, run.forward_loop, ctx=run.ctx, show_progress=show)
        table = whole_table(result)  # collective: every rank, before rank 0 prints the table
        summary = export_checkpoint(run.model, result, args.out, fmt=args.format, source_dir=loaded.source_dir,
                                    overwrite=args.overwrite, config=run.hf_config, kernels=config.kernels)
        if args.save_dist_ckpt is not None:  # Megatron only (the CLI checks)
            save_megatron_checkpoint(run.model, args.save_dist_ckpt)
        if getattr(args, "save_dcp", None) is not None:  # hf / fsdp2 layouts (the CLI checks)
            save_dcp_checkpoint(run.model, args.save_dcp)
    return RunSummary(result, summary.path, info.world_size, run.data_ranks, tuple(tokens.shape),
                      time.perf_counter() - t_start, table, summary.ignore)


def run_export(args, config: QuantConfig) -> RunSummary:
    """``nvfp4-dist export``: lay the HF model out (any TP/EP/FSDP2 layout), load weights and
    quantizer state from the saved checkpoint (``args.dist_ckpt``: Megatron dist_checkpointing;
    ``args.dcp``: torch DCP), and write the HF export, without calibrating. Collective."""
    t_start = time.perf_counter()
    info = init_distributed(timeout_s=args.dist_timeout, single_group=args.backend != "hf")
    with collective_failures(args.dist_timeout):
        loaded = load_model(args.model, seed=args.seed, dtype=DTYPES[args.dtype], device="cpu")
        hf_config = base_config(loaded.model, None, None)
        model, ctx = lay_out(loaded.model, args.backend, tp=args.tp, ep=args.ep, replicas=args.replicas,
                             pp=args.pp, timeout_s=args.dist_timeout, device=info.device, data_split=False)
        result = restore(model, config, megatron_checkpoint=args.dist_ckpt, dcp_checkpoint=args.dcp, ctx=ctx)
        out = export_checkpoint(model, result, args.out, fmt=args.format, source_dir=loaded.source_dir,
                                overwrite=args.overwrite, config=hf_config, kernels=config.kernels).path
    return RunSummary(result, out, info.world_size, 1, (0, 0), time.perf_counter() - t_start)
