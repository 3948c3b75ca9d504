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

``--moe``: the Qwen3-30B-A3B-shaped mixture of experts (48 layers, 128 experts top-8; ``--layers``
picks fewer). Extra modes, each its own table:

* ``--experts-impl eager,grouped_mm``: the quantize() table once per transformers experts
  implementation (the forward the observers watch; ``default`` keeps transformers' choice);
* ``--breakdown``: quantize()'s stages run by hand, observe / reduce / search split into dense
  linears and fused experts and both together (observe: the forward with only that kind's
  observers, less a plain forward; steady-state medians of 3 passes after an untimed one);
* ``--qat``: the fake-quant forward (W4A4: weights and inputs fake-quantized in every forward,
  what QAT runs) against the same forward with a plain copy of each weight in its place, the same
  with the fused experts' W4A4 forward as the per-expert loop (the reference) instead of all
  experts at once, one experts module's W4A4 forward both ways against its own unquantized
  forward, and the kernel launches of one stacked-experts fake-quant;
* ``--profile``: one observe and one search pass of ``--breakdown-method`` (all weights) under
  ``torch.profiler``: the kernels that take the most device time in each (where the time of a
  stage goes, for the next optimisation), and the observe pass's kernels less those of a plain
  forward (by kernel name: what the observers add);
* ``--modelopt``: ModelOpt's ``NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG`` on a fresh model of the same
  shapes, after a one-layer warm-up that builds its CUDA extension (needs ``nvidia-modelopt``
  importable; see benchmarks/bench_gptq.py for installing it on the GPU machine); ``--no-ours``
  skips our tables.

Between our methods the model is reused: its quantizer state and fake-quant hooks are removed
(the scale searches leave the weights untouched), which saves building a 61 GB model per method.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.calib import stages
from nvfp4_dist.calib.apply import fake_quant_param, remove_fake_quant
from nvfp4_dist.calib.discover import Inventory, discover
from nvfp4_dist.calib.state import SUFFIXES, buffer_name
from nvfp4_dist.parallel.hf_experts_w4a4 import experts_forward_w4a4, experts_forward_w4a4_loop
from nvfp4_dist.parallel.access import local_shards
from nvfp4_dist.parallel.context import SINGLE_PROCESS

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


def calibration_loop(args, device: torch.device):
    """``forward_loop(model)`` over ``args.samples x args.seq`` random tokens (seed 1), in batches
    of ``args.batch``: the calibration data of every benchmark built on this model."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(args.vocab, (args.samples, args.seq), generator=gen).to(device)

    def forward_loop(model):
        with torch.no_grad():
            for start in range(0, args.samples, args.batch):
                model(input_ids=tokens[start:start + args.batch], use_cache=False)

    return forward_loop


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """``(seconds, result)`` of ``fn()`` with the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def strip_quantization(model: torch.nn.Module) -> None:
    """Undo quantize()'s apply stage: fake-quant hooks and quantizer buffers removed (the scale
    searches leave the weights untouched), so the same model can be quantized again."""
    for module in model.modules():
        remove_fake_quant(module)
        for name, _ in list(module.named_parameters(recurse=False)):
            for suffix in SUFFIXES:
                if buffer_name(name, suffix) in module._buffers:
                    del module._buffers[buffer_name(name, suffix)]


def set_experts_impl(model: torch.nn.Module, impl: str) -> None:
    if impl != "default":
        model.set_experts_implementation(impl)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(args, device, config: QuantConfig, forward_loop, impl: str) -> float:
    """Seconds of quantize() on a one-layer model of the same shapes (Triton's compilation)."""
    small = build_model(argparse.Namespace(**{**vars(args), "layers": 1}), device)
    set_experts_impl(small, impl)
    seconds, _ = timed(device, lambda: quantize(small, config, forward_loop, show_progress=False))
    del small
    free(device)
    return seconds


def run_ours(args, device, forward_loop, impl: str) -> tuple[list[str], float, torch.nn.Module]:
    """quantize() rows of every method on one model of experts implementation ``impl``; returns
    the rows, one plain forward's seconds and the (stripped) model."""
    rows = []
    model = None
    plain_s = 0.0
    for name in args.methods.split(","):
        first_s = warm_up(args, device, QuantConfig(**METHODS[name]), forward_loop, impl)
        if model is None:
            model = build_model(args, device)
            set_experts_impl(model, impl)
            forward_loop(model)  # warm-up (kernels, allocator)
            plain_s, _ = timed(device, lambda: forward_loop(model))
        model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        reset_peak(device)
        total, result = timed(device, lambda: quantize(model, QuantConfig(**METHODS[name]), forward_loop,
                                                       show_progress=False))
        stage_s = ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items())
        rows.append(f"| {name} | {impl} | {total:.2f} | {total / plain_s:.1f} | {stage_s} | {peak_gib(device):.1f} | "
                    f"{model_gib:.1f} | {len(result.inventory.slots)} | {len(result.dead)} | {first_s:.2f} |")
        print(rows[-1], flush=True)
        del result
        strip_quantization(model)
        free(device)
    return rows, plain_s, model


