"""inspect_checkpoint(): validate an exported NVFP4 checkpoint and summarise it.

Every check runs and every problem is collected (nothing stops at the first one):
  * config.json ``quantization_config`` well formed for its format (and, for ModelOpt, the
    ``hf_quant_config.json`` keys vLLM requires);
  * index and files consistent: every indexed file exists and holds exactly the tensors the
    index assigns to it, no stray shard files, format marker and version in the headers;
  * every NVFP4 module has its tensors with the dtypes and shapes of the key scheme in
    :mod:`.formats`, input scales exactly when the config declares W4A4, no orphan scale tensors;
  * no NaN/Inf in any floating tensor (FP8 included); block, global and input scales > 0;
  * ``quant_algo`` (ModelOpt: ``NVFP4`` for W4A4, ``W4A16_NVFP4`` weight-only, in config.json and
    hf_quant_config.json alike) and ``config_groups`` agree with the input scales stored;
  * fused siblings (q/k/v, gate/up, w1/w3) share bit-identical weight and input global scales and
    are either all NVFP4 or all high precision (the exporter's rule, ``export/checks.py``);
  * no quantized module matches the ignore list, and every dense 2-D ``<m>.weight`` that is not
    an embedding is in it (engines quantize every Linear the list does not exclude, and load
    routers and heads with it).
Tensors are loaded one at a time, so a checkpoint of any size is inspected in bounded memory.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ExportError
from ..numerics.constants import BLOCK_SIZE
from ..layout.fused import fused_keys
from .checks import fused_groups, mixed_members, unequal_groups
from .formats import (CT_SCALE_DTYPE, MODELOPT_W4A4_ALGO, MODELOPT_W4A16_ALGO, SCHEMES, ExportFormat,
                      TensorScheme, config_w4a4, detect_format, modelopt_quant_algo)
from .reader import check_format_version, read_json, weight_map

_MAX_LISTED = 8


@dataclass(frozen=True)
class ModuleInfo:
    """One NVFP4 module: name, logical weight shape ``(out, in)``, static input scale stored."""

    name: str
    shape: tuple[int, int]
    input_scale: bool


@dataclass
class InspectReport:
    """Result of :func:`inspect_checkpoint`; ``ok`` when ``problems`` is empty."""

    path: Path
    fmt: ExportFormat | None = None
    w4a4: bool | None = None
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    total_bytes: int = 0
    modules: list[ModuleInfo] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    fused_groups: int = 0
    vocab_size: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, verbose: bool = False) -> str:
        """Readable summary (``verbose`` lists every NVFP4 module with its shape)."""
        fmt = self.fmt.value if self.fmt is not None else "unknown"
        mode = {None: "", True: ", W4A4 (static input scales)", False: ", W4A16 (weight-only)"}[self.w4a4]
        lines = [f"checkpoint: {self.path}",
                 f"format:     {fmt}{mode}",
                 f"files:      {len(self.files)} shard file(s), {self.tensors} tensors, "
                 f"{self.total_bytes / 2**20:.2f} MiB",
                 f"NVFP4:      {len(self.modules)} modules, {self.fused_groups} fused group(s) checked",
                 f"ignored:    {', '.join(self.ignore) if self.ignore else '(none)'}"]
        if verbose:
            lines += [f"  {m.name:<60} {m.shape[0]:>6} x {m.shape[1]:<6}"
                      + ("  +input scale" if m.input_scale else "") for m in self.modules]
        lines.append("result:     OK" if self.ok else f"result:     {len(self.problems)} problem(s)")
        lines += [f"  - {p}" for p in self.problems]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def _listed(items) -> str:
    items = list(items)
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _expect(obj: dict, key: str, expected, where: str, problems: list[str]) -> None:
    if key not in obj:
        problems.append(f"{where}: missing key {key!r} (expected {expected!r})")
    elif obj[key] != expected:
        problems.append(f"{where}: {key}={obj[key]!r}, expected {expected!r}")


def _check_args(args, where: str, expected: dict, problems: list[str]) -> None:
    if not isinstance(args, dict):
        problems.append(f"{where}: missing or not an object")
        return
    for key, value in expected.items():
        _expect(args, key, value, where, problems)


def config_problems(fmt: ExportFormat, qc: dict) -> list[str]:
    """Problems of a ``quantization_config`` against the format's scheme
    (:func:`.formats.quantization_config`)."""
    problems: list[str] = []
    where = "config.json quantization_config"
    if not isinstance(qc.get("ignore"), list) or not all(isinstance(x, str) for x in qc.get("ignore", [])):
        problems.append(f"{where}: 'ignore' must be a list of module names")
    group = (qc.get("config_groups") or {}).get("group_0")
    if not isinstance(group, dict):
        problems.append(f"{where}: config_groups.group_0 missing")
        group = {}
    elif not isinstance(group.get("targets"), list) or not group["targets"]:
        problems.append(f"{where}.config_groups.group_0: 'targets' must be a non-empty list")
    fp4 = {"num_bits": 4, "type": "float", "group_size": BLOCK_SIZE}
    if fmt is ExportFormat.MODELOPT:
        _check_quant_algo(qc, where, config_w4a4(qc), problems)
        _expect(qc, "group_size", BLOCK_SIZE, where, problems)
        if "kv_cache_scheme" not in qc:
            problems.append(f"{where}: missing key 'kv_cache_scheme'")
        producer = qc.get("producer")
        if not (isinstance(producer, dict) and {"name", "version"} <= producer.keys()):
            problems.append(f"{where}: 'producer' must hold 'name' and 'version'")
        weights, inputs = {**fp4, "dynamic": False}, {**fp4, "dynamic": False}
    else:
        _expect(qc, "format", "nvfp4-pack-quantized", where, problems)
        _expect(qc, "quantization_status", "compressed", where, problems)
        if "kv_cache_scheme" in qc and qc["kv_cache_scheme"] is not None:
            problems.append(f"{where}: kv_cache_scheme={qc['kv_cache_scheme']!r}, but no KV-cache scales "
                            "are exported (expected null)")
        tensor_group = {"strategy": "tensor_group", "symmetric": True}
        weights = {**fp4, **tensor_group, "dynamic": False}
        inputs = {**fp4, **tensor_group, "dynamic": "local"}
    _check_args(group.get("weights"), f"{where}.config_groups.group_0.weights", weights, problems)
    if group.get("input_activations") is not None:
        _check_args(group["input_activations"], f"{where}.config_groups.group_0.input_activations",
                    inputs, problems)
    if fmt is ExportFormat.COMPRESSED_TENSORS:
        for key in ("weights", "input_activations"):
            args = group.get(key)
            if isinstance(args, dict) and _dtype_name(args.get("scale_dtype")) != _dtype_name(CT_SCALE_DTYPE):
                problems.append(f"{where}.config_groups.group_0.{key}: scale_dtype={args.get('scale_dtype')!r}, "
                                f"expected {CT_SCALE_DTYPE!r} (the NVFP4 presets' FP8 block scales)")
    return problems


def _dtype_name(value) -> str | None:
    return value.removeprefix("torch.") if isinstance(value, str) else None


def _check_quant_algo(quant: dict, where: str, w4a4: bool | None, problems: list[str]) -> None:
    """ModelOpt ``quant_algo``: NVFP4 or W4A16_NVFP4, matching ``w4a4`` when that is known."""
    algo = quant.get("quant_algo")
    allowed = (MODELOPT_W4A4_ALGO, MODELOPT_W4A16_ALGO)
    if algo not in allowed:
        problems.append(f"{where}: quant_algo={algo!r}, expected one of {list(allowed)}")
    elif w4a4 is not None and algo != modelopt_quant_algo(w4a4):
        what = "static input scales (W4A4)" if w4a4 else "weight-only quantization (no input scales)"
        problems.append(f"{where}: quant_algo={algo!r}, but the checkpoint declares {what}; "
                        f"expected {modelopt_quant_algo(w4a4)!r}")


def hf_quant_config_problems(content: dict, w4a4: bool | None = None) -> list[str]:
    """Problems of a ModelOpt ``hf_quant_config.json`` (vLLM rejects it without group_size,
    kv_cache_quant_algo and exclude_modules); ``w4a4``: what config.json declares, if known."""
    problems: list[str] = []
    producer = content.get("producer")
    if not (isinstance(producer, dict) and {"name", "version"} <= producer.keys()):
        problems.append("hf_quant_config.json: 'producer' must hold 'name' and 'version'")
    quant = content.get("quantization")
    if not isinstance(quant, dict):
        return problems + ["hf_quant_config.json: 'quantization' object missing"]
    where = "hf_quant_config.json quantization"
    _check_quant_algo(quant, where, w4a4, problems)
    _expect(quant, "group_size", BLOCK_SIZE, where, problems)
    if "kv_cache_quant_algo" not in quant:
        problems.append(f"{where}: missing key 'kv_cache_quant_algo' (vLLM requires it, null is fine)")
    elif quant["kv_cache_quant_algo"] is not None:
        problems.append(f"{where}: kv_cache_quant_algo={quant['kv_cache_quant_algo']!r}, but no KV-cache "
                        "scales are exported (expected null)")
    if not isinstance(quant.get("exclude_modules"), list):
        problems.append(f"{where}: 'exclude_modules' must be a list (vLLM requires it)")
    return problems


def _ignored(name: str, patterns: list[str], fmt: ExportFormat) -> bool:
    for pattern in patterns:
        if fmt is ExportFormat.COMPRESSED_TENSORS and pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def _scan_files(report: InspectReport) -> dict[str, str]:
    """Index/file consistency; returns tensor name -> file for the tensors actually present."""
    path = report.path
    try:
        assigned = weight_map(path)
    except ExportError as err:
        report.problems.append(str(err))
        return {}
    present: dict[str, str] = {}
    unmarked: list[str] = []
    by_file: dict[str, set[str]] = defaultdict(set)
    for name, file in assigned.items():
        by_file[file].add(name)
    for file in sorted(by_file):
        if not (path / file).is_file():
            report.problems.append(f"index lists {file} ({len(by_file[file])} tensors) but the file is missing")
            continue
        report.files.append(file)
        with safe_open(path / file, framework="pt") as f:
            keys = set(f.keys())
            if not _check_header(f.metadata(), file, report):
                unmarked.append(file)
        for name in sorted(by_file[file] - keys):
            report.problems.append(f"index maps {name} to {file}, which does not hold it")
        extra = keys - by_file[file]
        if extra:
            report.problems.append(f"{file} holds tensors the index does not list: {_listed(sorted(extra))}")
        present.update({name: file for name in keys & by_file[file]})
    stray = sorted(p.name for p in path.glob("*.safetensors") if p.name not in by_file)
    if stray:
        report.problems.append(f"shard files not referenced by the index: {_listed(stray)}")
    if unmarked:
        report.notes.append(f"no nvfp4_dist format marker (written by another tool?) in: {_listed(unmarked)}")
    return present


def _check_header(metadata: dict | None, file: str, report: InspectReport) -> bool:
    """Format marker and version of one file's header; False when it carries no marker."""
    metadata = metadata or {}
    try:
        check_format_version(metadata, file)
    except ExportError as err:
        report.problems.append(str(err))
    written = metadata.get("nvfp4_dist_format")
    if written is not None and report.fmt is not None and written != report.fmt.value:
        report.problems.append(f"{file}: header says format {written!r} but config.json says {report.fmt.value!r}")
    return written is not None


