"""Artifacts written whole or not at all: a staging directory renamed into place on success."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from moetrt.errors import MoetrtError


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(out_dir: Path):
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on failure it is removed."""
    parent = out_dir.resolve().parent
    if out_dir.exists() and not out_dir.is_dir():
        raise MoetrtError(f"output path {out_dir} exists and is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    except OSError as error:
        raise MoetrtError(f"cannot write to {parent} ({error.strerror}); choose a writable output directory") from None
    try:
        yield work
        os.chmod(work, 0o755)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(work, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `path` whole or not at all: a temporary sibling, flushed to disk, then renamed over it."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
