"""Artifacts written whole or not at all: a staging directory renamed into place on success.

A staging directory `.NAME.XXXX.partial` sits beside its output with an owner file `.NAME.XXXX.partial.owner`
(host and process id) beside it, not inside, since a build records every file inside as an artifact. A build
killed outright (SIGKILL, the OOM killer) cannot clean up; the next build into the same output removes what a
process that is gone left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from moetrt.errors import MoetrtError
from moetrt.progress import note

OWNER_SUFFIX = ".owner"
STAGED_SUFFIXES = (".partial", ".old")  # a build in progress; the previous output while it is being replaced
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(MoetrtError):
    """The disk filled while writing an output: `need` bytes (an estimate, or a lower bound when `exact_need` is
    False) at `path`, the directory the output goes to."""

    def __init__(self, path: Path, need: int, exact_need: bool) -> None:
        self.path, self.need, self.exact_need = path, need, exact_need
        free = _free_bytes(path)
        amount = f"need about {_gb(need)} at " if exact_need else f"need more than {_gb(need)} at " if need else "at "
        super().__init__(f"no space left on device ({amount}{path}"
                         + (f", {_gb(free)} free" if free is not None else "")
                         + "): free space there or choose another output directory")


def check_replaceable(out_dir: Path, marker: str, what: str, sources: tuple[Path, ...] = ()) -> None:
    """Raise MoetrtError unless `out_dir` may be written whole by `staging_dir`, which deletes what it replaces: it
    must be absent, an empty directory, or a directory holding `marker` (an earlier `what`, e.g. "engine" with
    manifest.json); and it must not be, or contain, any of `sources` (the checkpoint being read) or the current
    directory."""
    target = Path(out_dir).resolve()
    for source, role in [*((Path(s), "the input") for s in sources), (Path.cwd(), "the current directory")]:
        held = source.resolve()
        if target == held or target in held.parents:
            raise MoetrtError(f"output directory {out_dir} is {role} ({source}) or contains it, and writing it "
                              f"replaces the whole directory: choose a new directory, e.g. -o {target.name}-{what}")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise MoetrtError(f"output directory {out_dir} is not empty and holds no moetrt {what} (no {marker}); "
                          f"writing it would delete what is there: choose a new or empty directory")
    if target.exists() and not target.is_dir():
        raise MoetrtError(f"output path {out_dir} exists and is not a directory")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(out_dir: Path, need_bytes: int | None = None, keep_on_interrupt: bool = False):
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on failure it is removed.

    Staging directories for `out_dir` left by a process that is gone are removed first, with a note.
    `need_bytes`: the caller's estimate of the output's size, said when the disk fills (default: the size of
    the `out_dir` being replaced, else more than what was written when it filled). Raises MoetrtError when the
    parent cannot be written, and DiskFullError (a MoetrtError) when the disk fills inside the block, however
    the writer reported it. `keep_on_interrupt`: on KeyboardInterrupt (Ctrl-C) the directory is left in place, as a
    kill would leave it, for a resuming writer to adopt (export/resume.py), with a note naming it (unless nothing was
    written into it yet).
    """
    out_dir = Path(out_dir).resolve()  # "." or ".." would name no sibling
    parent = out_dir.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise MoetrtError(f"output path {out_dir} exists and is not a directory")
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise MoetrtError(f"{ancestor} is a file, not a directory; choose another output directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
        _write_owner(work)
    except OSError as error:
        if error.errno in _DISK_FULL_ERRNOS:
            raise DiskFullError(parent, need_bytes or _tree_bytes(out_dir), need_bytes is not None) from None
        raise MoetrtError(f"cannot write to {parent} ({error.strerror}); choose a writable output directory") from None
    try:
        yield work
        os.chmod(work, 0o755)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            _write_owner(retired)
            os.replace(out_dir, retired / out_dir.name)
            os.replace(work, out_dir)
            _remove_staged(retired)
        else:
            os.replace(work, out_dir)
        _owner_file(work).unlink(missing_ok=True)
    except BaseException as error:
        written = _tree_bytes(work)
        if keep_on_interrupt and isinstance(error, KeyboardInterrupt) and written:
            if not parent.name.endswith(STAGED_SUFFIXES):  # the outermost staging directory says it once
                note(f"interrupted: {work} keeps the {_gb(written)} written so far; the same command resumes from "
                     "them (remove that directory to discard them)")
            raise
        _remove_staged(work)
        if isinstance(error, DiskFullError) or _is_disk_full(error):
            estimate = need_bytes or _tree_bytes(out_dir)
            inner = error.need if isinstance(error, DiskFullError) else 0
            raise DiskFullError(parent, estimate or max(written, inner), bool(estimate)) from None
        raise


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the staging directories for `out_dir` (`.NAME.*.partial`, `.NAME.*.old`) whose owner file names a
    process of this host that is gone; returns them. Ones without an owner file, or owned by a live process or
    another host, are left alone."""
    removed = []
    for staged in stale_staging(out_dir):
        size = _tree_bytes(staged)
        _remove_staged(staged)
        removed.append(staged)
        note(f"removed {staged} ({_gb(size)}), left by an earlier build that was killed")
    return removed


def stale_staging(out_dir: Path) -> list[Path]:
    """The staging directories for `out_dir` (`.NAME.*.partial`, `.NAME.*.old`) whose owner file names a process of
    this host that is gone, oldest name first."""
    parent, prefix = Path(out_dir).resolve().parent, f".{Path(out_dir).name}."
    if not parent.is_dir():
        return []
    return [staged for staged in sorted(parent.iterdir())
            if staged.name.startswith(prefix) and staged.name.endswith(STAGED_SUFFIXES) and staged.is_dir()
            and _owner_is_gone(staged)]


def adopt_staging(staged: Path) -> None:
    """Make this process the owner of the staging directory `staged` (an earlier process's, which is gone), so that
    `remove_stale_staging` leaves it alone while this process runs; `discard_staging` removes it."""
    _write_owner(staged)


def discard_staging(staged: Path) -> None:
    """Remove a staging directory and its owner file."""
    _remove_staged(staged)


def _owner_file(staged: Path) -> Path:
    return staged.with_name(staged.name + OWNER_SUFFIX)


def _write_owner(staged: Path) -> None:
    _owner_file(staged).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")


def _owner_is_gone(staged: Path) -> bool:
    try:
        owner = json.loads(_owner_file(staged).read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False  # a shared filesystem: that host's process ids mean nothing here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _remove_staged(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)
    _owner_file(staged).unlink(missing_ok=True)


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` or one it was raised from is ENOSPC/EDQUOT; ONNX Runtime and TensorRT report it only in
    their own exception types' text."""
    for _ in range(16):
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(os.strerror(number) in str(error) for number in _DISK_FULL_ERRNOS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _tree_bytes(path: Path) -> int:
    """Bytes in the files under `path` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `path` whole or not at all: a temporary sibling, flushed to disk, then renamed over it.
    Raises DiskFullError when the disk fills."""
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as error:
        if error.errno in _DISK_FULL_ERRNOS:
            raise DiskFullError(path.parent, memoryview(data).nbytes, True) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if _is_disk_full(error):
            raise DiskFullError(path.parent, memoryview(data).nbytes, True) from None
        raise
