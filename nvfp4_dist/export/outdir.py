"""Where an export may go, and how it gets there without ever leaving a broken directory.

Three rules, in one place for the CLI and :func:`~nvfp4_dist.export.hf.export_checkpoint`:

* **What may be replaced** (:func:`check_output_dir`): a new path; with ``overwrite``, an empty
  directory or one a previous nvfp4_dist export wrote, recognised by its marker
  ``nvfp4_dist_export.json`` (producer, version, format, the files it wrote) listing every entry
  present. Never the current directory or a parent of it, never a protected directory (the
  source model) or a parent of one, never through a symlink. A refusal is one line and touches
  nothing.
* **Who is writing** (:func:`lock_target`): an export holds ``flock`` on ``.{name}.lock`` next
  to the target from the staging directory's creation to its publish or discard (the kernel
  drops it when the process dies). Holding it means every ``.{name}.staging-*``, ``.{name}.old-*``
  and publish journal next to the target was left by a dead run; a second export to the same
  target while one is running is refused.
* **Publishing** (:func:`publish_dir`): with a previous export in place, ``renameat2(
  RENAME_EXCHANGE)`` swaps the two directories in one step, so the target always holds a complete
  export; without it (not Linux, or a filesystem that refuses it) a journal
  ``.{name}.publish.json`` is written before the first rename and :func:`recover_leftovers`
  finishes an interrupted publish (the staged export was complete and validated before the
  journal existed). Leftovers of dead runs are removed by the next export or by
  :func:`recover_output_dir`, with a warning saying what was done.

``stage_hook`` is for tests only: when set, it is called with the name of each publish step
(``"piece-written"`` after each piece a rank wrote, ``"staged"``, ``"journaled"``,
``"between-renames"``, ``"exchanged"``) so a test can stop or kill
the process there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterable

from .._version import __version__
from ..errors import ExportError

MARKER_NAME = "nvfp4_dist_export.json"
PRODUCER = "nvfp4_dist"
_MAX_LISTED = 5

stage_hook: Callable[[str], None] | None = None  # tests only (module docstring)


def step(name: str) -> None:
    """Call the test hook (module docstring) at the named step; nothing when it is unset."""
    if stage_hook is not None:
        stage_hook(name)


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


# ------------------------------------------------------------------------------------------------
# What may be replaced


def target_path(out) -> Path:
    """``out`` made absolute with its parent resolved (symlinks above it are fine) and its last
    component kept as written (a symlink there is refused, not followed)."""
    path = Path(out).expanduser().absolute()
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.parent.resolve() / path.name


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def read_marker(directory: Path) -> dict | None:
    """The export marker in ``directory`` (None when there is none or it is not ours)."""
    try:
        content = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("producer") != PRODUCER:
        return None
    files = content.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return content


def marker_content(files: Iterable[str], **extra) -> dict:
    """The marker an export writes: producer, version, what else the caller records (format),
    and the files it wrote (the marker itself excluded)."""
    return {"producer": PRODUCER, "version": __version__, **extra,
            "files": sorted(f for f in files if f != MARKER_NAME)}


def check_output_dir(out, *, overwrite: bool, protected: Iterable = ()) -> Path:
    """The target path of an export to ``out``, or ExportError (one line) saying why not.

    Touches nothing. ``protected``: directories that must survive (the source model); None
    entries and names that are no existing path are skipped.
    """
    target = target_path(out)
    if target.is_symlink():
        raise ExportError(f"output path {target} is a symlink (to {os.readlink(target)}); an export is never "
                          "written through a symlink: pass the real directory or a new path")
    cwd = Path.cwd().resolve()
    if _contains(target, cwd):
        what = "the current directory" if target == cwd else "a parent of the current directory"
        raise ExportError(f"output directory {target} is {what}; it is never replaced: choose a new "
                          "subdirectory as the output")
    for item in protected:
        if item is None or not Path(item).exists():
            continue
        guarded = Path(item).resolve()
        if _contains(target, guarded):
            what = "the source model directory" if target == guarded else \
                f"a parent of the source model directory {guarded}"
            raise ExportError(f"output directory {target} is {what}; it is never replaced: choose "
                              "another output path")
    if not target.exists():
        return target
    if not target.is_dir():
        raise ExportError(f"output path {target} exists and is not a directory; remove it or choose another")
    if not overwrite:
        raise ExportError(f"output directory {target} already exists: choose a new path, or pass "
                          "overwrite=True (--overwrite) to replace an earlier nvfp4_dist export once "
                          "the new one is complete")
    present = {p.name for p in target.iterdir()}
    if not present:
        return target
    marker = read_marker(target)
    if marker is None:
        raise ExportError(f"output directory {target} is not empty and holds no nvfp4_dist export marker "
                          f"({MARKER_NAME}), so --overwrite will not replace it: it holds "
                          f"{_listed(present)}; choose another path or empty it yourself")
    foreign = present - set(marker["files"]) - {MARKER_NAME}
    if foreign:
        raise ExportError(f"output directory {target} holds files the earlier nvfp4_dist export did not "
                          f"write: {_listed(foreign)}; move them away or choose another path "
                          "(--overwrite replaces only what an export wrote)")
    odd = sorted(name for name in present if not (target / name).is_file() or (target / name).is_symlink())
    if odd:
        raise ExportError(f"output directory {target} holds entries that are not plain files: {_listed(odd)}; "
                          "an nvfp4_dist export writes only files: move them away or choose another path")
    return target


# ------------------------------------------------------------------------------------------------
# Who is writing: the target's lock


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


class TargetLock:
    """``flock`` held on ``.{name}.lock`` next to a target (see the module docstring)."""

    def __init__(self, target: Path, fd: int, path: Path):
        self.target, self._fd, self.path = target, fd, path

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: the next locker re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def lock_target(target: Path, *, wait: bool = False) -> TargetLock | None:
    """Take the target's lock; None when another live process holds it (``wait=False``)."""
    path = _lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked meanwhile
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return TargetLock(target, fd, path)
        os.close(fd)