def _kind_inventory(inventory: Inventory, experts: bool) -> Inventory:
    """The part of ``inventory`` of one kind: fused experts or everything else (dense)."""
    modules = {k: m for k, m in inventory.modules.items() if any(s.moe is not None for s in m.slots) == experts}
    slots = tuple(s for m in modules.values() for s in m.slots)
    return Inventory(slots=slots, modules=modules, ignored=inventory.ignored)


def steady_seconds(device, fn, reps: int = 3):
    """``(median seconds, last result)`` of ``reps`` timed calls of ``fn`` after an untimed one:
    the steady state (the allocator's cache grown, Triton's kernels loaded), which a single call
    after ``free()`` is not (it pays for growing the cache again: ~0.1 plain forwards)."""
    fn()
    runs = [timed(device, fn) for _ in range(reps)]
    return statistics.median(s for s, _ in runs), runs[-1][1]


def run_breakdown(args, device, model, forward_loop) -> tuple[list[str], float]:
    """Stage seconds by kind (dense / experts) for ``args.breakdown_method``, stages by hand, and
    both kinds together (their observers in one forward cost more than the sum of each alone:
    the hooks' launches add up on the host). The observe passes and the plain forward they are
    compared with are steady-state medians (:func:`steady_seconds`). Returns the rows and that
    plain forward's seconds."""
    config = QuantConfig(**METHODS[args.breakdown_method])
    rows = []
    inventory = discover(model, config, SINGLE_PROCESS)
    plain_s, _ = steady_seconds(device, lambda: forward_loop(model))
    for kind, experts in (("dense", False), ("experts", True), ("both", None)):
        part = inventory if experts is None else _kind_inventory(inventory, experts)
        observe_s, store = steady_seconds(device, lambda: stages.observe(model, part, config, forward_loop))
        with local_shards(model):
            reduce_s, stats = timed(device, lambda: stages.reduce(part, store, True, SINGLE_PROCESS, device))
            search_s, _ = timed(device, lambda: stages.search(part, stats, config, show_progress=False))
        rows.append(f"| {kind} | {len(part.slots)} | {observe_s - plain_s:.3f} | "
                    f"{(observe_s - plain_s) / plain_s:.2f} | {reduce_s:.2f} | {search_s:.2f} |")
        print(rows[-1], flush=True)
        del store, stats
        free(device)
    return rows, plain_s


