"""What --overwrite / overwrite=True may replace: an empty directory or an earlier nvfp4_dist
export holding nothing else; never the cwd, a parent of it, the source model, a symlink. A
refusal is one line and changes nothing (listing + bytes compared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import nvfp4_dist.cli as cli
from nvfp4_dist.cli import main
from nvfp4_dist.errors import ExportError
from nvfp4_dist.export import export_checkpoint
from nvfp4_dist.export.inspect import inspect_checkpoint
from nvfp4_dist.export.outdir import MARKER_NAME, check_output_dir, read_marker

SMALL = ["--model", "tiny-dense", "--method", "max", "--calib-samples", "4", "--seq-len", "16",
         "--no-progress"]


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (symlinks not followed): kind and bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes())
    return out


def _refused(fn, match: str) -> str:
    with pytest.raises(ExportError, match=match) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def export(plain_run):
    model, result = plain_run

    def run(out, **kwargs):
        return export_checkpoint(model, result, out, **kwargs)

    return run


def _setups(tmp_path: Path, export):
    """name -> (out, protected/source_dir, expected message) of every refused case; run in
    ``tmp_path/work`` as the cwd."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("user data")
    model_dir = tmp_path / "models" / "src"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"weights")
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    old = tmp_path / "old"
    export(old)
    (old / "README.md").write_text("added later")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep").write_text("k")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "afile").write_text("f")
    return {
        "cwd": (".", None, "is the current directory"),
        "cwd-absolute": (str(work), None, "is the current directory"),
        "parent-of-cwd": ("..", None, "a parent of the current directory"),
        "model-dir": (str(model_dir), model_dir, "is the source model directory"),
        "parent-of-model": (str(model_dir.parent), model_dir, "a parent of the source model directory"),
        "unrelated-files": (str(unrelated), None, "no nvfp4_dist export marker.*thesis.tex"),
        "export-plus-user-file": (str(old), None, "did not write: README.md"),
        "symlink": (str(tmp_path / "link"), None, "is a symlink"),
        "dangling-symlink": (str(tmp_path / "dangling"), None, "is a symlink"),
        "a-file": (str(tmp_path / "afile"), None, "not a directory"),
    }


CASES = ["cwd", "cwd-absolute", "parent-of-cwd", "model-dir", "parent-of-model", "unrelated-files",
         "export-plus-user-file", "symlink", "dangling-symlink", "a-file"]


@pytest.mark.parametrize("case", CASES)
def test_export_refuses_and_changes_nothing(case, tmp_path, export, monkeypatch):
    out, source, match = _setups(tmp_path, export)[case]
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)
    _refused(lambda: export(out, overwrite=True, source_dir=source), match)
    assert snapshot(tmp_path) == before
    # the shared check says the same, without the model
    _refused(lambda: check_output_dir(out, overwrite=True, protected=(source,)), match)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", CASES)
def test_cli_check_refuses_before_any_work(case, tmp_path, export, monkeypatch, capsys):
    out, source, match = _setups(tmp_path, export)[case]
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(cli, "load_model", no_loading)
    if source is None:
        assert main(["quantize", *SMALL, "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
    else:  # --model is a name here: the CLI's check with the model directory, directly
        _refused(lambda: cli._check_out_dir(Path(out), True, str(source)), match)
    assert snapshot(tmp_path) == before


def test_cli_out_dot_overwrite_keeps_the_user_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["quantize", *SMALL, "--out", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "current directory" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_cli_replaces_its_own_export_and_refuses_when_a_user_file_was_added(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", *SMALL, "--out", "q"]) == 0
    assert main(["quantize", *SMALL, "--out", "q", "--overwrite"]) == 0
    capsys.readouterr()
    assert inspect_checkpoint(tmp_path / "q").ok
    (tmp_path / "q" / "my_eval.json").write_text("{}")
    assert main(["quantize", *SMALL, "--out", "q", "--overwrite"]) == 2
    assert "my_eval.json" in capsys.readouterr().err
    assert (tmp_path / "q" / "my_eval.json").exists()


def test_marker_lists_every_written_file(tmp_path, export):
    summary = export(tmp_path / "out", fmt="compressed-tensors")
    marker = read_marker(tmp_path / "out")
    assert marker["producer"] == "nvfp4_dist" and marker["format"] == "compressed-tensors"
    assert sorted(marker["files"] + [MARKER_NAME]) == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert list(summary.files) == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert inspect_checkpoint(tmp_path / "out").ok


def test_empty_dir_and_own_export_are_replaced(tmp_path, export):
    out = tmp_path / "out"
    out.mkdir()
    _refused(lambda: export(out), "already exists")
    export(out, overwrite=True)
    first = snapshot(out)
    export(out, overwrite=True, fmt="compressed-tensors")
    assert snapshot(out) != first and read_marker(out)["format"] == "compressed-tensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, staging or old dir left
    assert inspect_checkpoint(out).ok


def test_a_new_path_under_the_model_dir_is_fine(tmp_path, export):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    export(src / "nvfp4", source_dir=src)
    assert inspect_checkpoint(src / "nvfp4").ok
