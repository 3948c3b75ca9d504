"""`nvfp4-dist` command line: quantize a model and export it, or inspect an export.

    nvfp4-dist quantize --model {tiny-dense | tiny-moe | PATH} --method {max,mse,local_hessian,gptq} [--dss]
                        --format {modelopt,compressed-tensors} --out DIR [--calib-samples N]
                        [--seq-len L] [--seed S] [--dead-experts {weight_only,route_all}] [--overwrite]
    torchrun --nproc-per-node N -m nvfp4_dist quantize --backend {hf,fsdp2,megatron} [--tp T] [--ep E] [--pp P] ...
                        [--replicas R] [--save-dist-ckpt DIR]
    nvfp4-dist export --model {tiny-dense | tiny-moe | PATH} (--dist-ckpt DIR --backend megatron [--tp T] [--ep E] [--pp P]
                      | --dcp DIR [--backend fsdp2]) --format ... --out DIR [the quantize run's --dss/--weight-only/...]
    nvfp4-dist inspect DIR

Exit codes: 0 success; 2 refused input or a failed run (one line ``nvfp4-dist: error: ...``);
1 an unexpected error (a bug: one line, ``--debug`` shows the traceback); ``inspect``: 1 when
the checkpoint has problems.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from .calib.checkpoint import check_empty_dir
from .calib.pipeline import quantize
from .config import DeadExpertPolicy, KernelImpl, QuantConfig
from .errors import ConfigError, NVFP4DistError
from .export.hf import export_checkpoint
from .export.inspect import inspect_checkpoint
from .export.outdir import check_output_dir
from .inputs import UsageError, check_export_args, check_quantize_args
from .kernels.types import Method
from .launch import collective_failures, launched_rank, shutdown
from .models.loading import DTYPES, load_calibration, load_model, make_forward_loop
from .progress import is_main_rank
from .runs import Layout, RunSummary, is_launched, run_export, run_quantize

FORMATS = ("modelopt", "compressed-tensors")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line :class:`UsageError` s (exit 2 in :func:`main`)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _quant_options() -> argparse.ArgumentParser:
    """What is quantized and how: the options ``quantize`` calibrates with and ``export`` must
    repeat (a checkpoint saved with other settings is refused, naming the keys)."""
    o = argparse.ArgumentParser(add_help=False)
    o.add_argument("--method", choices=[m.value for m in Method], default=Method.LOCAL_HESSIAN.value,
                   help="block-scale objective (max, mse, local_hessian) or gptq (block scales by "
                        "--gptq-scales, then column-sequential error compensation under the full input Hessian)")
    o.add_argument("--gptq-scales", choices=["mse", "local_hessian"], default="local_hessian",
                   help="objective of GPTQ's block scales (default local_hessian)")
    o.add_argument("--gptq-sequential", action="store_true",
                   help="GPTQ layer by layer, each layer calibrated on the outputs of the quantized earlier layers")
    o.add_argument("--dss", action="store_true", help="decoupled scale search (needs local_hessian)")
    o.add_argument("--dss-beta", nargs=3, type=float, metavar=("MIN", "MAX", "STEP"),
                   default=(0.5, 1.5, 0.05),
                   help="DSS beta grid, multiples of 0.01 up to 2.55 (default 0.5 1.5 0.05)")
    o.add_argument("--weight-only", action="store_true", help="W4A16: no static input scales")
    o.add_argument("--include", nargs="*", default=[], help="fnmatch patterns of modules to quantize")
    o.add_argument("--exclude", nargs="*", default=None, help="fnmatch patterns never quantized")
    o.add_argument("--kernels", "--kernel-backend", dest="kernels", choices=[b.value for b in KernelImpl],
                   default="auto", help="kernel implementation: auto (Triton on CUDA, torch elsewhere), triton, torch")
    o.add_argument("--dead-experts", choices=[p.value for p in DeadExpertPolicy],
                   default=DeadExpertPolicy.WEIGHT_ONLY.value,
                   help="MoE experts no calibration token reaches: weight_only (MSE search, input "
                        "scale from the layer's live experts; listed in the report) or route_all "
                        "(every token through every expert for the statistics)")
    return o


def _run_options() -> argparse.ArgumentParser:
    """The model, the output and the layout across torchrun ranks: shared by quantize and export."""
    o = argparse.ArgumentParser(add_help=False)
    o.add_argument("--model", required=True,
                   help="embedded model name (tiny-dense, tiny-moe) or a local HF directory (dense or MoE)")
    o.add_argument("--format", choices=FORMATS, default="modelopt")
    o.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory that an earlier export wrote")
    o.add_argument("--seed", type=int, default=0, help="weights of the embedded models, synthetic data")
    o.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    o.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="model dtype (auto: the checkpoint's; float32 for embedded models)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--backend", "--layout", dest="backend", choices=[m.value for m in Layout], default="hf",
                   help="layout across torchrun ranks: hf (whole model per rank), fsdp2 (FSDP2 "
                        "shards), megatron (Megatron-core GPT, tensor parallel); see nvfp4_dist.runs")
    o.add_argument("--tp", type=int, default=1, help="tensor-parallel size (--backend megatron)")
    o.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size for MoE models (--backend megatron)")
    o.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel size (--backend megatron): each of the P stages holds and "
                        "calibrates layers / P decoder layers; ranks = tp * pp * data-parallel")
    o.add_argument("--replicas", type=int, default=1,
                   help="--backend fsdp2: HSDP with this many model replicas, each sharded over "
                        "world / replicas ranks (a (replicate, shard) mesh); default 1: plain FSDP2")
    o.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds any collective may wait before the run fails (a rank died or raised)")
    return o


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error")
    parser = _Parser(prog="nvfp4-dist", description=__doc__.split("\n\n")[0], parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True)
    shared = [debug, _run_options(), _quant_options()]

    q = sub.add_parser("quantize", parents=shared, help="calibrate NVFP4 scales and export a checkpoint")
    q.add_argument("--calib-samples", type=int, default=32)
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--calib-file", type=Path, default=None,
                   help="text (.txt) or JSON-lines (.jsonl, 'text' field) calibration data; "
                        "default: seeded synthetic tokens")
    q.add_argument("--split-calib", action="store_true",
                   help="each data-parallel rank calibrates on its share of the data (statistics "
                        "summed); default: every rank sees all of it, as one process would")
    q.add_argument("--float64-calib", action="store_true",
                   help="calibration forward in float64: Hessian statistics identical at every TP size")
    q.add_argument("--save-dist-ckpt", type=Path, default=None, metavar="DIR",
                   help="--backend megatron: also save the model with its quantizer state through "
                        "megatron.core.dist_checkpointing into DIR (new or empty), restorable at "
                        "any TP/EP (nvfp4-dist export --dist-ckpt DIR)")
    q.add_argument("--save-dcp", type=Path, default=None, metavar="DIR",
                   help="--backend hf / fsdp2: also save the model with its quantizer state as a torch "
                        "DCP checkpoint into DIR (new or empty; nvfp4-dist export --dcp DIR)")

    e = sub.add_parser("export", parents=shared,
                       help="export a saved checkpoint (weights + quantizer state) without calibrating, "
                            "at any layout")
    e.add_argument("--dist-ckpt", type=Path, default=None, metavar="DIR",
                   help="a Megatron dist checkpoint saved after quantize (--backend megatron)")
    e.add_argument("--dcp", type=Path, default=None, metavar="DIR",
                   help="a torch DCP checkpoint saved after quantize (--backend hf or fsdp2)")

    i = sub.add_parser("inspect", parents=[debug], help="validate an exported checkpoint and summarise it")
    i.add_argument("dir", type=Path)
    return parser


def _config_from_args(args) -> QuantConfig:
    kwargs = dict(method=args.method, dss=args.dss, dss_beta_min=args.dss_beta[0],
                  dss_beta_max=args.dss_beta[1], dss_beta_step=args.dss_beta[2],
                  quantize_inputs=not args.weight_only, include=tuple(args.include),
                  kernels=args.kernels, dead_experts=args.dead_experts,
                  gptq_scales=args.gptq_scales, gptq_sequential=args.gptq_sequential)
    if args.exclude is not None:
        kwargs["exclude"] = tuple(args.exclude)
    return QuantConfig(**kwargs)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _check_out_dir(out: Path, overwrite: bool, model: str | None = None) -> None:
    """--out/--overwrite, before any work: the exporter's own rule (check_output_dir); ``model``
    (the --model argument, when it names a directory) is protected."""
    check_output_dir(out, overwrite=overwrite, protected=(model,) if model else ())


def _print_run(args, config: QuantConfig, run: RunSummary) -> None:
    result = run.result
    print(run.table)
    dss = " + DSS" if config.dss else ""
    split = f", data split over {run.data_ranks} ranks" if run.data_ranks > 1 else ""
    hsdp = f", {args.replicas} replicas" if args.replicas > 1 else ""
    pp = f", pp={args.pp}" if args.pp > 1 else ""
    print(f"\n{args.backend} backend on {run.world_size} rank(s) (tp={args.tp}, ep={args.ep}{pp}{hsdp}{split}): "
          f"{len(result.slots)} weight shards quantized per rank ({config.method.value}{dss}), "
          f"{len(run.ignore)} modules kept in high precision; calibration "
          f"{run.tokens[0]}x{run.tokens[1]} tokens; {run.seconds:.1f} s")
    print(f"{args.format} checkpoint written to {run.out}")
    if args.save_dist_ckpt is not None:
        print(f"Megatron distributed checkpoint (weights + quantizer state) written to {args.save_dist_ckpt}")
    if args.save_dcp is not None:
        print(f"torch DCP checkpoint (weights + quantizer state) written to {args.save_dcp}")


def cmd_quantize(args) -> int:
    check_quantize_args(args)  # every input, before any work (on every rank of a launch)
    config = _config_from_args(args)
    _check_out_dir(args.out, args.overwrite, args.model)
    for checkpoint in (args.save_dist_ckpt, args.save_dcp):
        if checkpoint is not None:
            check_empty_dir(checkpoint)
    if args.save_dcp is not None and args.backend not in ("hf", "fsdp2"):
        raise ConfigError("--save-dcp saves a torch DCP checkpoint of an hf or fsdp2 layout; "
                          "--backend megatron saves with --save-dist-ckpt")
    if args.save_dcp is not None and args.backend == "hf" and not is_launched():
        run = run_quantize(args, config)  # the one-process run, through the path that saves
        if is_main_rank():
            _print_run(args, config, run)
        return 0

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


def cmd_export(args) -> int:
    check_export_args(args)  # every input, before any work
    config = _config_from_args(args)
    _check_out_dir(args.out, args.overwrite, args.model)
    run = run_export(args, config)
    if is_main_rank():
        checkpoint = args.dist_ckpt if args.dist_ckpt is not None else args.dcp
        print(f"{args.format} checkpoint of {checkpoint} ({len(run.result.slots)} weight shards per rank, "
              f"{args.backend} layout on {run.world_size} rank(s), tp={args.tp}, ep={args.ep}, pp={args.pp}) "
              "written to "
              f"{run.out} in {run.seconds:.1f} s")
    return 0


def cmd_inspect(args) -> int:
    report = inspect_checkpoint(args.dir)
    print(report.format())
    return 0 if report.ok else 1


def _rank() -> int:
    """This process's rank: the process group's, or torchrun's RANK before the group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return launched_rank()


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines).replace(":; ", ": ") if lines else ""


