"""GPTQ on a Qwen3-8B-shaped model: ours (``QuantConfig(method="gptq")``, all layers at once, and
``gptq_sequential``) beside ModelOpt 0.47.0's GPTQ (its ``nvfp4_default-kv_none-gptq`` recipe:
NVFP4 W4A4, static weight scales, layer-wise, with its fused Triton kernel), same model, same
tokens, one process.

The model, its shapes and the calibration tokens are those of ``bench_e2e.py`` (imported: hidden
4096, 36 layers, intermediate 12288, 32/8 heads, vocab 151936, random bf16 weights, seed 0;
128 x 512 random tokens in batches of 8). Every run quantizes a freshly built model (the same
weights) after a one-layer model of the same shapes was quantized in the same way, so that
Triton's compilation is timed apart (ModelOpt's fused kernel is Triton too). Per run: the wall
time of the quantize call, the peak GPU memory during it (weights included) and a quality figure
both tools give cheaply: the relative error ``||h_q - h|| / ||h||`` of the last hidden state
(before the LM head) on held-out random tokens, ``h`` from the unquantized model. Both
quantized models compute with fake-quantized weights and inputs (W4A4), each the way its tool
runs them. ``--inner`` adds the inner loop alone (sweep + lazy update, fixed scales) on the
model's linear shapes: the torch reference, the Triton kernels with one update per block, and the
two-level update (:class:`nvfp4_dist.kernels.gptq_ops.LazyPropagation`), and a whole
``gptq_quantize`` per shape with the scales searched per block (mse, local_hessian).

Run on a CUDA machine: ``python benchmarks/bench_gptq.py [--out FILE.md] [--no-modelopt]
[--runs gptq,gptq_sequential,modelopt] [--inner]``. Smoke test on the CPU:
``python benchmarks/bench_gptq.py --device cpu --layers 1 --hidden 256 --intermediate 512
--heads 2 --kv-heads 1 --head-dim 128 --vocab 97 --samples 4 --seq 16 --batch 2 --no-modelopt``.

ModelOpt on the GPU machine (no network there; Python 3.12, torch / triton / transformers /
safetensors / numpy / scipy / rich / regex / requests already installed): prepare wheels on a
machine with network, in the repository root (``.whl`` is git-ignored, about 21 MB)::

    P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \\
       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl"
    python3 -m pip download $P nvidia-modelopt==0.47.0 omegaconf==2.3.0 "pulp<4.0" pydantic \\
        pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
    python3 -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl   # only an sdist exists

(pydantic-core's version is the one the downloaded pydantic pins: ``unzip -p .whl/pydantic-2*.whl
'*/METADATA' | grep pydantic-core``), then on the GPU machine::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import DENSE_SHAPES, build_model, sync  # noqa: E402  (the same model and shapes)

from nvfp4_dist import QuantConfig, quantize  # noqa: E402
from nvfp4_dist.kernels.gptq_ops import LazyPropagation, propagate, sweep_block  # noqa: E402
from nvfp4_dist.kernels.gptq import gptq_quantize  # noqa: E402
from nvfp4_dist.kernels.types import KernelImpl, Method  # noqa: E402
from nvfp4_dist.numerics import nvfp4  # noqa: E402

OURS = {"gptq": QuantConfig(method="gptq"), "gptq_sequential": QuantConfig(method="gptq", gptq_sequential=True)}
MODELOPT_RECIPE = "general/ptq/nvfp4_default-kv_none-gptq"


def modelopt_quantizer(fused: bool):
    """``quantize(model, forward_loop)`` with ModelOpt's GPTQ recipe (layer-wise, no layer
    checkpoints on disk, ``fused`` kernel), or None when ModelOpt is not importable."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.recipe import load_recipe
    except ImportError:
        return None
    recipe = load_recipe(MODELOPT_RECIPE, overrides=[f"quantize.algorithm.fused={str(fused).lower()}",
                                                     "quantize.algorithm.layerwise.checkpoint_dir=null"])
    return lambda model, forward_loop: mtq.quantize(model, recipe.quantize, forward_loop)


