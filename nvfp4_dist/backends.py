"""The CLI's distributed backends: lay the loaded HF model out, calibrate, export one checkpoint.

    torchrun --nproc-per-node N -m nvfp4_dist quantize --backend {hf,fsdp2,megatron} [--tp T] [--ep E] ...

* ``hf``: every rank holds the whole model (data parallel).
* ``fsdp2``: ``fully_shard`` per decoder layer over all ranks; the search reads DTensor shards.
* ``megatron``: a Megatron-core GPT built from the same HF weights at TP=T (DP = N / T); an
  MoE model (Qwen3-MoE style) becomes SequentialMLP experts spread over EP=E ranks.
Calibration data: every rank feeds all of it and nothing is summed (default; the result equals
one process's), or, with ``--split-calib``, each data-parallel rank feeds its own share and the
statistics are summed (faster; equal up to fp32 summation order). ``--float64-calib`` runs the
calibration forward in float64, which makes Hessian statistics identical across TP sizes (see
:mod:`nvfp4_dist.parallel.invariance`). Every backend exports an HF checkpoint.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import QuantConfig
from .errors import ConfigError
from .launch import collective_failures, init_distributed, init_megatron, launched_world_size, shard_fsdp2
from .parallel.context import SINGLE_PROCESS, ParallelContext
from .parallel.invariance import float64_forward
from .progress import is_main_rank


class Backend(str, enum.Enum):
    """How the CLI lays the model out across ranks."""

    HF = "hf"  # whole model on every rank (data parallel); no sharding
    FSDP2 = "fsdp2"  # torch FSDP2 shards of every weight; least memory per rank
    MEGATRON = "megatron"  # Megatron-core GPT with tensor parallelism (needs megatron-core)


@dataclass
class PreparedRun:
    """A laid-out model with its calibration loop, context and exporter."""

    model: nn.Module
    forward_loop: Callable[[nn.Module], None]
    ctx: ParallelContext
    export: Callable  # (result, out_dir, fmt, overwrite, source_dir) -> Path
    data_ranks: int  # ranks the calibration data is split over (1: every rank sees all of it)


def is_launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return launched_world_size() > 1


def _hf_config(model: nn.Module) -> dict:
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]  # as save_pretrained records it
    return cfg


def _share(tokens: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    if tokens.shape[0] < ranks:
        raise ConfigError(f"--calib-samples {tokens.shape[0]} cannot be split over {ranks} "
                          "data-parallel ranks; use more samples or drop --split-calib")
    return tokens.chunk(ranks)[rank]


def check_layout_options(backend: Backend | str, tp: int, ep: int, replicas: int) -> None:
    """Refuse layout options that ``backend`` would ignore (the CLI calls this before any work)."""
    backend = Backend(backend)
    if backend is not Backend.MEGATRON and (tp != 1 or ep != 1):
        raise ConfigError(f"--tp {tp} / --ep {ep} need --backend megatron")
    if backend is not Backend.FSDP2 and replicas != 1:
        raise ConfigError(f"--replicas {replicas} (HSDP) needs --backend fsdp2")


def prepare_run(hf_model: nn.Module, tokens: torch.Tensor, backend: Backend, tp: int,
                batch_size: int, split_calib: bool, float64_calib: bool, timeout_s: float,
                device: torch.device, show_progress: bool, ep: int = 1, replicas: int = 1) -> PreparedRun:
    """Lay ``hf_model`` out for ``backend`` on this rank (see module docstring)."""
    from .cli import make_forward_loop
    from .export.distributed import dtensor_namer, export_distributed

    backend = Backend(backend)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    config = _hf_config(hf_model)
    check_layout_options(backend, tp, ep, replicas)

    if backend is Backend.MEGATRON:
        from .models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
        from .parallel.megatron import hf_module_names, megatron_namer

        ctx = init_megatron(tp, timeout_s=timeout_s, data_split=split_calib, ep=ep)
        from megatron.core import parallel_state as ps

        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        data_ranks = dp if split_calib else 1
        data = _share(tokens, dp_rank, dp) if split_calib else tokens
        if getattr(hf_model.config, "num_experts", 0):
            from .models.megatron_moe import build_megatron_moe_gpt

            model = build_megatron_moe_gpt(hf_model, device=device)
        else:
            model = build_megatron_gpt(hf_model, device=device)
        loop = megatron_forward_loop(data, batch_size, show_progress)

        def export(result, out_dir, fmt, overwrite, source_dir):
            return export_distributed(model, result, out_dir, ctx, config, fmt, megatron_namer(ctx),
                                      hf_module_names(model, result.ignored), source_dir, overwrite)
    else:
        data_ranks = world if split_calib else 1
        data = _share(tokens, rank, world) if split_calib else tokens
        if backend is Backend.FSDP2:
            from .parallel.fsdp import fsdp_context

            model = shard_fsdp2(hf_model.to(device), device, replicas)
            ctx = fsdp_context(model, data_split=split_calib)
        else:
            model = hf_model.to(device)
            ctx = ParallelContext(dp=dist.group.WORLD) if (split_calib and world > 1) else SINGLE_PROCESS
        loop = make_forward_loop(data, batch_size, show_progress)

        def export(result, out_dir, fmt, overwrite, source_dir):
            return export_distributed(model, result, out_dir, ctx, config, fmt, dtensor_namer(ctx),
                                      None, source_dir, overwrite)
    if float64_calib:
        loop = float64_forward(loop)
    return PreparedRun(model, loop, ctx, export, data_ranks)


def run_quantize(args, config: QuantConfig) -> int:
    """``nvfp4-dist quantize`` for a distributed backend or a torchrun launch (CLI args)."""
    from .calib.pipeline import quantize
    from .cli import DTYPES
    from .models.loading import load_calibration, load_model

    show = not args.no_progress
    t_start = time.perf_counter()
    info = init_distributed(timeout_s=args.dist_timeout, single_group=args.backend != "hf")
    with collective_failures(args.dist_timeout):
        loaded = load_model(args.model, seed=args.seed, dtype=DTYPES[args.dtype], device="cpu")
        tokens = load_calibration(loaded, args.calib_samples, args.seq_len, args.seed, args.calib_file)
        run = prepare_run(loaded.model, tokens, args.backend, args.tp, args.batch_size, args.split_calib,
                          args.float64_calib, args.dist_timeout, info.device, show, ep=args.ep,
                          replicas=args.replicas)
        result = quantize(run.model, config, run.forward_loop, ctx=run.ctx, show_progress=show)
        out = run.export(result, args.out, args.format, args.overwrite, loaded.source_dir)
        if args.save_dist_ckpt is not None:  # Megatron only (the CLI checks)
            from .export.checkpoint import save_megatron_checkpoint

            save_megatron_checkpoint(run.model, args.save_dist_ckpt)
    if is_main_rank():
        print(result.table())
        dss = " + DSS" if config.dss else ""
        split = f", data split over {run.data_ranks} ranks" if run.data_ranks > 1 else ""
        hsdp = f", {args.replicas} replicas" if args.replicas > 1 else ""
        print(f"\n{args.backend} backend on {info.world_size} rank(s) (tp={args.tp}, ep={args.ep}{hsdp}{split}): "
              f"{len(result.slots)} weight shards quantized per rank ({config.method.value}{dss}), "
              f"{len(result.ignored)} modules kept in high precision; calibration "
              f"{tokens.shape[0]}x{tokens.shape[1]} tokens; {time.perf_counter() - t_start:.1f} s")
        print(f"{args.format} checkpoint written to {out}")
        if args.save_dist_ckpt is not None:
            print(f"Megatron distributed checkpoint (weights + quantizer state) written to {args.save_dist_ckpt}")
    return 0