def _lock_holder(target: Path) -> str:
    try:
        pid = _lock_path(target).read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid else ""


# ------------------------------------------------------------------------------------------------
# Leftovers of interrupted runs


def _journal_path(target: Path) -> Path:
    return target.parent / f".{target.name}.publish.json"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    """The pid embedded in a staging/old directory name (``...-{pid}-{hex}``)."""
    parts = name.rsplit("-", 2)
    try:
        return int(parts[-2])
    except (ValueError, IndexError):
        return None


def _write_json_durably(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(content, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish_journal(target: Path, notes: list[str]) -> None:
    """Complete or roll back a journaled publish that a dead run left (lock held)."""
    journal = _journal_path(target)
    try:
        content = json.loads(journal.read_text())
        staging = target.parent / content["staging"]
        old = target.parent / content["old"]
    except (OSError, ValueError, KeyError, TypeError):
        journal.with_name(journal.name + ".tmp").unlink(missing_ok=True)
        if journal.exists():
            journal.unlink()
            notes.append(f"removed an unreadable publish journal {journal.name}")
        return
    if not target.exists() and staging.is_dir():
        os.rename(staging, target)  # the staged export was complete before the journal existed
        notes.append(f"finished an interrupted publish: moved the new export {staging.name} into place")
    elif not target.exists() and old.is_dir():
        os.rename(old, target)
        notes.append(f"rolled back an interrupted publish: restored the previous export from {old.name}")
    _fsync_dir(target.parent)
    journal.unlink()


def recover_leftovers(target: Path, lock: TargetLock) -> list[str]:
    """With the target's lock held: finish an interrupted publish and remove the staging and
    old directories dead runs left next to ``target``; returns what was done (one note each)."""
    assert lock.target == target
    notes: list[str] = []
    if _journal_path(target).exists() or _journal_path(target).with_name(_journal_path(target).name + ".tmp").exists():
        _finish_journal(target, notes)
    for kind in ("staging", "old"):
        for path in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            pid = _owner_pid(path.name)
            if pid is not None and _pid_alive(pid):
                continue  # a live process of that pid: never touched (it may be another host's run)
            if path.is_symlink() or not path.is_dir():
                continue
            shutil.rmtree(path, ignore_errors=True)
            what = "an unfinished export" if kind == "staging" else "a replaced export"
            notes.append(f"removed {path.name} ({what} a dead run left behind)")
    return notes


def recover_output_dir(out) -> list[str]:
    """Clean up after interrupted exports to ``out`` (finish or roll back a publish, remove dead
    runs' staging/old directories); returns notes of what was done. Leaves everything alone
    while another export to ``out`` is running."""
    target = target_path(out)
    if not target.parent.is_dir():
        return []
    lock = lock_target(target)
    if lock is None:
        return [f"an export to {target} is running{_lock_holder(target)}; its files were left alone"]
    try:
        return recover_leftovers(target, lock)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------
# Staging and publishing

_LOCKS: dict[str, TargetLock] = {}  # staging dir -> the lock its export holds (rank 0)


def _unique(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def open_target(out, *, overwrite: bool, protected: Iterable = ()) -> Path:
    """Check ``out``, take its lock, clean up what dead runs left (warning about it), check again
    and create an empty staging directory next to the target; returns the staging path (the lock
    is held until :func:`publish_dir` or :func:`discard_dir`)."""
    protected = tuple(protected)
    target = check_output_dir(out, overwrite=overwrite, protected=protected)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_target(target)
    except OSError as exc:
        raise ExportError(f"cannot write next to {target}: {exc.strerror or exc}; choose a writable "
                          "output path") from None
    if lock is None:
        raise ExportError(f"another export to {target} is running{_lock_holder(target)}; wait for it "
                          "or choose another output path")
    try:
        notes = recover_leftovers(target, lock)
        if notes:
            warnings.warn(f"nvfp4_dist: cleaned up after an interrupted export to {target}: " + "; ".join(notes),
                          stacklevel=3)
        check_output_dir(target, overwrite=overwrite, protected=protected)  # a restored target counts
        staging = _unique(target, "staging")
        staging.mkdir()
    except BaseException:
        lock.release()
        raise
    _LOCKS[str(staging)] = lock
    return staging


def _release(staging: Path) -> None:
    lock = _LOCKS.pop(str(staging), None)
    if lock is not None:
        lock.release()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()  # None where libc lacks it (tests set it to None for the fallback)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically; False when the system cannot (nothing was changed)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a} and {b} failed: {os.strerror(err)}")


def publish_dir(staging, target) -> None:
    """Put the finished ``staging`` directory at ``target`` (module docstring), release the lock.

    Once this returns the new export is in place; a failure before that leaves the old one."""
    staging, target = Path(staging), target_path(target)
    step("staged")
    try:
        if not target.exists():
            os.rename(staging, target)
        elif exchange(staging, target):
            step("exchanged")  # the old export now sits at the staging path
            shutil.rmtree(staging, ignore_errors=True)
        else:
            old = _unique(target, "old")
            _write_json_durably(_journal_path(target), {"staging": staging.name, "old": old.name})
            step("journaled")
            os.rename(target, old)
            step("between-renames")
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(old, target)  # put the old export back
                _journal_path(target).unlink()
                raise
            _fsync_dir(target.parent)
            _journal_path(target).unlink()
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        _release(staging)


def discard_dir(staging) -> None:
    """Delete an unpublished staging directory and release its target's lock."""
    staging = Path(staging)
    try:
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        _release(staging)
