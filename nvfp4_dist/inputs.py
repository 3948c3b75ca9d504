"""Input checks of ``nvfp4-dist quantize``, all in one place, run before any expensive work.

:func:`check_quantize_args` refuses, with a one-line :class:`~nvfp4_dist.errors.NVFP4DistError`
naming the option and the fix, every input a run would otherwise discover late or never: CLI
numbers out of range, an ``--out`` that cannot be written, a missing / binary / malformed
``--calib-file`` (with the line number), a tokenizer larger than the model's vocabulary, a
``--device`` this machine lacks and a ``--backend`` whose prerequisites are missing. It runs on
every rank of a torchrun launch before the process group exists, so all ranks refuse alike.
(The overwrite rules of an existing ``--out`` are the CLI's ``_check_out_dir``; selection
patterns that match nothing are refused by discovery, before the calibration forward.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from .errors import ConfigError
from .models.loading import check_hf_dir, config_vocab_size, read_calibration_text, tokenize_calibration
from .launch import check_megatron_sizes, launched_world_size
from .models.tiny import EMBEDDED_MODELS, embedded_config_dict
from .numerics.compact import check_beta_grid
from .runs import Layout, check_layout_options

MAX_DSS_BETAS = 1000  # grid points of --dss-beta (the default grid has 21)
MAX_SEED = 2**63 - 2  # torch generators take a signed 64-bit seed (the loader adds 1)


class UsageError(ConfigError):
    """A command line argparse refuses (unknown option, bad choice, not a number)."""


def _at_least_one(option: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{option} {value} must be >= 1")


def check_numbers(args) -> None:
    """Every number of ``quantize`` / ``export`` in its range, named by its option."""
    for option, name in (("--batch-size", "batch_size"), ("--calib-samples", "calib_samples"),
                         ("--seq-len", "seq_len"), ("--tp", "tp"), ("--ep", "ep"), ("--pp", "pp"),
                         ("--replicas", "replicas")):
        if hasattr(args, name):  # export has no calibration numbers
            _at_least_one(option, getattr(args, name))
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed {args.seed} must be in [0, {MAX_SEED}]")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise ConfigError(f"--dist-timeout {args.dist_timeout:g} must be a positive number of seconds")
    lo, hi, step = args.dss_beta
    grid = f"--dss-beta {lo:g} {hi:g} {step:g}"
    if not all(math.isfinite(v) for v in (lo, hi, step)):
        raise ConfigError(f"{grid}: MIN MAX STEP must be finite numbers")
    if not (0 < lo <= 1.0 <= hi):
        raise ConfigError(f"{grid}: need 0 < MIN <= 1 <= MAX (the grid must contain beta = 1)")
    if step <= 0:
        raise ConfigError(f"{grid}: STEP must be > 0")
    if (hi - lo) / step + 1 > MAX_DSS_BETAS:
        raise ConfigError(f"{grid}: {int((hi - lo) / step) + 1} grid points (at most {MAX_DSS_BETAS}); "
                          "use a larger STEP")
    if getattr(args, "dss", False) and (why := check_beta_grid(lo, hi, step)):
        raise ConfigError(f"{grid}: {why}")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_path(out: Path, option: str = "--out") -> None:
    """``out`` names a directory the run can create or replace: not an existing file, and its
    nearest existing ancestor a writable directory. (Whether an existing ``out`` may be replaced
    is the overwrite rule, checked elsewhere.)"""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out} is an existing file; name a directory")
    parent = _nearest_existing(out.absolute().parent)
    if not parent.is_dir():
        raise ConfigError(f"{option} {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: cannot write in {parent} (permission denied); "
                          "choose another location")


def check_device(spec: str) -> None:
    """``--device`` names a device this machine has: auto, cpu, cuda or cuda:N."""
    if spec == "auto":
        return
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA device on this machine; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")


def _cuda_usable() -> bool:
    """Whether CUDA calls work here: a GPU is visible, or (CPU test workers) megatron-core's
    ``torch.cuda.current_device()`` call has been made to answer without one."""
    if torch.cuda.is_available():
        return True
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        return False
    return True


def check_backend(backend: str) -> None:
    """The prerequisites of ``--backend``: megatron needs megatron-core and CUDA."""
    if Layout(backend) is not Layout.MEGATRON:
        return
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError("--backend megatron needs megatron-core (pip install megatron-core); "
                          "use --backend hf or fsdp2 without it")
    if not _cuda_usable():
        raise ConfigError("--backend megatron needs CUDA (megatron-core's GPT forward runs on a GPU) "
                          "and this machine has none; use --backend hf or fsdp2")


def check_model_and_data(args) -> None:
    """``--model`` names an embedded model or an HF directory, and ``--calib-file`` holds
    enough readable text that the model's own tokenizer turns into ids inside its vocabulary."""
    embedded = args.model in EMBEDDED_MODELS
    if not embedded:
        check_hf_dir(Path(args.model).expanduser())
    if args.calib_file is None:
        return
    read_calibration_text(args.calib_file)  # file problems first: they name the line
    if embedded:
        raise ConfigError(f"--calib-file needs a model directory with a tokenizer; {args.model} is an "
                          "embedded model (drop --calib-file for synthetic tokens)")
    path = Path(args.model).expanduser()
    tokenize_calibration(path, config_vocab_size(path), args.calib_samples, args.seq_len, args.calib_file)


