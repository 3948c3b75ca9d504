"""`nvfp4-dist quantize` on the embedded model for every method and format, then `inspect`."""

import json
import subprocess
import sys

import pytest
import torch

from nvfp4_dist.cli import main

METHODS = [("max", []), ("mse", []), ("local_hessian", []), ("local_hessian", ["--dss"])]
FORMATS = ["modelopt", "compressed-tensors"]
SMALL = ["--calib-samples", "4", "--seq-len", "32", "--no-progress"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method,extra", METHODS, ids=["max", "mse", "local_hessian", "dss"])
def test_quantize_then_inspect(tmp_path, capsys, method, extra, fmt):
    out = tmp_path / "export"
    assert main(["quantize", "--model", "tiny-dense", "--method", method, *extra, "--format", fmt,
                 "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and f"written to {out}" in text
    assert "14 weights quantized" in text
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ("modelopt" if fmt == "modelopt" else "compressed-tensors")
    assert "lm_head" in qc["ignore"]
    assert main(["inspect", str(out)]) == 0
    assert "OK" in capsys.readouterr().out


def test_existing_output_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", "--model", "tiny-dense", "--method", "max", "--out", str(out), *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_model_path_must_be_a_safetensors_hf_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "safetensors" in err and "pytorch_model.bin" in err
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *SMALL]) == 2
    assert "tiny-dense" in capsys.readouterr().err


def test_local_hf_directory_round_trip(tmp_path, capsys):
    """A model saved with save_pretrained (safetensors) is a valid --model PATH; its files carry over."""
    from nvfp4_dist.models.tiny import build_embedded

    src = tmp_path / "src"
    build_embedded("tiny-dense", seed=3).save_pretrained(src)
    (src / "generation_config.json").write_text('{"do_sample": false}')
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(src), "--method", "mse", "--format", "modelopt",
                 "--out", str(out), *SMALL]) == 0
    assert (out / "generation_config.json").exists() and (out / "hf_quant_config.json").exists()


def test_module_entry_point_inspect_reports_problems(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "nvfp4_dist", "inspect", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "quantization_config" in proc.stdout + proc.stderr


def _word_tokenizer(vocab_size: int):
    """A small offline word-level tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(vocab_size - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_calibration_text_file_is_tokenized_with_the_model_tokenizer(tmp_path, capsys):
    from nvfp4_dist.models.tiny import build_embedded

    src = tmp_path / "src"
    model = build_embedded("tiny-dense", seed=1)
    model.save_pretrained(src)
    _word_tokenizer(model.config.vocab_size).save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(f"w{(7 * i + j) % 900}" for j in range(40)) for i in range(10)))
    out = tmp_path / "out"
    args = ["quantize", "--model", str(src), "--method", "local_hessian", "--out", str(out),
            "--calib-file", str(text), "--calib-samples", "4", "--seq-len", "64", "--no-progress"]
    assert main(args) == 0
    assert "calibration 4x64 tokens" in capsys.readouterr().out
    assert (out / "tokenizer.json").exists()  # the tokenizer travels with the export
    # too little text for the requested tokens: a clear error, nothing written
    assert main(args[:-5] + ["--calib-samples", "40", "--seq-len", "64", "--no-progress",
                             "--out", str(tmp_path / "o2")]) == 2
    assert "need 2560" in capsys.readouterr().err and not (tmp_path / "o2").exists()