def _check_values(path: Path, present: dict[str, str], scale_names: set[str], report: InspectReport):
    """Load each tensor once: count it, flag non-finite values and non-positive scales.

    Returns (name -> (dtype, shape), name -> value of every one-element scale tensor).
    """
    info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    scalars: dict[str, torch.Tensor] = {}
    nonfinite, nonpositive = [], []
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in present.items():
        by_file[file].append(name)
    for file in sorted(by_file):
        with safe_open(path / file, framework="pt") as f:
            for name in sorted(by_file[file]):
                t = f.get_tensor(name)
                info[name] = (t.dtype, tuple(t.shape))
                report.tensors += 1
                report.total_bytes += t.numel() * t.element_size()
                if not t.is_floating_point():
                    continue
                # FP8 widened (its NaN encodings decode to NaN); wider types checked in place.
                values = t.float() if t.element_size() == 1 else t
                bad = int((~torch.isfinite(values)).sum())
                if bad:
                    nonfinite.append(f"{name} ({bad})")
                if name in scale_names:
                    if bool((values <= 0).any()):
                        nonpositive.append(name)
                    if t.numel() == 1:
                        scalars[name] = values.reshape(())
    if nonfinite:
        report.problems.append(f"NaN/Inf values in {len(nonfinite)} tensor(s): {_listed(nonfinite)}")
    if nonpositive:
        report.problems.append(f"scales that are zero or negative: {_listed(nonpositive)}")
    return info, scalars


