"""Test helper: load an exported checkpoint with transformers in a fresh process.

The export must load with nothing but transformers (and the format's own package), so the load
runs in a subprocess that imports neither nvfp4_dist nor the test's state.
"""

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path, out, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # On the CPU, compressed-tensors decompresses NVFP4 to bf16; `dequantize=True` loads the
    # dequantized weights into an fp32 model (the lazy path leaves bf16 weights in fp32 layers).
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    # transformers 5.17 leaves the decompressed bf16 weights in bf16 (5.24 upcasts them); the
    # upcast is exact either way, so both releases run the same fp32 forward.
    model = model.float()
    ids = torch.arange(2 * seq_len).reshape(2, seq_len) * 37 % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["__logits__"] = logits.contiguous()
    save_file(tensors, out)
""")


def probe_ids(vocab_size: int, seq_len: int) -> torch.Tensor:
    """The token ids the reload's forward uses ``[2, seq_len]``."""
    return torch.arange(2 * seq_len).reshape(2, seq_len) * 37 % vocab_size


def reload_compressed_tensors(path: Path, workdir: Path, seq_len: int) -> dict[str, torch.Tensor]:
    """State dict of the reloaded model plus ``"__logits__"`` of a forward on :func:`probe_ids`."""
    from safetensors.torch import load_file

    out = Path(workdir) / "reloaded.safetensors"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path), str(out), str(seq_len)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(out)


@contextlib.contextmanager
def inputs_unquantized(model):
    """Within: ``model`` (after a W4A4 ``quantize``) computes with fake-quant weights only, i.e.
    what a reload that dequantizes the weights and runs high-precision activations computes
    (transformers' compressed-tensors ``dequantize=True``, a dense dequantized checkpoint).
    After: W4A4 again."""
    from nvfp4_dist.calib.apply import install_fake_quant

    stashed = []
    for module in model.modules():
        if not hasattr(module, "_nvfp4_fake_quant_handles"):
            continue
        buffers = dict(module.named_buffers(recurse=False))
        params = [n.removesuffix("_nvfp4_block_scale") for n in buffers if n.endswith("_nvfp4_block_scale")]
        inputs = {n: b for n, b in buffers.items() if n.endswith("_nvfp4_input_amax")}
        for n in inputs:
            delattr(module, n)
        install_fake_quant(module, params)
        stashed.append((module, params, inputs))
    try:
        yield model
    finally:
        for module, params, inputs in stashed:
            for n, b in inputs.items():
                module.register_buffer(n, b, persistent=True)
            install_fake_quant(module, params)
