"""Bad inputs to `nvfp4-dist quantize`: each is one line `nvfp4-dist: error: ...`, the right exit
code, and nothing that existed before the run changes (no partial output either).

Table-driven: a case is the argv it adds to a small run (tiny-dense, max, 4 x 16 tokens), the
exit code and a fragment of the one-line message. Damaged inputs (a checkpoint missing a tensor,
a truncated safetensors file, binary / malformed calibration files, a tokenizer larger than the
model's vocabulary) are built once per module in a tmp dir.

Run cost: low. Every case is refused before calibration, in-process; the module takes seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nvfp4_dist.cli as cli
from nvfp4_dist.cli import main
from nvfp4_dist.models.tiny import build_embedded

BASE = ["quantize", "--model", "tiny-dense", "--method", "max", "--calib-samples", "4", "--seq-len", "16",
        "--batch-size", "2", "--no-progress", "--out", "{out}"]
MISSING_TENSOR = "model.layers.1.mlp.down_proj.weight"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def _word_tokenizer(vocab_size: int):
    """A small offline word-level tokenizer of ``vocab_size`` tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(vocab_size - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    model = build_embedded("tiny-dense", seed=0)
    vocab = model.config.vocab_size
    paths = {name: root / name for name in ("src", "bigtok", "notok", "missing", "truncated")}
    for name in ("src", "bigtok", "notok", "missing", "truncated"):
        model.save_pretrained(paths[name])
    _word_tokenizer(vocab).save_pretrained(paths["src"])
    _word_tokenizer(vocab + 64).save_pretrained(paths["bigtok"])

    weights = paths["missing"] / "model.safetensors"
    tensors = load_file(weights)
    del tensors[MISSING_TENSOR]
    save_file(tensors, weights, metadata={"format": "pt"})
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    words = " ".join(f"w{i % 900}" for i in range(400))
    files = {
        "txt": words.encode(),
        "jsonl": "\n".join(json.dumps({"text": words[i::4]}) for i in range(4)).encode(),
        "binary": b"w1 w2\nw3 w4\n\xff\xfe\x81 binary",
        "nul": b"w1 w2\nw3\x00w4\n",
        "malformed": b'{"text": "w1 w2"}\n\n{"text": "w3"\n',
        "notext": b'{"text": "w1 w2"}\n{"content": "w3"}\n',
        "empty": b"\n  \n",
    }
    for name, data in files.items():
        path = root / f"calib-{name}.{'jsonl' if name in ('jsonl', 'malformed', 'notext') else 'txt'}"
        path.write_bytes(data)
        paths[name] = path
    return paths


@pytest.fixture
def work(tmp_path) -> Path:
    """The user's directory: a file of theirs that must survive every refused run."""
    (tmp_path / "user.txt").write_text("mine")
    return tmp_path


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for root in roots for p in sorted(root.rglob("*"))}


