"""Resuming a killed build: the weights an earlier `build-engine` wrote before it died are used again.

A streaming export writes the engine's weights tensor by tensor into one external data file
(onnx_export.save_model: each a checkpoint module read from the mapped shards, FP8 blocks dequantized, quantized to
int8/int4). Beside that file it keeps a journal, `JOURNAL` in the export's staging directory: a first line with the
build's fingerprint, then one line per tensor that is on disk (name, offset, length in the partial file). Every
CHECKPOINT_BYTES the data file is flushed to disk (fsync) before the tensors written since are appended to the
journal (fsync again), so a journal line never names bytes that a crash could lose.

A build killed midway (SIGKILL, the OOM killer, a reboot, Ctrl-C) leaves its staging directory beside the output
(moetrt/atomic.py). The next build into the same output adopts it (`adopt_stale`) instead of removing it, and the
export takes from it what matches its own fingerprint:

- a finished export (its journal beside `export.json`): used as it is, only the engine step runs again;
- a partial one: every tensor its journal names, with the same name and length, is copied from the old file
  (os.copy_file_range: a kernel copy, no memory) instead of being read from the checkpoint and quantized again.

The fingerprint is everything the bytes depend on: the checkpoint's files (names, sizes, modification times), the
dtype, the quantization scheme, the lowering plan, the MTP module, and a hash of moetrt's own source, so a changed
checkpoint or a new moetrt never reuses old bytes. Whatever does not match is removed once the build succeeds.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import zlib
from pathlib import Path

import onnx_ir as ir

from moetrt.atomic import adopt_staging, stale_staging

JOURNAL = "resume.jsonl"
# A second name (hard link) of the data file being written, beside the journal: survives onnx_ir's cleanup.
KEPT_DATA = "resume.data"
# Bytes written between two checkpoints (fsync of the data, then the journal): a killed build redoes at most
# about this much, and pays an fsync per 256 MB.
CHECKPOINT_BYTES = 256 << 20


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 over moetrt's Python source (the core, export and plugins packages): bytes written by other code are
    not reused."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    packages = [Path(__import__(name, fromlist=["_"]).__file__).parent for name in ("moetrt", "moetrt.plugins")]
    for package in (root, *packages):
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(checkpoint_dir: Path, dtype: str, quantize, plan, mtp: bool) -> dict:
    """What an export's bytes depend on (module docstring), as a JSON-able dict. `quantize`: a QuantScheme or
    None; `plan`: the LoweringPlan."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    files = []
    for path in sorted(checkpoint_dir.iterdir()):
        if path.is_file() and (path.suffix in (".safetensors", ".json")):
            stat = path.stat()
            files.append([path.name, stat.st_size, stat.st_mtime_ns])
    return {"checkpoint": str(checkpoint_dir), "files": files, "dtype": dtype,
            "quantize": dataclasses.asdict(quantize) if quantize is not None else None,
            "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "why"}, "mtp": bool(mtp),
            "moetrt": source_hash()}


@dataclasses.dataclass
class Journal:
    """A journal read back: the data file it describes and its tensors, name -> (offset, length, crc32) in bytes."""

    path: Path
    data_file: Path
    tensors: dict[str, tuple[int, int, int]]

    @property
    def nbytes(self) -> int:
        return sum(length for _, length, _ in self.tensors.values())


def read_journal(path: Path, expected: dict) -> Journal | None:
    """The journal at `path` if its fingerprint is `expected` and its data file exists, else None. Tensor lines are
    read up to the first that is not `[name, offset, length, crc32]` within the data file (a torn last line, from
    a kill mid-append, or anything else malformed ends the list there)."""
    try:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0])
    except (OSError, IndexError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(head, dict) or head.get("fingerprint") != expected or not isinstance(head.get("data_file"), str):
        return None
    data_file = path.parent / head["data_file"]
    if not data_file.is_file():
        return None
    size = data_file.stat().st_size
    tensors = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and all(type(v) is int and v >= 0 for v in entry[1:]) and entry[1] + entry[2] <= size):
            break
        tensors[entry[0]] = (entry[1], entry[2], entry[3])
    return Journal(path, data_file, tensors)


def crc32_of(path: Path, offset: int, length: int) -> int:
    """zlib's CRC-32 of `length` bytes of `path` at `offset`, read in 16 MB pieces."""
    crc = 0
    with open(path, "rb") as file:
        file.seek(offset)
        while length > 0:
            piece = file.read(min(length, 16 << 20))
            if not piece:
                break
            crc = zlib.crc32(piece, crc)
            length -= len(piece)
    return crc


def finished_export(candidate: Path, expected: dict) -> Path | None:
    """The finished export directory inside an earlier build's staging directory `candidate` (`.export` with its
    export.json) when its journal's fingerprint is `expected` and every tensor still has its CRC-32."""
    export_dir = candidate / ".export"
    if not (export_dir / "export.json").is_file():
        return None
    journal = read_journal(export_dir / JOURNAL, expected)
    if journal is None or not journal.tensors:
        return None
    if any(crc32_of(journal.data_file, offset, length) != crc for offset, length, crc in journal.tensors.values()):
        return None  # damaged: partial_export takes the tensors that still match
    return export_dir


def partial_export(candidates: list[Path], expected: dict) -> Journal | None:
    """The journal with the most bytes among the partial exports inside `candidates` (earlier builds' staging
    directories) whose fingerprint is `expected`, or None."""
    best = None
    for candidate in candidates:
        for path in candidate.rglob(JOURNAL):  # (rglob enters the hidden staging directories; glob's ** does not)
            journal = read_journal(path, expected)
            if journal is not None and journal.tensors and (best is None or journal.nbytes > best.nbytes):
                best = journal
    return best