def _expect_tensor(name: str, info: dict, dtype: torch.dtype, shape: tuple[int, ...] | None,
                   problems: list[str]) -> bool:
    if name not in info:
        problems.append(f"{name}: missing")
        return False
    got_dtype, got_shape = info[name]
    ok = True
    if got_dtype != dtype:
        problems.append(f"{name}: dtype {got_dtype}, expected {dtype}")
        ok = False
    if shape is not None and got_shape != shape:
        problems.append(f"{name}: shape {list(got_shape)}, expected {list(shape)}")
        ok = False
    return ok


def _check_module(module: str, scheme: TensorScheme, info: dict, w4a4: bool | None,
                  problems: list[str]) -> ModuleInfo | None:
    """dtypes/shapes of one NVFP4 module's tensors (the key scheme of :mod:`.formats`)."""
    packed = f"{module}.{scheme.packed}"
    if not _expect_tensor(packed, info, torch.uint8, None, problems):
        return None
    shape = info[packed][1]
    if len(shape) != 2:
        problems.append(f"{packed}: expected 2-D [out, in/2], got {list(shape)}")
        return None
    out, cin = shape[0], shape[1] * 2
    if cin % BLOCK_SIZE:
        problems.append(f"{module}: input dimension {cin} is not a multiple of {BLOCK_SIZE}")
        return None
    _expect_tensor(f"{module}.{scheme.scale}", info, torch.float8_e4m3fn, (out, cin // BLOCK_SIZE), problems)
    _expect_tensor(f"{module}.{scheme.weight_global}", info, torch.float32, scheme.global_shape, problems)
    input_name = f"{module}.{scheme.input_global}"
    has_input = input_name in info
    if has_input:
        _expect_tensor(input_name, info, torch.float32, scheme.global_shape, problems)
    if w4a4 is True and not has_input:
        problems.append(f"{input_name}: missing, but the config declares static input scales (W4A4)")
    if w4a4 is False and has_input:
        problems.append(f"{input_name}: present, but the config declares weight-only quantization")
    if scheme.packed != "weight" and f"{module}.weight" in info:
        problems.append(f"{module}: holds both a dense 'weight' and '{scheme.packed}'")
    return ModuleInfo(module, (out, cin), has_input)


def _check_fused(modules: list[str], dense: list[str], scheme: TensorScheme,
                 scalars: dict[str, torch.Tensor], report: InspectReport) -> list[str]:
    """Fused siblings (the exporter's rule, ``export/checks.py``): one bit-identical weight global
    scale, one input global scale, and no high-precision member. Returns the mixed members."""
    groups = fused_groups(modules)
    mixed = sorted(m for names in mixed_members(groups, dense).values() for m in names)
    if mixed:
        report.problems.append("high-precision members of fused groups whose other members are NVFP4 "
                               f"(engines load a fused layer in one precision): {_listed(mixed)}")
    report.fused_groups += sum(len(members) > 1 for members in groups.values())
    for suffix, why in ((scheme.weight_global, "engines merge these layers"),
                        (scheme.input_global, "they read the same input; engines keep one input scale")):
        values = {m: scalars[f"{m}.{suffix}"].reshape(()).view(torch.int32).item()
                  for m in modules if f"{m}.{suffix}" in scalars}
        for group, got in unequal_groups(groups, values).items():
            listing = ", ".join(f"{m}={float(scalars[f'{m}.{suffix}']):.9g}" for m in got)
            report.problems.append(f"fused group {group} does not share one {suffix} ({why}): {listing}")
    return mixed


def _is_embedding(name: str, shape: tuple[int, ...], vocab_size: int | None) -> bool:
    """Input embeddings stay unquantized without being listed: by name, or by a first dimension of
    the vocabulary size on a module that is not an output head."""
    leaf = name.rpartition(".")[2]
    if leaf in ("embed_tokens", "wte", "wpe") or "embedding" in leaf or "embeddings" in name.split("."):
        return True
    head = leaf in ("lm_head", "output_layer", "output", "head") or leaf.endswith("_head")
    return vocab_size is not None and shape[0] == vocab_size and not head


def inspect_checkpoint(path) -> InspectReport:
    """Validate the exported checkpoint in ``path``; every problem is collected in the report."""
    report = InspectReport(path=Path(path).absolute())
    if not report.path.is_dir():
        report.problems.append(f"{report.path} is not a directory")
        return report
    _check_config(report)
    present = _scan_files(report)
    if report.fmt is None:
        return report
    scheme = SCHEMES[report.fmt]
    modules = sorted({n[: -len(scheme.weight_global) - 1] for n in present
                      if n.endswith("." + scheme.weight_global)})
    scale_names = {f"{m}.{s}" for m in modules for s in (scheme.scale, scheme.weight_global, scheme.input_global)}
    info, scalars = _check_values(report.path, present, scale_names, report)
    for module in modules:
        module_info = _check_module(module, scheme, info, report.w4a4, report.problems)
        if module_info is not None:
            report.modules.append(module_info)
    _check_orphans(modules, scheme, info, report)
    dense_weights = [n[: -len(".weight")] for n, (dtype, shape) in info.items()
                     if n.endswith(".weight") and dtype.is_floating_point and len(shape) == 2]
    mixed = set(_check_fused(modules, dense_weights, scheme, scalars, report))
    ignored_but_quantized = [m for m in modules if _ignored(m, report.ignore, report.fmt)]
    if ignored_but_quantized:
        report.problems.append(f"quantized modules that the ignore list excludes: {_listed(ignored_but_quantized)}")
    unlisted = sorted(m for m in dense_weights if m not in mixed and not _ignored(m, report.ignore, report.fmt)
                      and not _is_embedding(m, info[f"{m}.weight"][1], report.vocab_size))
    if unlisted:
        report.problems.append("unquantized 2-D weights that are not embeddings and not in the ignore list "
                               "(engines would load them as quantized layers): " + _listed(unlisted))
    return report


_UNREADABLE = object()  # not None: a JSON file may hold `null`, which the checks report on


def _read_json_or_report(report: InspectReport, file: str, what: str):
    """The JSON content of ``file`` in the checkpoint, or ``_UNREADABLE`` with the problem recorded."""
    try:
        return read_json(report.path / file, what)
    except ExportError as err:
        report.problems.append(str(err))
        return _UNREADABLE


def _check_config(report: InspectReport) -> None:
    """config.json (and hf_quant_config.json): sets the report's format, W4A4 flag and ignore list."""
    config = _read_json_or_report(report, "config.json", "config")
    if config is _UNREADABLE:
        return
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        report.problems.append("config.json has no quantization_config object")
        return
    report.vocab_size = _vocab_size(config)
    report.fmt = detect_format(qc)
    if report.fmt is None:
        report.problems.append(f"config.json quantization_config: quant_method {qc.get('quant_method')!r} "
                               "is neither 'modelopt' nor 'compressed-tensors'")
        return
    report.problems += config_problems(report.fmt, qc)
    report.w4a4 = config_w4a4(qc)
    report.ignore = [x for x in qc.get("ignore") or [] if isinstance(x, str)]
    if report.fmt is ExportFormat.MODELOPT:
        _check_hf_quant_config(report)


def _vocab_size(config: dict) -> int | None:
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


def _check_orphans(modules: list[str], scheme: TensorScheme, info: dict, report: InspectReport) -> None:
    quantized = set(modules)
    suffixes = {scheme.scale, scheme.input_global} | ({scheme.packed} if scheme.packed != "weight" else set())
    orphans = sorted(n for n in info if n.rpartition(".")[2] in suffixes and n.rpartition(".")[0] not in quantized)
    if orphans:
        report.problems.append(f"quantization tensors without a {scheme.weight_global} (orphans): {_listed(orphans)}")


def _check_hf_quant_config(report: InspectReport) -> None:
    content = _read_json_or_report(report, "hf_quant_config.json", "ModelOpt config")
    if content is _UNREADABLE:
        return
    report.problems += hf_quant_config_problems(content, report.w4a4)
    exclude = (content.get("quantization") or {}).get("exclude_modules")
    if isinstance(exclude, list) and sorted(exclude) != sorted(report.ignore):
        report.notes.append("hf_quant_config.json exclude_modules differs from config.json ignore")
