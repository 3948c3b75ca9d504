"""What each serving engine's NVFP4 loader expects of a checkpoint, as data plus one checker.

Encoded from the loaders (vLLM 0.34 ``modelopt_fp4`` and compressed-tensors, SGLang 0.5.23
``modelopt_fp4`` / compressed-tensors, TensorRT-LLM's ModelOpt loader):

* config: the keys each loader reads and the values it accepts;
* tensors per linear ``<m>``, with dtype and shape: ModelOpt ``weight`` U8 ``[out, in/2]``,
  ``weight_scale`` F8_E4M3 ``[out, in/16]``, ``weight_scale_2`` F32 ``[]``, ``input_scale`` F32
  ``[]`` (W4A4 only); compressed-tensors ``weight_packed`` / ``weight_scale`` as above,
  ``weight_global_scale`` F32 ``[1]``, ``input_global_scale`` F32 ``[1]`` (W4A4 only);
* which modules are linears per architecture (Llama/Qwen3 attention and MLP, Qwen3-MoE experts
  ``model.layers.N.mlp.experts.E.{gate,up,down}_proj``) and which must stay dense and be listed
  in the ignore list (router ``model.layers.N.mlp.gate``, untied ``lm_head``);
* fused shards (q/k/v, gate/up, per expert gate/up) merged into one weight: one weight global
  scale and one input scale (vLLM/SGLang keep a single value per merged layer, TensorRT-LLM
  asserts equality).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

U8, F8, F32 = torch.uint8, torch.float8_e4m3fn, torch.float32


@dataclass(frozen=True)
class Engine:
    name: str
    fmt: str  # "modelopt" or "compressed-tensors"
    config_file: str  # where the loader reads the quantization settings
    algos: dict  # w4a4 (bool) -> the quant_algo / scheme the loader maps to its NVFP4 method
    packed: str
    scale: str
    weight_global: str
    input_global: str
    global_shape: tuple
    weight_only: bool  # has an NVFP4 weight-only (W4A16) path


ENGINES = {
    # vLLM 0.34: ModelOptNvFp4Config reads config.json quantization_config (quant_method modelopt,
    # quant_algo, kv_cache_quant_algo, group_size, ignore); NVFP4 -> W4A4, W4A16_NVFP4 -> weight-only.
    "vllm-modelopt_fp4": Engine("vllm-modelopt_fp4", "modelopt", "config.json",
                                {True: "NVFP4", False: "W4A16_NVFP4"},
                                "weight", "weight_scale", "weight_scale_2", "input_scale", (), True),
    # vLLM 0.34 compressed-tensors: CompressedTensorsW4A4Fp4 (input_activations dynamic "local")
    # or CompressedTensorsW4A16Fp4 (no input_activations); scheme parsed by QuantizationArgs.
    "vllm-compressed-tensors": Engine("vllm-compressed-tensors", "compressed-tensors", "config.json",
                                      {True: "NVFP4", False: "NVFP4A16"},
                                      "weight_packed", "weight_scale", "weight_global_scale",
                                      "input_global_scale", (1,), True),
    # SGLang 0.5.23: ModelOptFp4Config from hf_quant_config.json (requires quant_algo, group_size,
    # kv_cache_quant_algo and exclude_modules keys; "NVFP4" in quant_algo selects the FP4 method).
    "sglang-modelopt_fp4": Engine("sglang-modelopt_fp4", "modelopt", "hf_quant_config.json",
                                  {True: "NVFP4", False: "W4A16_NVFP4"},
                                  "weight", "weight_scale", "weight_scale_2", "input_scale", (), True),
    "sglang-compressed-tensors": Engine("sglang-compressed-tensors", "compressed-tensors", "config.json",
                                        {True: "NVFP4", False: "NVFP4A16"},
                                        "weight_packed", "weight_scale", "weight_global_scale",
                                        "input_global_scale", (1,), True),
    # TensorRT-LLM: hf_quant_config.json -> QuantConfig(quant_algo=NVFP4, kv_cache_quant_algo,
    # group_size, exclude_modules as fnmatch patterns); its NVFP4 linear is W4A4 only.
    "tensorrt-llm": Engine("tensorrt-llm", "modelopt", "hf_quant_config.json", {True: "NVFP4"},
                           "weight", "weight_scale", "weight_scale_2", "input_scale", (), False),
}


def engines_for(fmt: str) -> list[str]:
    return [name for name, e in ENGINES.items() if e.fmt == fmt]


def read_tensor_info(path: Path) -> tuple[dict, dict]:
    """(name -> (dtype, shape), name -> fp32 value of every one-element F32 tensor)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"] \
        if (path / "model.safetensors.index.json").is_file() else None
    files = sorted(set(index.values())) if index else ["model.safetensors"]
    info, scalars = {}, {}
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                info[name] = (t.dtype, tuple(t.shape))
                if t.dtype == F32 and t.numel() == 1:
                    scalars[name] = t.reshape(())
    return info, scalars