def reuse_tensors(model: ir.Model, journal: Journal) -> tuple[int, int, int]:
    """Point every initializer of `model` that `journal` holds (same name, same byte length, bytes that still have
    their journaled CRC-32) at its bytes in the journal's data file (an ir.ExternalTensor: saving copies them with
    copy_file_range). Returns (tensors reused, their bytes, tensors whose bytes no longer match: computed again)."""
    count = total = damaged = 0
    if not _sole_name(journal.data_file):
        return 0, 0, 0
    for name, value in model.graph.initializers.items():
        held = journal.tensors.get(name)
        tensor = value.const_value
        if held is None or tensor is None or held[1] != tensor.nbytes:
            continue
        offset, length, crc = held
        if crc32_of(journal.data_file, offset, length) != crc:
            damaged += 1
            continue
        value.const_value = ir.ExternalTensor(journal.data_file.name, offset, length, tensor.dtype,
                                              shape=tensor.shape, name=tensor.name,
                                              base_dir=journal.data_file.parent)
        count += 1
        total += length
    return count, total, damaged


class JournalWriter:
    """Writes the journal of the external data file being saved into `directory` (see the module docstring).
    `record(name, offset, length)` is called as the writer starts each tensor (onnx_ir's save callback, before the
    tensor's write); a tensor counts as written once the writer has moved two tensors on (its seek flushed the
    buffered bytes), and lines reach the journal at checkpoints only, after an fsync of the data."""

    def __init__(self, directory: Path, data_name: str, expected: dict):
        self.directory, self.data_name, self.expected = directory, data_name, expected
        self._started: list[tuple[str, int, int]] = []  # tensors handed to the writer, in order
        self._written = 0  # how many of them are flushed to the OS (all but the last two)
        self._durable = 0  # how many are in the journal
        self._unsynced = 0
        self._crcs: dict[int, int] = {}  # CRC-32 of each journaled tensor, by index
        self._data_path: Path | None = None
        self._file = None

    def record(self, name: str, offset: int, length: int) -> None:
        self._started.append((name, offset, length))
        while self._written < len(self._started) - 2:
            self._unsynced += self._started[self._written][2]
            self._written += 1
        if self._unsynced >= CHECKPOINT_BYTES:
            self.checkpoint()

    def checkpoint(self) -> None:
        """fsync the data written so far, then journal it with each tensor's CRC-32 (read back from the file)."""
        data = self._data_file()
        if data is None or self._written == self._durable:
            return
        _fsync(data)
        if self._file is None:
            # onnx_ir deletes its temporary file when the save is interrupted (Ctrl-C): a second name keeps it
            kept = self.directory / KEPT_DATA
            try:
                os.link(data, kept)
            except OSError:  # no hard links here: journal the temporary name (a kill still leaves it)
                kept = data
            self._file = open(self.directory / JOURNAL, "w")
            head = {"fingerprint": self.expected, "data_file": os.path.relpath(kept, self.directory)}
            self._file.write(json.dumps(head) + "\n")
        for index in range(self._durable, self._written):
            name, offset, length = self._started[index]
            self._crcs[index] = crc32_of(data, offset, length)
            self._file.write(json.dumps([name, offset, length, self._crcs[index]]) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._durable, self._unsynced = self._written, 0

    def finish(self) -> None:
        """The save is over and its data file has its final name, `data_name` in `directory`: rewrite the journal
        to name it there, with every tensor."""
        if self._file is not None:
            self._file.close()
            self._file = None
        (self.directory / KEPT_DATA).unlink(missing_ok=True)
        data = self.directory / self.data_name
        _fsync(data)
        head = {"fingerprint": self.expected, "data_file": self.data_name}
        crcs = [self._crcs.get(index) for index in range(len(self._started))]
        lines = [json.dumps(head), *(json.dumps([name, offset, length, crc if crc is not None else
                                                 crc32_of(data, offset, length)])
                                     for (name, offset, length), crc in zip(self._started, crcs))]
        (self.directory / JOURNAL).write_text("\n".join(lines) + "\n")

    def _data_file(self) -> Path | None:
        """The file onnx_ir is writing: a temporary directory `.NAME.*` beside the final name, holding NAME."""
        if self._data_path is None:
            found = glob.glob(str(self.directory / f".{self.data_name}.*" / self.data_name))
            if len(found) == 1:
                self._data_path = Path(found[0])
        return self._data_path


def _sole_name(data_file: Path) -> bool:
    """Leave `data_file` (the journal's link to a killed save's data) its only name: onnx_ir refuses to read external
    data with several hard links. The other is the save's temporary file beside it, which a kill leaves. Whether
    that succeeded."""
    for other in data_file.parent.glob(".*/*"):
        if other.is_file() and other != data_file and os.path.samefile(other, data_file):
            other.unlink()
    return data_file.stat().st_nlink == 1


def _fsync(path: Path) -> None:
    """Flush `path`'s data to disk (fsync acts on the file, whichever descriptor wrote it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt_stale(out_dir: Path) -> list[Path]:
    """Earlier builds' staging directories for `out_dir` whose process is gone and that hold a journal, now owned by
    this process (so that staging_dir's cleanup leaves them while this build reads from them). The caller removes
    them (`discard`) when its build has succeeded."""
    adopted = []
    for staged in stale_staging(out_dir):
        if staged.name.endswith(".partial") and any(staged.rglob(JOURNAL)):
            adopt_staging(staged)
            adopted.append(staged)
    return adopted
