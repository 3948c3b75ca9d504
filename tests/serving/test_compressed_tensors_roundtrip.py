"""Through the compressed-tensors package itself: its NVFP4 decompression of our
compressed-tensors export gives our dequantized weights, and its ModelOpt -> compressed-tensors
converter (compressed-tensors >= 0.15) turns our ModelOpt export into our compressed-tensors
export (codes and block scales bit-identical, global scales within 1 fp32 ulp)."""

from __future__ import annotations

import json

import pytest
import torch

from nvfp4_dist.export.reader import read_dequantized

MODES = ("w4a4", "w4a16")


def _tensors(path):
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe"])
def test_compressed_tensors_decompress_equals_our_dequantization(exports, model):
    """The package's decompress (bf16 output, its default) and its fp32 unpack + dequantize."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    path = exports(model, "compressed-tensors", "w4a4")
    qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    scheme = next(iter(qc.config_groups.values()))
    tensors = _tensors(path)
    ours = read_dequantized(path)
    assert ours
    for module, want in ours.items():
        local = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == module}
        want = want.float()
        got = NVFP4PackedCompressor.decompress(local, scheme)["weight"]
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=0, msg=module)  # 1 bf16 ulp
        m, n = local["weight_packed"].shape
        codes = unpack_fp4_from_uint8(local["weight_packed"], m, n * 2, dtype=torch.float32)
        exact = dequantize(x_q=codes, scale=local["weight_scale"].float(), args=scheme.weights,
                           global_scale=local["weight_global_scale"], dtype=torch.float32)
        torch.testing.assert_close(exact, want, rtol=3e-7, atol=0, msg=module)  # global scale's ulps


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe"])
def test_modelopt_converter_gives_our_compressed_tensors_export(exports, model, mode):
    converters = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4")
    modelopt = exports(model, "modelopt", mode)
    ignore = json.loads((modelopt / "config.json").read_text())["quantization_config"]["ignore"]
    converted = converters.ModelOptNvfp4Converter(ignore=ignore, targets=["Linear"]).validate(_tensors(modelopt))
    ours = _tensors(exports(model, "compressed-tensors", mode))
    assert set(converted) == set(ours)
    for name, want in ours.items():
        got = converted[name]
        if name.endswith(("global_scale",)):
            assert got.dtype == want.dtype == torch.float32, name
            bits = (got.reshape(()).view(torch.int32) - want.reshape(()).view(torch.int32)).abs().item()
            assert bits <= 1, f"{name}: {got.item()} vs {want.item()} ({bits} ulp)"
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                               want.view(torch.uint8) if want.element_size() == 1 else want), name
