"""Test helper: load an exported checkpoint with transformers in a fresh process.

The export must load with nothing but transformers (and the format's own package), so the load
runs in a subprocess that imports neither nvfp4_dist nor the test's state.
"""

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
