"""Model and calibration-data loading for the CLI: embedded models or local HF directories,
calibration tokens and the forward loop that feeds them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import ConfigError, ModelLoadError
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


def config_vocab_size(path: Path) -> int:
    """The vocabulary size config.json of the HF directory ``path`` declares (no weights read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--model {path}: config.json could not be read ({type(exc).__name__}: "
                             f"{first[:200]})") from None
    return int(config.get_text_config().vocab_size)


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


# Files one of which a model directory's tokenizer needs (transformers >= 5 would otherwise
# build an empty tokenizer from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def read_calibration_text(text_file: Path) -> str:
    """The calibration text of ``text_file``: UTF-8 text (.txt and anything else) or JSON lines
    (.jsonl) with a string 'text' field on every non-blank line. ModelLoadError naming the line
    for a missing, unreadable, binary or malformed file."""
    text_file = Path(text_file)
    name = f"--calib-file {text_file}"
    if not text_file.exists():
        raise ModelLoadError(f"{name}: no such file")
    if not text_file.is_file():
        raise ModelLoadError(f"{name}: not a regular file; pass a .txt or .jsonl file")
    try:
        data = text_file.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    nul = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ModelLoadError(f"{name}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                             "calibration data must be UTF-8 text or JSON lines") from None
    if nul >= 0:
        line = data[:nul].count(b"\n") + 1
        raise ModelLoadError(f"{name}: line {line} holds a NUL byte (a binary file?); "
                             "calibration data must be UTF-8 text or JSON lines")
    if text_file.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ModelLoadError(f"{name}: line {number} is not valid JSON ({exc.msg}, column "
                                     f"{exc.colno}); each line must be an object with a 'text' field") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ModelLoadError(f"{name}: line {number} has no string 'text' field; each line "
                                     'must be an object like {"text": "..."}')
            texts.append(record["text"])
        text = "\n".join(texts)
    if not text.strip():
        raise ModelLoadError(f"{name}: holds no text")
    return text


def load_tokenizer(source_dir: Path, vocab_size: int):
    """The tokenizer of the model directory ``source_dir``, refused when it has more tokens than
    the model's vocabulary (``vocab_size`` embedding rows): its ids would index past the table."""
    from transformers import AutoTokenizer

    if not any((Path(source_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"--calib-file needs the tokenizer of --model {source_dir}, which has no "
                             f"tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the model's "
                             "tokenizer files into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--calib-file needs the tokenizer of --model {source_dir}, which could not be "
                             f"loaded ({type(exc).__name__}: {first[:200]}); add the tokenizer files "
                             "to the model directory") from None
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(f"--model {source_dir}: the tokenizer has {len(tokenizer)} tokens but the model's "
                             f"vocabulary holds {vocab_size} (config.json vocab_size); ids past "
                             f"{vocab_size - 1} have no embedding: use the model's own tokenizer")
    return tokenizer


def tokenize_calibration(source_dir: Path, vocab_size: int, samples: int, seq_len: int,
                         text_file: Path) -> torch.Tensor:
    """Token ids ``[samples, seq_len]`` of ``text_file`` with the tokenizer of ``source_dir``."""
    tokenizer = load_tokenizer(source_dir, vocab_size)
    text = read_calibration_text(text_file)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].reshape(-1)
    need = samples * seq_len
    if ids.numel() < need:
        raise ModelLoadError(f"--calib-file {text_file}: {ids.numel()} tokens, need "
                             f"{need} (= --calib-samples {samples} x --seq-len {seq_len})")
    ids = ids[:need]
    if int(ids.max()) >= vocab_size:
        raise ModelLoadError(f"--calib-file {text_file}: token id {int(ids.max())} is past the model's "
                             f"vocabulary ({vocab_size}); use the model's own tokenizer")
    return ids.reshape(samples, seq_len)


def load_calibration(loaded: LoadedModel, samples: int, seq_len: int, seed: int,
                     text_file: Path | None = None) -> torch.Tensor:
    """Calibration token ids ``[samples, seq_len]``: tokenized lines of ``text_file`` (with the
    model directory's tokenizer) or seeded synthetic tokens."""
    if samples < 1 or seq_len < 1:
        raise ConfigError(f"--calib-samples {samples} / --seq-len {seq_len}: both must be >= 1")
    if text_file is None:
        return calibration_tokens(loaded.vocab_size, samples, seq_len, seed)
    if loaded.source_dir is None:
        raise ModelLoadError("--calib-file needs a model directory with a tokenizer")
    return tokenize_calibration(loaded.source_dir, loaded.vocab_size, samples, seq_len, text_file)


def make_forward_loop(tokens: torch.Tensor, batch_size: int, show_progress: bool):
    """A forward loop over ``tokens [samples, seq_len]`` in batches, on the model's device."""

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")

    def forward_loop(model):
        device = next(model.parameters()).device
        batches = range(0, tokens.shape[0], batch_size)
        for start in progress(batches, desc="calibrate", enabled=show_progress):
            model(input_ids=tokens[start:start + batch_size].to(device))

    return forward_loop
