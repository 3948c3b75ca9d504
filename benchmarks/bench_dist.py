"""Distributed end to end: ``quantize()`` of the Qwen3-8B-shaped model (and, ``--moe``, the
Qwen3-30B-A3B-shaped MoE model) laid out over the GPUs of a torchrun launch, beside the same
model on one GPU, in one call.

    torchrun --nproc-per-node 2 benchmarks/bench_dist.py --backend megatron --tp 2 --out tp2.md
    torchrun --nproc-per-node 2 benchmarks/bench_dist.py --backend fsdp2 --split-calib --out fsdp2.md
    torchrun --nproc-per-node 2 benchmarks/bench_dist.py --backend megatron --ep 2 --moe --split-calib
    torchrun --nproc-per-node 1 benchmarks/bench_dist.py --backend megatron --moe --layers 8 --phases one-gpu

Model, data and methods are bench_e2e.py's (its shapes, builder and ``METHODS``; random bf16
weights, 128 x 512 random tokens in batches of 8, W4A4). One launch runs two phases, each with a
freshly built model of the same seed:

1. ``one GPU``: the layout family at size one (``megatron``: TP=1 / EP=1; ``fsdp2``: the plain HF
   model). Every rank feeds all the data and no statistic is reduced across ranks, so each rank
   does exactly one GPU's work, side by side on its own GPU (its rows are the TP=1 figures; the
   collective columns read 0, which the smoke test asserts).
2. the layout asked for (``--tp`` / ``--ep`` / FSDP2 over every rank); ``--split-calib`` gives
   each data-parallel rank its share of the data (FSDP2, and EP whose other ranks are data
   parallel for attention), as the CLI's option does. EP without it: every rank feeds all the
   data and the all-gather dispatcher brings each expert the tokens of every rank, i.e. each
   token once per rank (the statistics normalise by the token count; the expert work does not
   shrink). TP ranks always feed all the data (they form one model replica).

Before each phase's timed run a one-layer model of the same layout is quantized once (Triton's
compilation and the process groups' first collectives timed apart, as bench_e2e does), then one
plain calibration forward is run twice and the second timed. Per rank the table gives the
stages of ``QuantResult.seconds``, the collectives issued during ``quantize()`` and during the
plain forward (calls and bytes: counted in this process only, by wrapping torch.distributed's
collective functions, and every module-level alias of them, around the timed call; the bytes of
a call are the larger of its input and output buffers on this rank, i.e. an all-reduce of n bytes
counts n, whose ring transfer is 2n(p-1)/p on the wire; calls on one-rank groups move nothing and
are not counted; torch's functional collectives (DTensor redistribution) are not counted), the
peak GPU memory during ``quantize()``, and the bytes this rank holds: its model parameters, the
weights it quantizes (its shards) and its reduced input statistics (Hessian blocks and amaxes).
Below the table: the layout's speed-up over one GPU (one-GPU mean over ranks / layout's slowest
rank) for ``quantize()`` and each stage, against the goals of TP=2 (search >= 1.8x, whole >= 1.5x).

CPU smoke run (gloo, tiny shapes that split evenly at TP=2): ``--device cpu --layers 2 --hidden 64
--intermediate 128 --heads 4 --kv-heads 2 --head-dim 16 --vocab 128 --samples 4 --seq 16 --batch 2
--method local_hessian``. Megatron's GPT forward needs CUDA in megatron-core 0.16 (rotary tables),
so on the CPU the Megatron layouts run in the test harness's patched workers
(tests/benchmarks/test_bench_dist_small.py); FSDP2 also under plain torchrun. The GPU runs of the
project, with the megatron-core wheel they carry: scripts/gpu_two_gpu.sh.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import pickle
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.launch import collective_failures, init_distributed, init_megatron, shard_fsdp2, shutdown
from nvfp4_dist.parallel.access import local_shards, local_tensor, local_weight
from nvfp4_dist.parallel.context import SINGLE_PROCESS
from nvfp4_dist.parallel.fsdp import fsdp_context
from nvfp4_dist.parallel.reduce import world_objects


def _load_bench_e2e():
    """benchmarks/bench_e2e.py (not a package: loaded by path, so this file runs from anywhere)."""
    spec = importlib.util.spec_from_file_location("nvfp4_bench_e2e", Path(__file__).with_name("bench_e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


E2E = _load_bench_e2e()
STAGES = ("discover", "observe", "reduce", "search", "settle", "apply")
MIB, GIB = 2**20, 2**30

# torch.distributed's collectives (those of this torch that exist are wrapped)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list")
_OBJECTS = {"all_gather_object", "gather_object"}  # payload: one pickled object per rank


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _group_of(args, kwargs):
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    return group


class CollectiveCounter:
    """Counts the collectives this process issues inside ``with counter:`` (calls and bytes per
    function; see the module docstring for what a byte is). Nested calls (torch's own
    ``all_gather_object`` calling ``all_gather``) count once, at the outermost one."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._local = threading.local()
        self._patched: list[tuple[object, str, object]] = []

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if getattr(self._local, "depth", 0):
                return fn(*args, **kwargs)
            group = _group_of(args, kwargs)
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            if size > 1 or name in ("send", "recv", "isend", "irecv"):
                if name in _OBJECTS:
                    obj = args[1] if len(args) > 1 else kwargs.get("obj")
                    moved = size * len(pickle.dumps(obj))
                elif name in ("broadcast_object_list", "scatter_object_list"):
                    moved = len(pickle.dumps(args[0] if args else kwargs.get("object_list")))
                else:
                    moved = max([_tensor_bytes(a) for a in (*args, *kwargs.values())] + [0])
                self.calls[name] = self.calls.get(name, 0) + 1
                self.bytes[name] = self.bytes.get(name, 0) + moved
            self._local.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = 0

        return wrapper

    def __enter__(self):
        originals = {id(getattr(dist, n)): n for n in COLLECTIVES if hasattr(dist, n)}
        wrappers = {n: self._wrap(n, getattr(dist, n)) for n in originals.values()}
        # every module-level alias too (megatron binds dist_all_gather_func at import)
        for module in list(sys.modules.values()):
            try:
                namespace = vars(module)
            except Exception:  # lazy proxies in sys.modules that are not modules
                continue
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                name = originals.get(id(value))
                if name is not None and callable(value):
                    self._patched.append((module, attr, value))
                    setattr(module, attr, wrappers[name])
        return self

    def __exit__(self, *exc):
        for module, attr, value in reversed(self._patched):
            setattr(module, attr, value)
        self._patched.clear()
        return False

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@dataclass(frozen=True)
class Phase:
    """One layout of a launch: ``layout`` in ("hf", "fsdp2", "megatron") with its sizes."""

    name: str
    layout: str
    tp: int = 1
    ep: int = 1
    split: bool = False