def model_layers(model: str) -> int | None:
    """Decoder layers of ``--model`` from its config alone (None when the config does not say)."""
    if model in EMBEDDED_MODELS:
        cfg = embedded_config_dict(model)
    else:
        path = Path(model).expanduser() / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # the model checks name the problem
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    layers = cfg.get("num_hidden_layers") if isinstance(cfg, dict) else None
    return layers if isinstance(layers, int) else None


def check_megatron_layout(args) -> None:
    """``--backend megatron`` sizes against the launch and the model, before any work: the
    launcher's world size divisible by tp * pp (and ep * tp per stage), the model's decoder layers
    by pp."""
    if Layout(args.backend) is not Layout.MEGATRON:
        return
    check_megatron_sizes(launched_world_size(), args.tp, args.ep, args.pp)
    layers = model_layers(args.model) if args.pp > 1 else None
    if layers is not None and layers % args.pp:
        raise ConfigError(f"--pp {args.pp}: the model's {layers} decoder layers do not split evenly "
                          f"over {args.pp} pipeline stages; choose a --pp that divides {layers}")


def check_quantize_args(args) -> None:
    """Every check of ``quantize``'s inputs, cheapest first (see the module docstring)."""
    check_numbers(args)
    check_layout_options(args.backend, args.tp, args.ep, args.replicas, args.pp)
    if args.gptq_sequential and args.pp > 1:
        raise ConfigError(f"--gptq-sequential is not supported with --pp {args.pp}: use one-shot GPTQ "
                          "(drop --gptq-sequential) or --pp 1")
    check_megatron_layout(args)
    if args.save_dist_ckpt is not None and Layout(args.backend) is not Layout.MEGATRON:
        raise ConfigError("--save-dist-ckpt writes a Megatron distributed checkpoint: it needs "
                          "--backend megatron (other backends: save model.state_dict() or use torch DCP)")
    check_out_path(args.out)
    check_device(args.device)
    check_backend(args.backend)
    check_model_and_data(args)


def check_export_args(args) -> None:
    """Every check of ``export``'s inputs (a saved checkpoint to export), cheapest first."""
    check_numbers(args)
    check_layout_options(args.backend, args.tp, args.ep, args.replicas, args.pp)
    check_megatron_layout(args)
    layout = Layout(args.backend)
    if (args.dist_ckpt is None) == (args.dcp is None):
        raise ConfigError("export needs exactly one checkpoint: --dist-ckpt DIR (Megatron) or --dcp DIR (torch DCP)")
    if args.dist_ckpt is not None and layout is not Layout.MEGATRON:
        raise ConfigError("--dist-ckpt is a Megatron distributed checkpoint: it needs --backend megatron")
    if args.dcp is not None and layout is Layout.MEGATRON:
        raise ConfigError("--backend megatron restores from --dist-ckpt; --dcp is for --backend hf or fsdp2")
    checkpoint = args.dist_ckpt if args.dist_ckpt is not None else args.dcp
    if not Path(checkpoint).is_dir():
        raise ConfigError(f"checkpoint {checkpoint} is not a directory")
    check_out_path(args.out)
    check_device(args.device)
    check_backend(args.backend)
    if args.model not in EMBEDDED_MODELS:
        check_hf_dir(Path(args.model).expanduser())
