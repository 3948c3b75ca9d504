"""`nvfp4-dist` command line: quantize a model and export it, or inspect an export.

    nvfp4-dist quantize --model {tiny-dense | tiny-moe | PATH} --method {max,mse,local_hessian} [--dss]
                        --format {modelopt,compressed-tensors} --out DIR [--calib-samples N]
                        [--seq-len L] [--seed S] [--dead-experts {weight_only,route_all}] [--overwrite]
    torchrun --nproc-per-node N -m nvfp4_dist quantize --backend {hf,fsdp2,megatron} [--tp T] [--ep E] ...
                        [--replicas R] [--save-dist-ckpt DIR]
    nvfp4-dist inspect DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .calib.checkpoint import check_empty_dir
from .calib.pipeline import quantize
from .config import DeadExpertPolicy, KernelImpl, QuantConfig
from .errors import ConfigError, NVFP4DistError
from .export.hf import export_checkpoint
from .export.inspect import inspect_checkpoint
from .kernels.types import Method
from .models.loading import DTYPES, load_calibration, load_model, make_forward_loop
from .progress import is_main_rank
from .runs import Layout, RunSummary, check_layout_options, is_launched, run_quantize

FORMATS = ("modelopt", "compressed-tensors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvfp4-dist", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate NVFP4 scales and export a checkpoint")
    q.add_argument("--model", required=True,
                   help="embedded model name (tiny-dense, tiny-moe) or a local HF directory (dense or MoE)")
    q.add_argument("--method", choices=[m.value for m in Method], default=Method.LOCAL_HESSIAN.value)
    q.add_argument("--dss", action="store_true", help="decoupled scale search (needs local_hessian)")
    q.add_argument("--dss-beta", nargs=3, type=float, metavar=("MIN", "MAX", "STEP"),
                   default=(0.5, 1.5, 0.05), help="DSS beta grid (default 0.5 1.5 0.05)")
    q.add_argument("--format", choices=FORMATS, default="modelopt")
    q.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--calib-samples", type=int, default=32)
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--calib-file", type=Path, default=None,
                   help="text (.txt) or JSON-lines (.jsonl, 'text' field) calibration data; "
                        "default: seeded synthetic tokens")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--weight-only", action="store_true", help="W4A16: no static input scales")
    q.add_argument("--include", nargs="*", default=[], help="fnmatch patterns of modules to quantize")
    q.add_argument("--exclude", nargs="*", default=None, help="fnmatch patterns never quantized")
    q.add_argument("--kernels", "--kernel-backend", dest="kernels", choices=[b.value for b in KernelImpl],
                   default="auto", help="kernel implementation: auto (Triton on CUDA, torch elsewhere), triton, torch")
    q.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    q.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="model dtype (auto: the checkpoint's; float32 for embedded models)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--backend", "--layout", dest="backend", choices=[m.value for m in Layout], default="hf",
                   help="layout across torchrun ranks: hf (whole model per rank), fsdp2 (FSDP2 "
                        "shards), megatron (Megatron-core GPT, tensor parallel); see nvfp4_dist.runs")
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel size (--backend megatron)")
    q.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size for MoE models (--backend megatron)")
    q.add_argument("--replicas", type=int, default=1,
                   help="--backend fsdp2: HSDP with this many model replicas, each sharded over "
                        "world / replicas ranks (a (replicate, shard) mesh); default 1: plain FSDP2")
    q.add_argument("--dead-experts", choices=[p.value for p in DeadExpertPolicy],
                   default=DeadExpertPolicy.WEIGHT_ONLY.value,
                   help="MoE experts no calibration token reaches: weight_only (MSE search, input "
                        "scale from the layer's live experts; listed in the report) or route_all "
                        "(every token through every expert for the statistics)")
    q.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds any collective may wait before the run fails (a rank died or raised)")
    q.add_argument("--split-calib", action="store_true",
                   help="each data-parallel rank calibrates on its share of the data (statistics "
                        "summed); default: every rank sees all of it, as one process would")
    q.add_argument("--float64-calib", action="store_true",
                   help="calibration forward in float64: Hessian statistics identical at every TP size")
    q.add_argument("--save-dist-ckpt", type=Path, default=None, metavar="DIR",
                   help="--backend megatron: also save the model with its quantizer state through "
                        "megatron.core.dist_checkpointing into DIR (new or empty), restorable at "
                        "any TP/EP with nvfp4_dist.init_quantizer_state")

    i = sub.add_parser("inspect", help="validate an exported checkpoint and summarise it")
    i.add_argument("dir", type=Path)
    return parser


def _config_from_args(args) -> QuantConfig:
    kwargs = dict(method=args.method, dss=args.dss, dss_beta_min=args.dss_beta[0],
                  dss_beta_max=args.dss_beta[1], dss_beta_step=args.dss_beta[2],
                  quantize_inputs=not args.weight_only, include=tuple(args.include),
                  kernels=args.kernels, dead_experts=args.dead_experts)
    if args.exclude is not None:
        kwargs["exclude"] = tuple(args.exclude)
    return QuantConfig(**kwargs)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise NVFP4DistError(f"--out {out} exists; pass --overwrite to replace it "
                             "(it is replaced only once the new export is complete)")


def _print_run(args, config: QuantConfig, run: RunSummary) -> None:
    result = run.result
    print(result.table())
    dss = " + DSS" if config.dss else ""
    split = f", data split over {run.data_ranks} ranks" if run.data_ranks > 1 else ""
    hsdp = f", {args.replicas} replicas" if args.replicas > 1 else ""
    print(f"\n{args.backend} backend on {run.world_size} rank(s) (tp={args.tp}, ep={args.ep}{hsdp}{split}): "
          f"{len(result.slots)} weight shards quantized per rank ({config.method.value}{dss}), "
          f"{len(result.ignored)} modules kept in high precision; calibration "
          f"{run.tokens[0]}x{run.tokens[1]} tokens; {run.seconds:.1f} s")
    print(f"{args.format} checkpoint written to {run.out}")
    if args.save_dist_ckpt is not None:
        print(f"Megatron distributed checkpoint (weights + quantizer state) written to {args.save_dist_ckpt}")


def cmd_quantize(args) -> int:
    config = _config_from_args(args)
    _check_out_dir(args.out, args.overwrite)
    check_layout_options(args.backend, args.tp, args.ep, args.replicas)  # before any work
    if args.save_dist_ckpt is not None:
        if args.backend != "megatron":
            raise ConfigError("--save-dist-ckpt writes a Megatron distributed checkpoint: it needs "
                              "--backend megatron (other backends: save model.state_dict() or use torch DCP)")
        check_empty_dir(args.save_dist_ckpt)

    if args.backend != "hf" or is_launched():  # under torchrun, or a layout needing a process group
        run = run_quantize(args, config)
        if is_main_rank():
            _print_run(args, config, run)
        return 0
    show = not args.no_progress
    t_start = time.perf_counter()
    loaded = load_model(args.model, seed=args.seed, dtype=DTYPES[args.dtype], device=_device(args.device))
    tokens = load_calibration(loaded, args.calib_samples, args.seq_len, args.seed, args.calib_file)
    result = quantize(loaded.model, config, make_forward_loop(tokens, args.batch_size, show),
                      show_progress=show)
    summary = export_checkpoint(loaded.model, result, args.out, fmt=args.format, source_dir=loaded.source_dir,
                                overwrite=args.overwrite, kernels=config.kernels)
    if is_main_rank():
        print(result.table())
        dss = " + DSS" if config.dss else ""
        print(f"\n{len(result.slots)} weights quantized ({config.method.value}{dss}), "
              f"{len(result.ignored)} modules kept in high precision, {len(result.dead)} dead; "
              f"calibration {tokens.shape[0]}x{tokens.shape[1]} tokens; "
              f"{time.perf_counter() - t_start:.1f} s")
        print(f"{args.format} checkpoint ({len(summary.quantized)} NVFP4 modules, "
              f"{len(summary.files)} files) written to {summary.path}")
    return 0


def cmd_inspect(args) -> int:
    report = inspect_checkpoint(args.dir)
    print(report.format())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return cmd_quantize(args)
        return cmd_inspect(args)
    except NVFP4DistError as exc:
        print(f"nvfp4-dist: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