def expected_linears(config: dict) -> tuple[list[str], list[str]]:
    """(quantizable linears, dense 2-D modules that must be in the ignore list) of a Llama/Qwen3
    dense or Qwen3-MoE config, under the HF names engines load."""
    linears, dense = [], []
    experts = config.get("num_experts") or config.get("num_local_experts") or 0  # 5.x: num_local_experts
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        linears += [f"{prefix}.self_attn.{p}_proj" for p in "qkvo"]
        sparse = experts and layer not in (config.get("mlp_only_layers") or []) and \
            (layer + 1) % (config.get("decoder_sparse_step") or 1) == 0
        if sparse:
            linears += [f"{prefix}.mlp.experts.{e}.{p}_proj" for e in range(experts) for p in ("gate", "up", "down")]
            dense.append(f"{prefix}.mlp.gate")  # the router (Qwen3MoeTopKRouter): never quantized
        else:
            linears += [f"{prefix}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    if not config.get("tie_word_embeddings", False):
        dense.append("lm_head")
    return linears, dense


def fused_sets(linears: list[str]) -> list[list[str]]:
    """Shards each engine merges into one weight: q/k/v, gate/up (dense MLP and per expert)."""
    groups: dict[str, list[str]] = {}
    for name in linears:
        m = re.fullmatch(r"(.*)\.(q|k|v|gate|up)_proj", name)
        if m:
            key = m.group(1) + (".qkv" if m.group(2) in "qkv" else ".gate_up")
            groups.setdefault(key, []).append(name)
    return list(groups.values())


def _listed(name: str, patterns: list[str]) -> bool:
    import fnmatch

    return any(re.match(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p) for p in patterns)


def _config_problems(engine: Engine, path: Path, w4a4: bool) -> tuple[list[str], list[str]]:
    """Problems of the engine's config, and the ignore list it reads."""
    problems: list[str] = []
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if engine.fmt == "modelopt":
        hf = json.loads((path / "hf_quant_config.json").read_text()) \
            if (path / "hf_quant_config.json").is_file() else None
        if hf is None:
            problems.append("hf_quant_config.json missing")
        if qc.get("quant_method") != "modelopt":
            problems.append(f"config.json quant_method {qc.get('quant_method')!r} != 'modelopt'")
        src = (hf or {}).get("quantization", {}) if engine.config_file == "hf_quant_config.json" else qc
        ignore = src.get("exclude_modules") if engine.config_file == "hf_quant_config.json" else qc.get("ignore")
        for where, d in (("config.json", qc), ("hf_quant_config.json", (hf or {}).get("quantization", {}))):
            want = engine.algos.get(w4a4)
            if d.get("quant_algo") != want:
                problems.append(f"{where} quant_algo {d.get('quant_algo')!r}, {engine.name} needs {want!r}")
            if d.get("group_size") != 16:
                problems.append(f"{where} group_size {d.get('group_size')!r} != 16")
            if "kv_cache_quant_algo" not in d or d["kv_cache_quant_algo"] is not None:
                problems.append(f"{where}: kv_cache_quant_algo must be present and null (KV cache not quantized)")
        if not isinstance((hf or {}).get("quantization", {}).get("exclude_modules"), list):
            problems.append("hf_quant_config.json exclude_modules missing")
        if sorted(qc.get("ignore") or []) != sorted(((hf or {}).get("quantization") or {}).get("exclude_modules") or []):
            problems.append("config.json ignore != hf_quant_config.json exclude_modules")
        return problems, list(ignore or [])
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    try:
        parsed = QuantizationConfig.model_validate(qc)  # what vLLM / SGLang / transformers parse
    except Exception as err:  # noqa: BLE001 - the loader's own refusal
        return [f"compressed-tensors refuses quantization_config: {err}"], []
    if parsed.format != "nvfp4-pack-quantized" or parsed.quantization_status != "compressed":
        problems.append(f"format/status {parsed.format}/{parsed.quantization_status}")
    if qc.get("kv_cache_scheme", "absent") is not None:
        problems.append("kv_cache_scheme must be present and null")
    preset = preset_name_to_scheme(engine.algos[w4a4], ["Linear"]).model_dump(mode="json")
    for group in qc["config_groups"].values():
        for key in ("weights", "input_activations"):
            want = preset[key]
            got = group.get(key)
            if want is None or got is None:
                if (want is None) != (got is None):
                    problems.append(f"{key}: {got!r}, preset {engine.algos[w4a4]} has {want!r}")
                continue
            want = {k: v for k, v in want.items() if k != "observer"}  # calibration detail only
            diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k, _DEFAULTS.get(k)) != v}
            if diff:
                problems.append(f"{key} differs from preset {engine.algos[w4a4]}: {diff}")
    return problems, list(parsed.ignore or [])