def run_profile(args, device, model, forward_loop) -> list[str]:
    """Top kernels by device time (CPU time on the CPU) of one observe and one search pass, and
    the observe pass's kernels beyond a plain forward (what the observers themselves launch)."""
    from torch.profiler import ProfilerActivity, profile

    config = QuantConfig(**METHODS[args.breakdown_method])
    inventory = discover(model, config, SINGLE_PROCESS)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = []

    def kernels(fn) -> tuple[dict[str, tuple[int, float]], object]:
        """kernel name -> (calls, ms) of ``fn()``'s pass, and its result."""
        with profile(activities=activities) as prof:
            out = fn()
            sync(device)
        events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if device.type == "cuda" else "CPU")
                  and (device.type == "cuda" or not e.key.startswith("aten::to"))]
        return {e.key: (e.count, getattr(e, key) / 1e3) for e in events}, out

    def top(stage: str, table: dict[str, tuple[int, float]]) -> None:
        total = sum(ms for _, ms in table.values()) or 1.0
        rows.append(f"| {stage} | (all kernels) | {sum(n for n, _ in table.values())} | {total:.1f} | 100% |")
        for name, (calls, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:args.profile_top]:
            rows.append(f"| {stage} | {name[:60]} | {calls} | {ms:.1f} | {ms / total:.1%} |")

    plain, _ = kernels(lambda: forward_loop(model))
    observed, store = kernels(lambda: stages.observe(model, inventory, config, forward_loop))
    top("observe", observed)
    # by kernel name: the observe pass less the plain forward (calls and time the observers add;
    # a name both run, e.g. an elementwise kernel, counts only its surplus)
    extra = {name: (calls - plain.get(name, (0, 0.0))[0], ms - plain.get(name, (0, 0.0))[1])
             for name, (calls, ms) in observed.items()}
    top("observe less a plain forward", {k: v for k, v in extra.items() if v[1] > 0})
    with local_shards(model):
        stats = stages.reduce(inventory, store, True, SINGLE_PROCESS, device)
        searched, _ = kernels(lambda: stages.search(inventory, stats, config, show_progress=False))
        top("search", searched)
    del store, stats
    free(device)
    return rows


def _experts_param(model):
    """(module, parameter name) of the first fused-experts projection, or None."""
    for module in model.modules():
        if hasattr(module, "gate_up_proj") and getattr(module, "gate_up_proj").dim() == 3:
            return module, "gate_up_proj"
    return None


def run_qat(args, device, model, forward_loop) -> list[str]:
    """Forward seconds with fake-quant weights against a plain copy of each weight in their place."""
    quantize(model, QuantConfig(method="max"), forward_loop, show_progress=False)
    w4a4 = [m for m in model.modules()
            if isinstance(m.forward, functools.partial) and m.forward.func is experts_forward_w4a4]
    seen = []  # the first experts module's inputs (args, kwargs) in the first batch
    hooks = [m.register_forward_pre_hook(lambda _m, a, kw: seen.append((a, kw)) if not seen else None,
                                         with_kwargs=True) for m in w4a4[:1]]
    forward_loop(model)
    for hook in hooks:
        hook.remove()
    fq_s, _ = timed(device, lambda: forward_loop(model))
    loop_s, module_rows = None, []
    if w4a4:
        grouped = {m: m.forward for m in w4a4}
        for m in w4a4:  # the same quantization, expert by expert
            m.forward = functools.partial(experts_forward_w4a4_loop, *m.forward.args)
        forward_loop(model)
        loop_s, _ = timed(device, lambda: forward_loop(model))
        for m, forward in grouped.items():
            m.forward = forward
        module_rows = experts_w4a4_rows(device, w4a4[0], *seen[0])
    hooked = [m for m in model.modules() if hasattr(m, "_nvfp4_fake_quant_handles")]
    params = {m: [n for n, _ in m.named_parameters(recurse=False) if hasattr(m, buffer_name(n, "block_scale"))]
              for m in hooked}
    for m in hooked:
        remove_fake_quant(m)
    handles = []
    for m, names in params.items():  # the same swap as the fake-quant forward, with a copy
        stash = {}

        def pre(mod, _args, names=names, stash=stash):
            for p in names:
                stash[p] = mod._parameters.pop(p)
                setattr(mod, p, stash[p].detach().clone())

        def post(mod, _args, _out, stash=stash):
            for p, param in stash.items():
                delattr(mod, p)
                mod._parameters[p] = param
            stash.clear()
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True)]
    forward_loop(model)
    copy_s, _ = timed(device, lambda: forward_loop(model))
    for h in handles:
        h.remove()
    plain_s, _ = timed(device, lambda: forward_loop(model))
    rows = [f"| forward, fake-quant weights and inputs (W4A4{', experts all at once' if w4a4 else ''}) | "
            f"{fq_s:.3f} | {fq_s / copy_s:.2f} |"]
    if loop_s is not None:
        rows.append(f"| forward, the same with the W4A4 experts as the per-expert loop | "
                    f"{loop_s:.3f} | {loop_s / copy_s:.2f} |")
    rows += [f"| forward, a copy of each weight | {copy_s:.3f} | 1.00 |",
             f"| forward, plain | {plain_s:.3f} | {plain_s / copy_s:.2f} |"] + module_rows
    found = _experts_param(model)
    if found is not None:
        rows += experts_fake_quant_rows(device, *found)  # the quantizer buffers are still there
    strip_quantization(model)
    return rows


