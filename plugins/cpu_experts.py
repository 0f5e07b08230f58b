"""moetrt's CPU expert kernel (`cpu_experts.c`): packing, compiling on first use, calling.

ONNX Runtime engines built with `moe_kernel="moetrt"` run each MoE layer's routed experts here instead of in
ONNX Runtime's `com.microsoft::MoE`: the engine's graph is cut at the expert nodes (export/ort/split.py) and the
runtime calls this kernel between the pieces. Why, and the measurements: the header of `cpu_experts.c` and
bench/NOTES.md.

The kernel is C with no dependency beyond libc and pthreads. It is compiled for this machine
(`-O3 -march=native`) the first time it is needed and cached under `$MOETRT_CACHE_DIR` (default
`~/.cache/moetrt`), keyed by its source, the compiler and the CPU's instruction sets.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.settings import cache_dir

SOURCE = Path(__file__).with_name("cpu_experts.c")
ABI = 2
GROUP = 4  # weight rows per packed group (NW in the C source)
LANES = 8  # floats per vector


def supported(hidden: int, inter: int, slices: int) -> str | None:
    """None when the kernel can run experts of this shape cut into `slices`, else why not."""
    if hidden % LANES:
        return f"hidden size {hidden} is not a multiple of {LANES}"
    if slices < 1 or inter % slices or (inter // slices) % LANES:
        return f"expert width {inter} / {slices} slices is not a multiple of {LANES}"
    return None


def pack_gate_up(fc1: np.ndarray, slices: int) -> np.ndarray:
    """Interleaved gate/up `[E, 2I, H]` (rows gate_0, up_0, gate_1, ...) -> `[E, S, 2W/4, H/8, 4, 8]`."""
    experts, rows, hidden = fc1.shape
    width = rows // 2 // slices
    grouped = fc1.reshape(experts, slices, 2 * width // GROUP, GROUP, hidden // LANES, LANES)
    return np.ascontiguousarray(grouped.transpose(0, 1, 2, 4, 3, 5))


def pack_down(down: np.ndarray, slices: int) -> np.ndarray:
    """down_proj `[E, H, I]` -> per slice the rows' channels `[E, S, H/4, W/8, 4, 8]`."""
    experts, hidden, inter = down.shape
    width = inter // slices
    per_slice = down.reshape(experts, hidden, slices, width).transpose(0, 2, 1, 3)
    grouped = per_slice.reshape(experts, slices, hidden // GROUP, GROUP, width // LANES, LANES)
    return np.ascontiguousarray(grouped.transpose(0, 1, 2, 4, 3, 5))


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compiler() -> str:
    found = find_compiler()
    if found:
        return found
    raise MoetrtError(
        "the moetrt CPU expert kernel is compiled on first use and no C compiler was found; install gcc "
        "(Debian: apt-get install gcc), or build the engine with --moe-kernel onnxruntime"
    )


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel for this machine, built once into the cache."""
    from moetrt import hardware

    compiler = _compiler()
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(),
                    " ".join(hardware.cpu_flags()).encode(), hardware.cpu_arch().encode()])
    ).hexdigest()[:16]
    path = cache_dir() / f"cpu_experts-{key}.so"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MoetrtError(f"cannot create the kernel cache {path.parent} ({error.strerror}); set MOETRT_CACHE_DIR "
                              "to a writable directory") from None
        fd, partial = tempfile.mkstemp(prefix=".cpu_experts-", suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            out = subprocess.run([compiler, *flags, "-o", partial, str(SOURCE), "-lm"], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                raise MoetrtError(f"compiling the moetrt CPU expert kernel failed ({compiler}): "
                                  f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            os.replace(partial, path)  # whole or not at all: another process may be loading the same name
        finally:
            Path(partial).unlink(missing_ok=True)
    lib = ctypes.CDLL(str(path))
    if lib.moetrt_experts_abi() != ABI:
        raise MoetrtError(f"{path} is not the kernel this moetrt expects; delete it and retry")
    pointer, size = ctypes.c_void_p, ctypes.c_long
    lib.moetrt_experts.argtypes = [pointer] * 6 + [size] * 6 + [ctypes.c_int]
    lib.moetrt_experts.restype = ctypes.c_int
    return lib


ERRORS = {-1: "bad arguments (an expert id out of range, or a shape the packed layout cannot hold)",
          -2: "out of memory", -3: "could not start its threads"}


class CpuExperts:
    """One MoE layer's routed experts, packed; `__call__` runs them on raw float32/int32 buffers."""

    def __init__(self, gate_up: np.ndarray, down: np.ndarray, num_experts: int, hidden: int, inter: int,
                 slices: int, threads: int | None = None):
        reason = supported(hidden, inter, slices)
        if reason:
            raise MoetrtError(f"the moetrt CPU expert kernel cannot run these experts: {reason}")
        if gate_up.size != num_experts * 2 * inter * hidden or down.size != num_experts * hidden * inter:
            raise MoetrtError("packed expert weights do not match the recorded expert shape; rebuild the engine")
        for array in (gate_up, down):
            if array.dtype != np.float32 or not array.flags.c_contiguous:
                raise MoetrtError("packed expert weights must be contiguous float32")
        self.gate_up, self.down = gate_up, down
        self.num_experts, self.hidden, self.inter, self.slices = num_experts, hidden, inter, slices
        self.threads = max(1, min(threads or os.cpu_count() or 1, slices, 64))
        self._run = library().moetrt_experts

    def run_pointers(self, x: int, ids: int, weights: int, out: int, tokens: int, top_k: int) -> None:
        """x/out `[T, H]` float32, ids `[T, k]` int32, weights `[T, k]` float32, all C-contiguous, by address."""
        status = self._run(x, ids, weights, self.gate_up.ctypes.data, self.down.ctypes.data, out, tokens, top_k,
                           self.num_experts, self.hidden, self.inter, self.slices, self.threads)
        if status:
            raise MoetrtError(f"the moetrt CPU expert kernel failed: {ERRORS.get(status, status)}")

    def __call__(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.hidden or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
            raise MoetrtError(f"expert kernel inputs: x [T, {self.hidden}], ids and weights [T, k]; got "
                              f"{x.shape}, {ids.shape}, {weights.shape}")
        out = np.empty_like(x)
        self.run_pointers(x.ctypes.data, ids.ctypes.data, weights.ctypes.data, out.ctypes.data, x.shape[0],
                          ids.shape[1] if ids.ndim == 2 else 1)
        return out
