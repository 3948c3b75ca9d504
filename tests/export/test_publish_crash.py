"""Crash-safe publish: a real export process is SIGKILLed at several steps; the target is then
the complete old or the complete new export (byte-compared, and inspect passes), and the next
run or recover_output_dir() removes what the dead run left, saying so. A live run's staging is
never touched."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import crash_worker
from export_testutil import differing_tensors
from nvfp4_dist.errors import ExportError
from nvfp4_dist.export.inspect import inspect_checkpoint
from nvfp4_dist.export.outdir import read_marker, recover_output_dir

WORKER = Path(crash_worker.__file__)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """The complete old (seed 0) and new (seed 1) exports, written in this process."""
    root = tmp_path_factory.mktemp("refs")
    crash_worker.run_export(root / "old", 0)
    crash_worker.run_export(root / "new", 1)
    return root / "old", root / "new"


def _start(out: Path, stage: str, flag: Path, fallback: bool = False) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), str(out), "1", stage, str(flag)] + (["--fallback"] if fallback else [])
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(proc: subprocess.Popen, flag: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the worker never reached its step"
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer looks alive


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "out")


def _which(target: Path, refs) -> str:
    report = inspect_checkpoint(target)
    assert report.ok, report.format()
    old, new = refs
    marker = read_marker(target)
    assert marker is not None and sorted(marker["files"]) == sorted(
        p.name for p in target.iterdir() if p.name != "nvfp4_dist_export.json")
    if not differing_tensors(target, old):
        return "old"
    assert differing_tensors(target, new) == [], "neither the old nor the new export"
    return "new"


# (step, fallback, what the target holds right after the kill, after recovery)
KILLS = [
    ("piece-written", False, "old", "old"),  # mid-write
    ("staged", False, "old", "old"),  # staging complete, not yet published
    ("exchanged", False, "new", "new"),  # swapped; the old export still sits at the staging path
    ("journaled", True, "old", "old"),  # fallback: journal written, no rename yet
    ("between-renames", True, None, "new"),  # fallback: target moved aside; the journal finishes it
]


@pytest.mark.parametrize("step,fallback,after_kill,after_recovery", KILLS)
def test_kill_at_each_step_leaves_old_or_new_and_is_recovered(step, fallback, after_kill, after_recovery,
                                                              tmp_path, refs):
    out = tmp_path / "out"
    crash_worker.run_export(out, 0)  # the old export
    flag = tmp_path.parent / f"{tmp_path.name}.flag"
    proc = _start(out, step, flag, fallback)
    try:
        _wait_for(proc, flag)
    finally:
        _kill(proc)
    assert _leftovers(tmp_path), "the kill left nothing to clean up"
    if after_kill is None:
        assert not out.exists()  # only the journaled fallback has this window
    else:
        assert _which(out, refs) == after_kill
    notes = recover_output_dir(out)
    assert notes and all("\n" not in n for n in notes), notes
    assert _leftovers(tmp_path) == [], notes
    assert _which(out, refs) == after_recovery


@contextlib.contextmanager
def _paused_run(tmp_path: Path, out: Path):
    """An old export at ``out``, then a second export paused after writing a piece (its staging
    directory exists); killed when the block ends."""
    crash_worker.run_export(out, 0)
    flag = tmp_path.parent / f"{tmp_path.name}.flag"
    proc = _start(out, "piece-written", flag)
    try:
        _wait_for(proc, flag)
        yield proc
    finally:
        _kill(proc)


def test_the_next_export_cleans_up_and_warns(tmp_path, refs):
    out = tmp_path / "out"
    with _paused_run(tmp_path, out):
        pass
    assert any(".staging-" in name for name in _leftovers(tmp_path))
    with pytest.warns(UserWarning, match=r"cleaned up after an interrupted export.*staging"):
        crash_worker.run_export(out, 1)
    assert _leftovers(tmp_path) == []
    assert _which(out, refs) == "new"


def test_a_live_run_is_left_alone(tmp_path, refs):
    out = tmp_path / "out"
    with _paused_run(tmp_path, out):
        live = _leftovers(tmp_path)
        assert any(".staging-" in name for name in live)
        notes = recover_output_dir(out)
        assert len(notes) == 1 and "is running" in notes[0], notes
        with pytest.raises(ExportError, match="another export to .* is running"):
            crash_worker.run_export(out, 1)
        assert _leftovers(tmp_path) == live  # nothing of the live run was touched
        assert _which(out, refs) == "old"
    recover_output_dir(out)
    assert _leftovers(tmp_path) == []


def test_an_unfinished_run_completes_normally(tmp_path, refs):
    """The worker without a stop: publishes the new export and leaves nothing else."""
    out = tmp_path / "out"
    crash_worker.run_export(out, 0)
    flag = tmp_path.parent / f"{tmp_path.name}.flag"
    proc = _start(out, "none", flag)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert _leftovers(tmp_path) == [] and _which(out, refs) == "new"