def _report(message: str) -> None:
    """Rank 0 prints the error line; another rank prints it (marked with its rank) only once the
    process group exists: before that every rank refuses the same input alike."""
    rank = _rank()
    if rank == 0:
        print(f"nvfp4-dist: error: {message}", file=sys.stderr)
    elif dist.is_available() and dist.is_initialized():
        print(f"nvfp4-dist: error (rank {rank}): {message}", file=sys.stderr)


def main(argv: list[str] | None = None, leave_group: bool = False) -> int:
    """The command line; returns the exit code (see the module docstring). ``leave_group``: once
    a run has ended well on every rank (a barrier), leave the process group it joined, as a
    process must before it exits (:func:`entry`); in-process callers keep the group."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        debug = getattr(args, "debug", False)
        if args.command == "inspect":
            return cmd_inspect(args)
        code = cmd_quantize(args) if args.command == "quantize" else cmd_export(args)
        if leave_group:
            with collective_failures(args.dist_timeout):
                shutdown(barrier=True)
        return code
    except NVFP4DistError as exc:
        if debug:
            traceback.print_exc()
        _report(_one_line(exc) or type(exc).__name__)
        return 2
    except Exception as exc:  # a bug: one line, the traceback on request
        if debug:
            traceback.print_exc()
        first = _one_line(exc)
        _report(f"unexpected {type(exc).__name__}{': ' + first[:500] if first else ''}"
                + ("" if debug else " (rerun with --debug for the traceback)"))
        return 1


def entry() -> None:
    """The process entry point (the ``nvfp4-dist`` script, ``python -m nvfp4_dist``, torchrun):
    the command line, leaving the process group before the process exits. Without that, each
    rank's exit left gloo's transport to the interpreter's teardown, where CI saw rank 0 of a
    complete 2-rank run abort (SIGABRT, "terminate called without an active exception")."""
    sys.exit(main(leave_group=True))


if __name__ == "__main__":
    entry()
