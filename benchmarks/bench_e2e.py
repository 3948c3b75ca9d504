"""End to end: ``quantize()`` of a Qwen3-8B-shaped model on one GPU (the setting in which
ModelOpt 0.47.0's figures in benchmarks/RESULTS.md were measured).

Run on a CUDA machine: ``python benchmarks/bench_e2e.py [--out FILE.md]``. The model is built
from a transformers ``Qwen3Config`` (hidden 4096, 36 layers, intermediate 12288, 32/8 heads, head
dim 128, vocab 151936) with random bf16 weights on the GPU, in eval mode; calibration is 128 x 512
random tokens in batches of 8, W4A4 (static input scales recorded), like ModelOpt's
``NVFP4_W4A4_*`` presets in that measurement. For each method a freshly built model (same seed) is
quantized and the table gives the wall time of ``quantize()`` (with its stages), the peak GPU
memory during it and the time of one plain calibration forward for reference. Before each, a
one-layer model of the same shapes is quantized once in the same process, so that Triton's
compilation (on disk after a process's first use) is timed apart, as ModelOpt was timed
after its CUDA-extension build. Smaller shapes
(``--layers 2 --hidden 256 ...``, ``--device cpu``) make a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

from nvfp4_dist import QuantConfig, quantize

METHODS = {"max": {"method": "max"}, "mse": {"method": "mse"}, "local_hessian": {"method": "local_hessian"},
           "local_hessian+dss": {"method": "local_hessian", "dss": True}}


# Model shapes: the dense Qwen3-8B and (``--moe``) the Qwen3-30B-A3B mixture of experts.
DENSE_SHAPES = dict(layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8)
MOE_SHAPES = dict(layers=48, hidden=2048, intermediate=6144, heads=32, kv_heads=4, experts=128, top_k=8,
                  moe_intermediate=768)


def build_model(args, device: torch.device) -> torch.nn.Module:
    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                  vocab_size=args.vocab, max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False)
    if args.moe:
        config = Qwen3MoeConfig(**common, num_experts=args.experts, num_experts_per_tok=args.top_k,
                                moe_intermediate_size=args.moe_intermediate, decoder_sparse_step=1,
                                mlp_only_layers=[])
    else:
        config = Qwen3Config(**common)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("head-dim", 128), ("vocab", 151936), ("samples", 128), ("seq", 512), ("batch", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name in {**DENSE_SHAPES, **MOE_SHAPES}:  # default: the shapes of the chosen model
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--moe", action="store_true", help="the Qwen3-30B-A3B-shaped MoE model")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    for name, default in (MOE_SHAPES if args.moe else DENSE_SHAPES).items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(args.vocab, (args.samples, args.seq), generator=gen).to(device)

    def forward_loop(model):
        with torch.no_grad():
            for start in range(0, args.samples, args.batch):
                model(input_ids=tokens[start:start + args.batch], use_cache=False)

    rows = []
    plain_s = None
    for name in args.methods.split(","):
        # the first quantize() of a process compiles the Triton kernels (cached on disk after):
        # a one-layer model of the same shapes takes that cost, timed on its own
        small = build_model(argparse.Namespace(**{**vars(args), "layers": 1}), device)
        t0 = time.perf_counter()
        quantize(small, QuantConfig(**METHODS[name]), forward_loop, show_progress=False)
        sync(device)
        first_s = time.perf_counter() - t0
        del small
        model = build_model(args, device)
        if plain_s is None:
            forward_loop(model)  # warm-up (kernels, allocator)
            sync(device)
            t0 = time.perf_counter()
            forward_loop(model)
            sync(device)
            plain_s = time.perf_counter() - t0
        model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = quantize(model, QuantConfig(**METHODS[name]), forward_loop, show_progress=False)
        sync(device)
        total = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items())
        rows.append(f"| {name} | {total:.2f} | {stages} | {peak:.1f} | {model_gib:.1f} | "
                    f"{len(result.inventory.slots)} | {len(result.dead)} | {first_s:.2f} |")
        print(rows[-1], flush=True)
        del model, result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    kind = (f"Qwen3-MoE, {args.experts} experts top-{args.top_k}, moe_intermediate {args.moe_intermediate}, "
            if args.moe else "Qwen3 ")
    text = (f"device: {name}; date: {datetime.date.today()}; torch {torch.__version__}; model: {kind}"
            f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}; "
            f"calibration {args.samples}x{args.seq} tokens in batches of {args.batch}; one plain calibration "
            f"forward {plain_s:.2f} s\n\n"
            "| method | quantize s | stages (s) | peak GPU GiB | model GiB | weights | dead | 1-layer first call s |\n"
            "|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