def _gpu_kernels(device, fn) -> str:
    """Number of GPU kernels ``fn()`` launches (CUDA profiler), "n/a" off the GPU."""
    if device.type != "cuda":
        return "n/a"
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return str(sum(1 for e in prof.events() if e.device_type.name == "CUDA"))


def experts_w4a4_rows(device, module, args, kwargs) -> list[str]:
    """One experts module's W4A4 forward on its inputs of one calibration batch: all experts at
    once (the installed forward) and the per-expert loop, through the module's hooks (the
    weights' fake-quant included), against the module's own class forward with its unquantized
    weights (transformers' experts implementation); also both W4A4 forwards called without the
    module's hooks (inputs fake-quantized, the weights unquantized: the part the two differ in)."""
    reps = 10 if device.type == "cuda" else 2  # the CPU's weight fake-quant is the torch reference
    grouped = module.forward
    loop = functools.partial(experts_forward_w4a4_loop, *grouped.args)
    cells = []
    with torch.no_grad():
        for name, forward, hooked in (
                ("W4A4, all experts at once", grouped, True), ("W4A4, per-expert loop", loop, True),
                ("inputs' fake-quant only, all experts at once", grouped, False),
                ("inputs' fake-quant only, per-expert loop", loop, False),
                ("unquantized weights, transformers' forward", functools.partial(type(module).forward, module),
                 False)):
            module.forward = forward if hooked else grouped

            def call(forward=forward, hooked=hooked):  # without hooks: the parameters themselves
                return module(*args, **kwargs) if hooked else forward(*args, **kwargs)
            call()
            seconds, _ = timed(device, lambda: [call() for _ in range(reps)])
            cells.append((name, seconds / reps, _gpu_kernels(device, call)))
    module.forward = grouped
    tokens = (args[0] if args else kwargs["hidden_states"]).shape[0]
    return [f"| one experts module's forward ({tokens} tokens), {name} ({kernels} GPU kernels) | "
            f"{s * 1e3:.3f} ms | {s / cells[-1][1]:.2f} (/ unquantized) |" for name, s, kernels in cells]


def experts_fake_quant_rows(device, module, pname) -> list[str]:
    """One stacked-experts fake-quant ([E, rows, cin], per-expert global amax) against a copy,
    and its kernel launches (CUDA profiler)."""
    weight = getattr(module, pname).detach()
    reps = 20
    fq_s, _ = timed(device, lambda: [fake_quant_param(module, pname, weight) for _ in range(reps)])
    copy_s, _ = timed(device, lambda: [weight.clone() for _ in range(reps)])
    launches = _gpu_kernels(device, lambda: fake_quant_param(module, pname, weight))
    shape = "x".join(str(d) for d in weight.shape)
    return [f"| one stacked fake-quant {shape} ({launches} GPU kernels) | {fq_s / reps * 1e3:.3f} ms | "
            f"{fq_s / copy_s:.2f} |", f"| one copy {shape} | {copy_s / reps * 1e3:.3f} ms | 1.00 |"]