_DEFAULTS = {"actorder": None, "block_structure": None, "zp_dtype": None, "observer_kwargs": {}}


def check(engine_name: str, path: Path, w4a4: bool) -> list[str]:
    """Every reason ``engine_name``'s loader would refuse or mis-load the checkpoint at ``path``
    exported as W4A4 (``w4a4``) or weight-only."""
    engine = ENGINES[engine_name]
    config = json.loads((path / "config.json").read_text())
    if w4a4 not in engine.algos:
        return [f"{engine.name} has no NVFP4 {'W4A4' if w4a4 else 'W4A16'} path"]
    problems, ignore = _config_problems(engine, path, w4a4)
    info, scalars = read_tensor_info(path)
    linears, dense = expected_linears(config)
    for m in linears:
        packed = f"{m}.{engine.packed}"
        if packed not in info:
            problems.append(f"{packed}: missing")
            continue
        dtype, (out, half) = info[packed][0], info[packed][1]
        cin = half * 2
        want = {packed: (U8, (out, cin // 2)), f"{m}.{engine.scale}": (F8, (out, cin // 16)),
                f"{m}.{engine.weight_global}": (F32, engine.global_shape)}
        if w4a4:
            want[f"{m}.{engine.input_global}"] = (F32, engine.global_shape)
        elif f"{m}.{engine.input_global}" in info:
            problems.append(f"{m}.{engine.input_global}: present in a weight-only checkpoint")
        for name, spec in want.items():
            if info.get(name) != spec:
                problems.append(f"{name}: {info.get(name)}, {engine.name} loads {spec}")
        if _listed(m, ignore):
            problems.append(f"{m}: quantized but excluded by the ignore list")
    for m in dense:
        if info.get(f"{m}.weight", (None,))[0] not in (torch.float32, torch.bfloat16, torch.float16):
            problems.append(f"{m}.weight: not a dense high-precision tensor: {info.get(f'{m}.weight')}")
        if not _listed(m, ignore):
            problems.append(f"{m}: unquantized 2-D weight missing from the ignore list")
    for group in fused_sets(linears):
        for suffix in (engine.weight_global,) + ((engine.input_global,) if w4a4 else ()):
            values = {scalars[f"{m}.{suffix}"].view(torch.int32).item() for m in group if f"{m}.{suffix}" in scalars}
            if len(values) > 1:
                problems.append(f"fused shards {group} have different {suffix}")
    return problems