def last_hidden(model, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """The decoder's final hidden states (fp32) of ``tokens``."""
    with torch.no_grad():
        return torch.cat([model.model(input_ids=tokens[i:i + batch], use_cache=False).last_hidden_state.float()
                          for i in range(0, tokens.shape[0], batch)])


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def timed_run(name: str, run, args, device, tokens, heldout, reference) -> str:
    """One row: quantize a fresh model with ``run(model, forward_loop)`` and measure it."""

    def forward_loop(model):
        with torch.no_grad():
            for start in range(0, tokens.shape[0], args.batch):
                model(input_ids=tokens[start:start + args.batch], use_cache=False)

    small = build_model(argparse.Namespace(**{**vars(args), "layers": 1}), device)
    t0 = time.perf_counter()
    run(small, forward_loop)  # compilation (Triton, extensions) timed apart
    sync(device)
    first_s = time.perf_counter() - t0
    del small
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(args, device)
    model_gib = gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    run(model, forward_loop)
    sync(device)
    total = time.perf_counter() - t0
    peak = gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0
    err = float((last_hidden(model, heldout, args.batch) - reference).norm() / reference.norm())
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row = f"| {name} | {total:.2f} | {peak:.1f} | {model_gib:.1f} | {err:.4f} | {first_s:.2f} |"
    print(row, flush=True)
    return row


def inner_loop(rows: int, cin: int, device: torch.device, kernels: KernelImpl, span: int | None) -> float:
    """Seconds of one column-sequential sweep of a ``[rows, cin]`` weight with fixed scales:
    one :func:`propagate` per block (``span=None``) or the two-level update."""
    gen = torch.Generator().manual_seed(0)
    work = (torch.randn(rows, cin, generator=gen) * 0.02).to(device)
    a = torch.randn(cin, cin, generator=gen).to(device) / cin**0.5
    h = a @ a.T + torch.eye(cin, device=device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = work.abs().amax()
    v = nvfp4.scale_fp8(nvfp4.block_amax(work), g).float().T.contiguous()  # [cin / 16, rows]
    s = nvfp4.global_scale(g)
    sync(device)
    t0 = time.perf_counter()
    lazy = None if span is None else LazyPropagation(work, u, span, kernels)
    for c0 in range(0, cin, 16):
        c1 = c0 + 16
        _, err = sweep_block(work[:, c0:c1], u[c0:c1, c0:c1], v[c0 // 16], s, torch.bfloat16, kernels)
        if lazy is not None:
            lazy.push(c0, err)
        elif c1 < cin:
            propagate(work[:, c1:], err, u[c0:c1, c1:], kernels)
    sync(device)
    return time.perf_counter() - t0


def whole_gptq(rows: int, cin: int, device: torch.device, scales: Method) -> float:
    """Seconds of :func:`gptq_quantize` of a bf16 ``[rows, cin]`` weight, scales searched per
    block (one fused step per block on the GPU), the factorisation of H included."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cin, generator=gen) * 0.02).to(device, torch.bfloat16)
    x = torch.randn(2 * cin, cin, generator=gen, dtype=torch.float64).to(device)
    h = x.T @ x / (2 * cin)
    sync(device)
    t0 = time.perf_counter()
    gptq_quantize(w, h, w.float().abs().amax(), scales, "group")
    sync(device)
    return time.perf_counter() - t0


def inner_table(args, device: torch.device) -> str:
    shapes = {"q/k/v": (args.hidden + 2 * args.kv_heads * args.head_dim, args.hidden),
              "gate/up": (2 * args.intermediate, args.hidden), "down": (args.hidden, args.intermediate)}
    triton = KernelImpl.TRITON if device.type == "cuda" else KernelImpl.TORCH
    # element updates x -= e * u of one sweep: rows * cin^2 / 2 (a rounded product and a rounded
    # difference each, 2 fp32 instructions: an H200 issues about 3.3e13 of them per second)
    lines = ["| weight [rows, cin] | torch reference s | Triton, per-block update s | Triton, two-level s "
             "| two-level G updates/s | gptq_quantize mse s | gptq_quantize local_hessian s |",
             "|---|---|---|---|---|---|---|"]
    for name, (rows, cin) in shapes.items():
        inner_loop(rows, min(cin, 256), device, triton, 128)  # compile
        ref = inner_loop(rows, cin, device, KernelImpl.TORCH, None) if args.inner_torch else float("nan")
        per_block = inner_loop(rows, cin, device, triton, None)
        two_level = inner_loop(rows, cin, device, triton, 128)
        rate = rows * cin * cin / 2 / two_level / 1e9
        whole_gptq(rows, min(cin, 256), device, Method.MSE)  # compile
        whole_gptq(rows, min(cin, 256), device, Method.LOCAL_HESSIAN)
        whole = [whole_gptq(rows, cin, device, m) for m in (Method.MSE, Method.LOCAL_HESSIAN)]
        lines.append(f"| {name} [{rows}, {cin}] | {ref:.2f} | {per_block:.3f} | {two_level:.3f} | {rate:.0f} "
                     f"| {whole[0]:.3f} | {whole[1]:.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("head-dim", 128), ("vocab", 151936), ("samples", 128), ("seq", 512), ("batch", 8),
                          ("heldout", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in DENSE_SHAPES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--runs", default="gptq,gptq_sequential,modelopt",
                        help="comma-separated: gptq, gptq_sequential, modelopt")
    parser.add_argument("--no-modelopt", action="store_true", help="skip ModelOpt (also when not installed)")
    parser.add_argument("--inner", action="store_true", help="also time the inner loop alone per weight shape")
    parser.add_argument("--inner-torch", action="store_true", help="with --inner: the torch reference too (slow)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    args.moe = False  # build_model's dense Qwen3
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in (*OURS, "modelopt")]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {', '.join((*OURS, 'modelopt'))}")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(args.vocab, (args.samples, args.seq), generator=gen).to(device)
    heldout = torch.randint(args.vocab, (args.heldout, args.seq), generator=torch.Generator().manual_seed(2))
    heldout = heldout.to(device)
    model = build_model(args, device)
    reference = last_hidden(model, heldout, args.batch)
    del model
    gc.collect()

    rows, notes = [], []
    for name in runs:
        if name == "modelopt":
            run = None if args.no_modelopt else modelopt_quantizer(fused=device.type == "cuda")
            if run is None:
                notes.append("ModelOpt: skipped (--no-modelopt or not importable)")
                continue
        else:
            config = OURS[name]
            run = (lambda cfg: lambda model, loop: quantize(model, cfg, loop, show_progress=False))(config)
        rows.append(timed_run(name, run, args, device, tokens, heldout, reference))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = (f"device: {device_name}; date: {datetime.date.today()}; torch {torch.__version__}; model: Qwen3 "
            f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}; "
            f"calibration {args.samples}x{args.seq} tokens in batches of {args.batch}; held-out "
            f"{args.heldout}x{args.seq} tokens; command: {' '.join(sys.argv)}\n\n"
            "| run | quantize s | peak GPU GiB | model GiB | held-out hidden rel. error | 1-layer first call s |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "".join(f"\n\n{n}" for n in notes))
    if args.inner:
        text += "\n\nInner loop alone (fixed scales, bf16 values):\n\n" + inner_table(args, device)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