# (id, extra argv, exit code, fragment of the one-line message); {name} placeholders name the
# damaged inputs above, {out} a fresh output path, {user} the user's existing file.
CASES = [
    ("batch-size-negative", ["--batch-size", "-4"], 2, "--batch-size -4 must be >= 1"),
    ("batch-size-zero", ["--batch-size", "0"], 2, "--batch-size 0 must be >= 1"),
    ("calib-samples-zero", ["--calib-samples", "0"], 2, "--calib-samples 0 must be >= 1"),
    ("seq-len-zero", ["--seq-len", "0"], 2, "--seq-len 0 must be >= 1"),
    ("tp-zero", ["--backend", "megatron", "--tp", "0"], 2, "--tp 0 must be >= 1"),
    ("ep-negative", ["--backend", "megatron", "--ep", "-1"], 2, "--ep -1 must be >= 1"),
    ("replicas-zero", ["--backend", "fsdp2", "--replicas", "0"], 2, "--replicas 0 must be >= 1"),
    ("tp-other-backend", ["--tp", "2"], 2, "--tp 2 / --ep 1 need --backend megatron"),
    ("dss-beta-without-1", ["--method", "local_hessian", "--dss", "--dss-beta", "1.2", "1.5", "0.05"], 2,
     "the grid must contain beta = 1"),
    ("dss-beta-step-zero", ["--dss-beta", "0.5", "1.5", "0"], 2, "STEP must be > 0"),
    ("dss-beta-nan", ["--dss-beta", "nan", "1.5", "0.05"], 2, "must be finite numbers"),
    ("dss-beta-huge-grid", ["--dss-beta", "0.5", "1.5", "1e-9"], 2, "use a larger STEP"),
    ("dss-beta-off-hundredths", ["--method", "local_hessian", "--dss", "--dss-beta", "0.5", "1.5", "0.025"], 2,
     "is not a multiple of 0.01"),
    ("dist-timeout-zero", ["--dist-timeout", "0"], 2, "--dist-timeout 0 must be a positive number"),
    ("dist-timeout-inf", ["--dist-timeout", "inf"], 2, "--dist-timeout inf must be a positive number"),
    ("seed-negative", ["--seed", "-1"], 2, "--seed -1 must be in"),
    ("out-is-a-file", ["--out", "{user}"], 2, "is an existing file; name a directory"),
    ("out-under-a-file", ["--out", "{user}/export"], 2, "user.txt is a file, not a directory"),
    ("device-unknown", ["--device", "gpu"], 2, "--device gpu: use auto, cpu, cuda or cuda:N"),
    pytest.param("device-cuda-without-cuda", ["--device", "cuda"], 2, "--device cuda: no CUDA device",
                 marks=NO_CUDA),
    pytest.param("megatron-without-cuda", ["--backend", "megatron"], 2, "--backend megatron needs CUDA",
                 marks=NO_CUDA),
    ("save-dist-ckpt-not-megatron", ["--save-dist-ckpt", "{out}2"], 2, "needs --backend megatron"),
    ("gptq-sequential-with-pp", ["--method", "gptq", "--gptq-sequential", "--backend", "megatron", "--pp", "2"],
     2, "--gptq-sequential is not supported with --pp 2"),
    ("gptq-sequential-without-gptq", ["--method", "mse", "--gptq-sequential"], 2,
     "gptq_sequential=True needs method='gptq'"),
    ("include-matches-nothing", ["--include", "nomatch*"], 2, "match no supported module"),
    ("exclude-everything", ["--exclude", "*"], 2, "leave out every supported module"),
    ("calib-file-missing", ["--model", "{src}", "--calib-file", "{user}.nope"], 2, "no such file"),
    ("calib-file-directory", ["--model", "{src}", "--calib-file", "{src}"], 2, "not a regular file"),
    ("calib-file-binary", ["--model", "{src}", "--calib-file", "{binary}"], 2, "line 3 is not UTF-8 text"),
    ("calib-file-nul", ["--model", "{src}", "--calib-file", "{nul}"], 2, "line 2 holds a NUL byte"),
    ("calib-file-bad-json", ["--model", "{src}", "--calib-file", "{malformed}"], 2,
     "line 3 is not valid JSON"),
    ("calib-file-no-text-field", ["--model", "{src}", "--calib-file", "{notext}"], 2,
     "line 2 has no string 'text' field"),
    ("calib-file-empty", ["--model", "{src}", "--calib-file", "{empty}"], 2, "holds no text"),
    ("calib-file-too-short", ["--model", "{src}", "--calib-file", "{txt}", "--calib-samples", "100"], 2,
     "need 1600 (= --calib-samples 100 x --seq-len 16)"),
    ("calib-file-embedded-model", ["--calib-file", "{txt}"], 2, "tiny-dense is an embedded model"),
    ("calib-file-no-tokenizer", ["--model", "{notok}", "--calib-file", "{txt}"], 2,
     "which has no tokenizer files"),
    ("tokenizer-larger-than-vocab", ["--model", "{bigtok}", "--calib-file", "{txt}"], 2,
     "the tokenizer has 1088 tokens but the model's vocabulary holds 1024"),
    ("checkpoint-missing-tensor", ["--model", "{missing}"], 2, f"1 tensor(s) missing: {MISSING_TENSOR}"),
    ("checkpoint-truncated", ["--model", "{truncated}"], 2, "is a weight file truncated or damaged?"),
    ("model-not-found", ["--model", "{user}.nope"], 2, "not a directory and not an embedded model"),
    ("usage-bad-choice", ["--method", "bogus"], 2, "argument --method: invalid choice: 'bogus'"),
    ("usage-not-a-number", ["--batch-size", "four"], 2, "argument --batch-size: invalid int value: 'four'"),
]