@dataclass
class Row:
    """One rank's figures in one phase (gathered to rank 0)."""

    phase: str
    rank: int
    quantize_s: float
    seconds: dict
    forward_s: float | None
    calls: int
    coll_bytes: int
    by_kind: dict
    forward_calls: int
    forward_bytes: int
    peak_bytes: int | None
    model_bytes: int
    weight_bytes: int
    stats_bytes: int
    slots: int


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("head-dim", 128), ("vocab", 151936), ("samples", 128), ("seq", 512), ("batch", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name in {**E2E.DENSE_SHAPES, **E2E.MOE_SHAPES}:  # default: the shapes of the chosen model
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--moe", action="store_true", help="the Qwen3-30B-A3B-shaped MoE model")
    parser.add_argument("--backend", "--layout", dest="backend", choices=("megatron", "fsdp2"), required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--split-calib", action="store_true",
                        help="layout phase: each data-parallel rank feeds its share of the data")
    parser.add_argument("--method", default="local_hessian+dss", choices=sorted(E2E.METHODS))
    parser.add_argument("--phases", default="both", choices=("both", "one-gpu", "layout"))
    parser.add_argument("--no-plain-forward", action="store_true", help="skip the timed plain forward")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="cuda: NCCL, one GPU per rank; cpu: gloo (auto: cuda when available)")
    parser.add_argument("--dist-timeout", type=float, default=1200.0)
    parser.add_argument("--out", default=None, help="also write the markdown (rank 0)")
    args = parser.parse_args(argv)
    for name, default in (E2E.MOE_SHAPES if args.moe else E2E.DENSE_SHAPES).items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    if args.backend == "fsdp2" and (args.tp != 1 or args.ep != 1):
        parser.error(f"--tp {args.tp} / --ep {args.ep} need --backend megatron")
    if args.moe and args.tp != 1:
        parser.error(f"--tp {args.tp}: the Megatron MoE builder supports TP=1 (split experts with --ep)")
    if not args.moe and args.ep != 1:
        parser.error(f"--ep {args.ep} needs --moe (a dense model has no experts)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def phases_of(args) -> list[Phase]:
    if args.backend == "megatron":
        one = Phase("one GPU (megatron TP=1 EP=1)", "megatron")
        size = f"EP={args.ep}" if args.moe else f"TP={args.tp}"
        layout = Phase(f"megatron {size}", "megatron", args.tp, args.ep, args.split_calib)
    else:
        one = Phase("one GPU (HF model)", "hf")
        layout = Phase("fsdp2", "fsdp2", split=args.split_calib)
    return {"both": [one, layout], "one-gpu": [one], "layout": [layout]}[args.phases]


def _build_hf(args, device, layers: int):
    model = E2E.build_model(argparse.Namespace(**{**vars(args), "layers": layers}), device)
    if args.moe:
        # Qwen3-30B-A3B's config renormalises the top-k router weights (norm_topk_prob true, as
        # the Megatron builder needs); transformers' default, which bench_e2e keeps, does not.
        model.config.norm_topk_prob = True
        for module in model.modules():
            if hasattr(module, "norm_topk_prob"):
                module.norm_topk_prob = True
    return model


def _one_rank_at_a_time(fn):
    """``fn()`` on each rank in turn (host memory: the Megatron builders hold a CPU copy of the
    whole HF state dict and the CPU-built model; two ranks at once would hold it twice)."""
    result = None
    for r in range(dist.get_world_size()):
        if dist.get_rank() == r:
            result = fn()
        dist.barrier()
    return result


def build(args, phase: Phase, device, layers: int, ctx):
    """(model, context, forward_loop) of ``phase`` on this rank: ``layers`` decoder layers."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if phase.layout == "megatron":
        from megatron.core import parallel_state as ps

        from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
        from nvfp4_dist.models.megatron_moe import build_megatron_moe_gpt

        builder = build_megatron_moe_gpt if args.moe else build_megatron_gpt
        model = _one_rank_at_a_time(lambda: builder(_build_hf(args, device, layers), device=device))
        ranks, data_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        tokens = _tokens(args, data_rank, ranks) if phase.split else _tokens(args, 0, 1)
        return model, ctx, megatron_forward_loop(tokens, args.batch)
    model = _build_hf(args, device, layers)
    if phase.layout == "fsdp2":
        model = shard_fsdp2(model, device)
        ctx = fsdp_context(model, data_split=phase.split)
        tokens = _tokens(args, rank, world) if phase.split else _tokens(args, 0, 1)
    else:
        tokens = _tokens(args, 0, 1)
    return model, ctx, _hf_loop(tokens, args.batch)


def _tokens(args, share: int, shares: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(args.vocab, (args.samples, args.seq), generator=gen)
    if shares > args.samples:
        raise SystemExit(f"bench_dist: --samples {args.samples} cannot be split over {shares} ranks")
    return tokens.chunk(shares)[share]


def _hf_loop(tokens: torch.Tensor, batch: int):
    def forward_loop(model):
        device = next(model.parameters()).device
        for start in range(0, tokens.shape[0], batch):
            model(input_ids=tokens[start:start + batch].to(device), use_cache=False)

    return forward_loop


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _held_bytes(model, result) -> tuple[int, int, int]:
    """(model parameters, quantized weights, input statistics) bytes on this rank."""
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    with local_shards(model):
        params = sum(nbytes(local_tensor(p.data)) for p in model.parameters())
        weights = sum(nbytes(local_weight(s)) for s in result.slots)
    stats = sum(nbytes(t) for s in result.statistics.inputs.values() for t in (s.hessian_sum, s.amax)
                if t is not None)
    return params, weights, stats


def run_phase(args, phase: Phase, device) -> Row:
    config = QuantConfig(**E2E.METHODS[args.method])
    ctx = SINGLE_PROCESS
    if phase.layout == "megatron":  # one parallel_state for the warm-up and the timed run
        ctx = init_megatron(phase.tp, timeout_s=args.dist_timeout, data_split=phase.split, ep=phase.ep)
    small, small_ctx, loop = build(args, phase, device, 1, ctx)
    quantize(small, config, loop, ctx=small_ctx, show_progress=False)
    del small
    gc.collect()
    model, ctx, loop = build(args, phase, device, args.layers, ctx)
    forward_s, fwd = None, CollectiveCounter()
    if not args.no_plain_forward:
        with torch.no_grad():
            loop(model)
            _sync(device)
            dist.barrier()
            with fwd:
                t0 = time.perf_counter()
                loop(model)
                _sync(device)
                forward_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    with CollectiveCounter() as counter:
        t0 = time.perf_counter()
        result = quantize(model, config, loop, ctx=ctx, show_progress=False)
        _sync(device)
        total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    params, weights, stats = _held_bytes(model, result)
    row = Row(phase.name, dist.get_rank(), total, dict(result.seconds), forward_s, counter.total_calls,
              counter.total_bytes, dict(counter.bytes), fwd.total_calls, fwd.total_bytes, peak, params,
              weights, stats, len(result.slots))
    del model, result
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _stage_names(rows: list[Row]) -> list[str]:
    seen = {k for r in rows for k in r.seconds}
    return [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))


def _fmt(value, scale=1.0, digits=2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def format_report(args, rows: list[Row], world: int) -> str:
    stages = _stage_names(rows)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    kind = (f"Qwen3-MoE, {args.experts} experts top-{args.top_k}, moe_intermediate {args.moe_intermediate}, "
            if args.moe else "Qwen3 ")
    head = (f"device: {world} x {name}; date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"torch {torch.__version__}; method {args.method}; model: {kind}{args.layers} layers, hidden "
            f"{args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}; calibration "
            f"{args.samples}x{args.seq} tokens in batches of {args.batch}"
            f"{' (layout phase: split over data-parallel ranks)' if args.split_calib else ''}\n"
            f"command: torchrun --nproc-per-node {world} benchmarks/bench_dist.py {' '.join(args.argv)}\n\n")
    cols = (["phase", "rank", "quantize s", *[f"{s} s" for s in stages], "plain fwd s", "coll calls",
             "coll MiB", "fwd coll MiB", "peak GiB", "model GiB", "weights GiB", "stats GiB", "weights"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.phase, str(r.rank), _fmt(r.quantize_s), *[_fmt(r.seconds.get(s)) for s in stages],
                 _fmt(r.forward_s), str(r.calls), _fmt(r.coll_bytes, MIB, 1), _fmt(r.forward_bytes, MIB, 1),
                 _fmt(r.peak_bytes, GIB, 1), _fmt(r.model_bytes, GIB, 3), _fmt(r.weight_bytes, GIB, 3),
                 _fmt(r.stats_bytes, GIB, 3), str(r.slots)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in rows:
        if r.by_kind and r.rank == 0:
            kinds = ", ".join(f"{k} {r.by_kind[k] / MIB:.1f} MiB" for k in sorted(r.by_kind))
            notes.append(f"- {r.phase}, rank 0, collectives during quantize(): {kinds}")
    notes += speedups(rows, stages)
    return head + "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def speedups(rows: list[Row], stages: list[str]) -> list[str]:
    """One line per layout phase: one-GPU mean over ranks / the layout's slowest rank."""
    phases = list(dict.fromkeys(r.phase for r in rows))
    if len(phases) != 2:
        return []
    one = [r for r in rows if r.phase == phases[0]]
    lay = [r for r in rows if r.phase == phases[1]]

    def ratio(get):
        base = sum(get(r) or 0.0 for r in one) / len(one)
        slow = max(get(r) or 0.0 for r in lay)
        return base / slow if slow > 0 else float("nan")

    parts = [f"quantize() {ratio(lambda r: r.quantize_s):.2f}x (goal at TP=2: >= 1.5x)"]
    for s in stages:
        goal = " (goal at TP=2: >= 1.8x)" if s == "search" else ""
        parts.append(f"{s} {ratio(lambda r, s=s: r.seconds.get(s)):.2f}x{goal}")
    held = lambda get: max(get(r) for r in lay) / max(1, max(get(r) for r in one))  # noqa: E731
    return [f"- {phases[1]} against one GPU: " + ", ".join(parts),
            f"- held per rank, {phases[1]} / one GPU: weights {held(lambda r: r.weight_bytes):.3f}, "
            f"statistics {held(lambda r: r.stats_bytes):.3f}, model {held(lambda r: r.model_bytes):.3f}"]


@dataclass
class Report:
    text: str
    rows: list[Row]


def run(argv=None) -> Report | None:
    """The benchmark in this process (one rank of a launch); rank 0 gets the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    info = init_distributed("nccl" if args.device == "cuda" else "gloo", timeout_s=args.dist_timeout,
                            single_group=True)
    device = info.device
    with collective_failures(args.dist_timeout):
        rows = []
        for phase in phases_of(args):
            row = run_phase(args, phase, device)
            rows += [Row(**fields) for fields in world_objects(asdict(row))]  # plain dicts travel
        text = format_report(args, rows, info.world_size)
    if info.rank != 0:
        return None
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return Report(text, rows)


def main() -> None:
    try:
        run()
    except BaseException:
        shutdown()  # a failed rank: leave without waiting for the others
        raise
    shutdown(barrier=True)  # every rank done before any leaves the process group


if __name__ == "__main__":
    main()
