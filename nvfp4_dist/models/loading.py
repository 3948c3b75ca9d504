"""Model and calibration-data loading for the CLI: embedded models or local HF directories,
calibration tokens and the forward loop that feeds them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import ModelLoadError
from ..progress import progress
from .tiny import EMBEDDED_MODELS, build_embedded, calibration_tokens


# --dtype choices: the model dtype (auto: the checkpoint's; float32 for embedded models).
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to calibrate: ``source_dir`` is the HF directory (None for embedded)."""

    model: nn.Module
    name: str
    source_dir: Path | None
    vocab_size: int


def check_hf_dir(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` is a local HF model directory with safetensors."""
    if not path.is_dir():
        raise ModelLoadError(f"--model {path}: not a directory and not an embedded model "
                             f"({', '.join(EMBEDDED_MODELS)})")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {path}: no config.json; expected a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(others[:3])}: convert them to safetensors first)" if others else ""
        raise ModelLoadError(f"--model {path}: no *.safetensors weights{hint}; nvfp4_dist loads "
                             "safetensors only, never pickled checkpoints")


def check_loading_info(path: Path, info: dict) -> None:
    """Refuse a checkpoint whose tensors do not cover the model: transformers would fill a
    missing weight with random values (and drop unexpected ones) and the run would go on."""
    problems = []
    for kind, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "of the wrong shape")):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or ())
        if keys:
            listed = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} tensor(s) {what}: {listed}")
    if problems:
        raise ModelLoadError(f"--model {path}: the checkpoint does not match the model its config.json "
                             "describes (" + "; ".join(problems) + "); fix or re-download the weights")


def load_model(spec: str, seed: int = 0, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """``spec``: an embedded model name or a local HF directory (safetensors, no remote code)."""
    if spec in EMBEDDED_MODELS:
        model = build_embedded(spec, seed=seed, dtype=dtype or torch.float32).to(device)
        return LoadedModel(model, spec, None, model.config.vocab_size)
    path = Path(spec).expanduser()
    check_hf_dir(path)
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", trust_remote_code=False, use_safetensors=True,
            output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--model {path}: transformers could not load it ({type(exc).__name__}: "
                             f"{first[:300]}); is a weight file truncated or damaged?") from exc
    check_loading_info(path, info)
    model = model.to(device).eval()
    return LoadedModel(model, path.name, path, model.config.vocab_size)


def load_calibration(loaded: LoadedModel, samples: int, seq_len: int, seed: int,
                     text_file: Path | None = None) -> torch.Tensor:
    """Calibration token ids ``[samples, seq_len]``: tokenized lines of ``text_file`` (with the
    model directory's tokenizer) or seeded synthetic tokens."""
    if text_file is None:
        return calibration_tokens(loaded.vocab_size, samples, seq_len, seed)
    if loaded.source_dir is None:
        raise ModelLoadError("--calib-file needs a model directory with a tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(loaded.source_dir, trust_remote_code=False)
    text = Path(text_file).read_text()
    if text_file.suffix == ".jsonl":
        text = "\n".join(json.loads(line).get("text", "") for line in text.splitlines() if line.strip())
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].reshape(-1)
    need = samples * seq_len
    if ids.numel() < need:
        raise ModelLoadError(f"--calib-file {text_file}: {ids.numel()} tokens, need "
                             f"{need} (= --calib-samples {samples} x --seq-len {seq_len})")
    return ids[:need].reshape(samples, seq_len)


def make_forward_loop(tokens: torch.Tensor, batch_size: int, show_progress: bool):
    """A forward loop over ``tokens [samples, seq_len]`` in batches, on the model's device."""

    def forward_loop(model):
        device = next(model.parameters()).device
        batches = range(0, tokens.shape[0], batch_size)
        for start in progress(batches, desc="calibrate", enabled=show_progress):
            model(input_ids=tokens[start:start + batch_size].to(device))

    return forward_loop