def run_modelopt(args, device, forward_loop, impl: str) -> list[str]:
    """ModelOpt 0.47's NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG, after a one-layer warm-up."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        return ["| modelopt | not importable | | | | |"]
    cfg = getattr(mtq, "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", None)
    if cfg is None:
        return [f"| modelopt | {getattr(mtq, '__version__', '?')}: no NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG | | | | |"]
    small = build_model(argparse.Namespace(**{**vars(args), "layers": 1}), device)
    set_experts_impl(small, impl)
    warm_s, _ = timed(device, lambda: mtq.quantize(small, cfg, forward_loop))
    del small
    free(device)
    model = build_model(args, device)
    set_experts_impl(model, impl)
    model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    reset_peak(device)
    total, _ = timed(device, lambda: mtq.quantize(model, cfg, forward_loop))
    row = f"| modelopt local_hessian | {impl} | {total:.2f} | {peak_gib(device):.1f} | {model_gib:.1f} | {warm_s:.2f} |"
    print(row, flush=True)
    del model
    free(device)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("head-dim", 128), ("vocab", 151936), ("samples", 128), ("seq", 512), ("batch", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name in {**DENSE_SHAPES, **MOE_SHAPES}:  # default: the shapes of the chosen model
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--moe", action="store_true", help="the Qwen3-30B-A3B-shaped MoE model")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--experts-impl", default="default",
                        help="comma-separated transformers experts implementations (MoE): default, eager, "
                             "grouped_mm, batched_mm")
    parser.add_argument("--breakdown", action="store_true", help="stage seconds split into dense and experts")
    parser.add_argument("--breakdown-method", default="local_hessian+dss", choices=list(METHODS))
    parser.add_argument("--qat", action="store_true", help="fake-quant forward against a copy of the weights")
    parser.add_argument("--profile", action="store_true", help="top kernels of one observe and one search pass")
    parser.add_argument("--profile-top", type=int, default=12, help="kernels listed per stage")
    parser.add_argument("--modelopt", action="store_true", help="ModelOpt's local-Hessian W4A4 beside ours")
    parser.add_argument("--no-ours", action="store_true", help="skip our quantize() table (e.g. ModelOpt alone)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    for name, default in (MOE_SHAPES if args.moe else DENSE_SHAPES).items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    impls = args.experts_impl.split(",")
    if impls != ["default"] and not args.moe:
        parser.error("--experts-impl needs --moe")
    device = torch.device(args.device)
    forward_loop = calibration_loop(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    kind = (f"Qwen3-MoE, {args.experts} experts top-{args.top_k}, moe_intermediate {args.moe_intermediate}, "
            if args.moe else "Qwen3 ")
    sections = []
    plain_s = None
    model = None
    if not args.no_ours:
        rows = []
        for impl in impls:
            if model is not None:
                del model
                free(device)
            impl_rows, plain_s, model = run_ours(args, device, forward_loop, impl)
            rows += impl_rows
        sections.append("| method | experts impl | quantize s | / plain forward | stages (s) | peak GPU GiB | "
                        "model GiB | weights | dead | 1-layer first call s |\n|---|---|---|---|---|---|---|---|---|---|\n"
                        + "\n".join(rows))
        if args.breakdown:
            rows, steady_plain_s = run_breakdown(args, device, model, forward_loop)
            sections.append(f"Stages by kind ({args.breakdown_method}, experts impl {impls[-1]}; observe = forward "
                            "with that kind's observers less a plain forward, medians of 3 after a warm-up; "
                            f"plain forward {steady_plain_s:.3f} s):\n\n"
                            "| kind | weights | observe s | observe / plain forward | reduce s | search s |\n"
                            "|---|---|---|---|---|---|\n" + "\n".join(rows))
        if args.profile:
            rows = run_profile(args, device, model, forward_loop)
            sections.append(f"Top kernels by {'device' if device.type == 'cuda' else 'CPU'} time, one pass of each "
                            f"stage ({args.breakdown_method}, experts impl {impls[-1]}):\n\n"
                            "| stage | kernel | calls | ms | share of the stage |\n|---|---|---|---|---|\n"
                            + "\n".join(rows))
        if args.qat:
            rows = run_qat(args, device, model, forward_loop)
            sections.append(f"QAT forward (method max, W4A4: weights and inputs fake-quantized per forward; {args.samples}x"
                            f"{args.seq} tokens):\n\n| forward | s | / copy |\n|---|---|---|\n" + "\n".join(rows))
        del model
        free(device)
    if args.modelopt:
        rows = run_modelopt(args, device, forward_loop, impls[-1])
        sections.append("| run | experts impl | quantize s | peak GPU GiB | model GiB | 1-layer warm-up s |\n"
                        "|---|---|---|---|---|---|\n" + "\n".join(rows))
    plain = f"; one plain calibration forward {plain_s:.2f} s" if plain_s is not None else ""
    text = (f"device: {name}; date: {datetime.date.today()}; torch {torch.__version__}; transformers "
            f"{transformers.__version__}; model: {kind}{args.layers} layers, hidden {args.hidden}, intermediate "
            f"{args.intermediate}, vocab {args.vocab}; calibration {args.samples}x{args.seq} tokens in batches of "
            f"{args.batch}{plain}\n\n" + "\n\n".join(sections))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