def _argv(extra: list[str], work: Path, inputs: dict[str, Path]) -> list[str]:
    names = {"out": work / "export", "user": work / "user.txt", **inputs}
    fill = lambda arg: arg.format(**{k: str(v) for k, v in names.items()})  # noqa: E731
    return [fill(a) for a in BASE + extra]


def _one_error_line(err: str, code: int) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("nvfp4-dist: error")]
    assert len(lines) == 1, err
    return lines[0]


def _params(cases):
    for case in cases:
        if hasattr(case, "marks"):  # pytest.param carrying marks: its first value is the id
            yield pytest.param(*case.values[1:], id=case.values[0], marks=case.marks)
        else:
            yield pytest.param(*case[1:], id=case[0])


@pytest.mark.parametrize("extra,code,fragment", list(_params(CASES)))
def test_bad_input_is_one_line_and_changes_nothing(extra, code, fragment, work, inputs, capsys):
    before = _snapshot(work, inputs["src"].parent)
    assert main(_argv(extra, work, inputs)) == code
    captured = capsys.readouterr()
    line = _one_error_line(captured.err, code)
    assert fragment in line, line
    assert captured.out == ""
    assert _snapshot(work, inputs["src"].parent) == before  # no output, user files as they were


def test_good_calibration_files_still_run(work, inputs, capsys):
    """The checks refuse only what is wrong: text and JSONL files of the model's tokenizer run."""
    for name in ("txt", "jsonl"):
        out = work / f"out-{name}"
        argv = _argv(["--model", "{src}", "--calib-file", "{" + name + "}", "--out", str(out)], work, inputs)
        assert main(argv) == 0, capsys.readouterr().err
        assert "calibration 4x16 tokens" in capsys.readouterr().out and (out / "config.json").exists()


def test_debug_shows_the_traceback(work, inputs, capsys):
    assert main(_argv(["--batch-size", "-4", "--debug"], work, inputs)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("nvfp4-dist: error: --batch-size -4 must be >= 1")


def test_unexpected_error_is_one_line_exit_1(work, inputs, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug\nwith two lines")

    monkeypatch.setattr(cli, "quantize", broken)
    before = _snapshot(work)
    assert main(_argv([], work, inputs)) == 1
    line = _one_error_line(capsys.readouterr().err, 1)
    assert line == ("nvfp4-dist: error: unexpected TypeError: a bug; with two lines "
                    "(rerun with --debug for the traceback)")
    assert _snapshot(work) == before
    assert main(_argv(["--debug"], work, inputs)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "rerun with --debug" not in err


def test_unwritable_out_parent_is_refused(work, inputs, capsys, monkeypatch):
    monkeypatch.setattr("nvfp4_dist.inputs.os.access", lambda path, mode: False)
    assert main(_argv([], work, inputs)) == 2
    assert "cannot write in" in _one_error_line(capsys.readouterr().err, 2)
    assert not (work / "export").exists()


def test_other_ranks_stay_quiet_before_the_process_group(work, inputs, capsys, monkeypatch):
    """Under torchrun every rank refuses the same input; only rank 0 prints the line."""
    monkeypatch.setenv("RANK", "1")
    assert main(_argv(["--batch-size", "-4"], work, inputs)) == 2
    assert capsys.readouterr().err == ""
