"""moetrt's CPU expert kernel (`cpu_experts.c`): packing, compiling, choosing a build for this CPU, calling.

ONNX Runtime engines built with `moe_kernel="moetrt"` run each MoE layer's routed experts here instead of in
ONNX Runtime's `com.microsoft::MoE`: the engine's graph is cut at the expert nodes (export/ort/split.py) and the
runtime calls this kernel between the pieces. The experts are float32 (`pack_gate_up`, `pack_down`) or int8/int4
with float16 scales per group of inputs (`pack_quantized`). Why, the layouts and the measurements: the header of
`cpu_experts.c`, bench/NOTES.md and bench/quant_kernel.py.

The kernel is C with no dependency beyond libc and pthreads. An engine build compiles it for every level in
TARGETS of its CPU architecture and carries the libraries (`kernels/`); loading takes the best one this CPU runs
(`choose`). Without one that fits, or for tests and benchmarks, it is compiled for this machine
(`-O3 -march=native`) and cached under `$MOETRT_CACHE_DIR` (default `~/.cache/moetrt`), keyed by its source, the
compiler and the CPU's instruction sets. A library is code the process runs: its sha256 (the engine manifest's
record, or the one written beside a cached build) is checked before it is loaded, so damaged bytes give an error,
not a crash.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrt.atomic import write_bytes
from moetrt.errors import MoetrtError
from moetrt.formats import CpuKernel, file_sha256
from moetrt.settings import cache_dir

SOURCE = Path(__file__).with_name("cpu_experts.c")
ABI = 5  # 5: an expert id of -1 skips the pair (expert parallelism); 4: int4 packed in eight-row groups
GROUP = 4  # weight rows per packed group (NW in the C source)
INT4_GROUP = 8  # int4 weight rows per packed group (NW4)
LANES = 8  # floats per vector
CHUNK = 32  # quantized inputs per row per packed chunk
QUANTIZED_BITS = (8, 4)


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


def supported_quantized(hidden: int, inter: int, slices: int, bits: int, group_size: int) -> str | None:
    """None when the kernel can run `bits` (8 or 4) experts of this shape with scales per `group_size` inputs,
    cut into `slices`, else why not."""
    if bits not in QUANTIZED_BITS:
        return f"{bits}-bit weights are not one of the kernel's {', '.join(map(str, QUANTIZED_BITS))}"
    if group_size < CHUNK or group_size & (group_size - 1):
        return f"group size {group_size} is not a power of two >= {CHUNK}"
    if hidden % group_size:
        return f"hidden size {hidden} is not a multiple of the group size {group_size}"
    if slices < 1 or inter % slices or (inter // slices) % group_size:
        return f"expert width {inter} / {slices} slices is not a multiple of the group size {group_size}"
    return None


def quantized_bytes(rows: int, inputs: int, bits: int, group_size: int) -> int:
    """Bytes of `rows` packed rows of `inputs` quantized inputs: the values and a float16 scale per group."""
    return rows * inputs * bits // 8 + rows * (inputs // group_size) * 2


def _pack_rows(q: np.ndarray, d: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Rows `q [..., N, K]` (int8 values) with scales `d [..., N, K/g]` -> bytes `[..., N/G, K/g, G(2 + g*bits/8)]`
    (G = 4 rows per group for int8, 8 for int4): per group of G rows and block of g inputs, the G float16 scales,
    then per chunk of 32 inputs the rows' values (int8: two rows' inputs 0-15, then their inputs 16-31; int4: four
    32-byte pieces j, byte 4a + i of piece j holding row a's input 4j + i in its low nibble and 16 + 4j + i in its
    high nibble, as q + 8). The layout of cpu_experts.c's header."""
    *lead, rows, inputs = q.shape
    blocks, group = inputs // group_size, INT4_GROUP if bits == 4 else GROUP
    values = q.reshape(*lead, rows // group, group, blocks, group_size // CHUNK, CHUNK)
    values = np.moveaxis(values, -4, -2)  # [..., N/G, K/g, g/32, G, 32]
    if bits == 4:
        if values.min(initial=0) < -8 or values.max(initial=0) > 7:
            raise MoetrtError("int4 expert values must lie in [-8, 7]; quantize with moetrt.quantization")
        nibbles = (values.astype(np.int16) + 8).astype(np.uint8).reshape(*values.shape[:-1], 2, 4, 4)  # half, j, i
        data = np.swapaxes(nibbles[..., 0, :, :] | (nibbles[..., 1, :, :] << np.uint8(4)), -3, -2)  # [j, row, i]
    else:  # per chunk: [a 0-15, b 0-15] [a 16-31, b 16-31] [c 0-15, d 0-15] [c 16-31, d 16-31]
        pairs = values.reshape(*values.shape[:-2], 2, 2, 2, CHUNK // 2)  # [..., pair, row, half, 16]
        data = np.swapaxes(pairs, -3, -2).view(np.uint8)
    data = np.ascontiguousarray(data).reshape(*lead, rows // group, blocks, -1)
    scales = np.ascontiguousarray(np.moveaxis(
        d.astype(np.float16).reshape(*lead, rows // group, group, blocks), -2, -1)).view(np.uint8)
    return np.concatenate([scales, data], axis=-1)


def pack_quantized(fc1_q: np.ndarray, fc1_d: np.ndarray, down_q: np.ndarray, down_d: np.ndarray, bits: int,
                   group_size: int, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantized experts in the kernel's packed layout (cpu_experts.c header), as two 1-D uint8 arrays
    (gate_up, down). `fc1_q` int8 `[E, 2I, H]` interleaved rows gate_0, up_0, gate_1, ... (export/ort/lower.py
    interleave_gate_up, applied to the values and to `fc1_d` float16 `[E, 2I, H/g]`); `down_q` int8 `[E, H, I]`
    with `down_d` float16 `[E, H, I/g]`; int4 values one per byte in [-8, 7]. Weights are q * d (moetrt/
    quantization.py). Raises MoetrtError for shapes the layout cannot hold (`supported_quantized`)."""
    experts, rows, hidden = fc1_q.shape
    _check_quantized(hidden, rows // 2, slices, bits, group_size)
    if (fc1_d.shape != (experts, rows, hidden // group_size) or down_q.shape != (experts, hidden, rows // 2)
            or down_d.shape != (experts, hidden, rows // 2 // group_size)):
        raise MoetrtError(f"quantized experts do not fit together: {fc1_q.shape}, {fc1_d.shape}, {down_q.shape}, "
                          f"{down_d.shape} for group size {group_size}")
    return (pack_quantized_gate_up(fc1_q, fc1_d, bits, group_size, slices),
            pack_quantized_down(down_q, down_d, bits, group_size, slices))


def pack_quantized_gate_up(fc1_q: np.ndarray, fc1_d: np.ndarray, bits: int, group_size: int,
                           slices: int) -> np.ndarray:
    """The gate/up half of `pack_quantized`: 1-D uint8 of `packed_quantized_bytes(E, 2I, H, ...)`."""
    experts, rows, hidden = fc1_q.shape
    _check_quantized(hidden, rows // 2, slices, bits, group_size)
    if fc1_d.shape != (experts, rows, hidden // group_size):
        raise MoetrtError(f"gate/up scales {fc1_d.shape} do not fit values {fc1_q.shape} in groups of {group_size}")
    width = rows // 2 // slices
    gate_up = _pack_rows(fc1_q.reshape(experts, slices, 2 * width, hidden),
                         fc1_d.reshape(experts, slices, 2 * width, hidden // group_size), bits, group_size)
    return np.ascontiguousarray(gate_up).reshape(-1)


def pack_quantized_down(down_q: np.ndarray, down_d: np.ndarray, bits: int, group_size: int,
                        slices: int) -> np.ndarray:
    """The down half of `pack_quantized`: 1-D uint8 of `packed_quantized_bytes(E, H, I, ...)`."""
    experts, hidden, inter = down_q.shape
    _check_quantized(hidden, inter, slices, bits, group_size)
    if down_d.shape != (experts, hidden, inter // group_size):
        raise MoetrtError(f"down scales {down_d.shape} do not fit values {down_q.shape} in groups of {group_size}")
    width = inter // slices
    per_slice = down_q.reshape(experts, hidden, slices, width).transpose(0, 2, 1, 3)
    scales = down_d.reshape(experts, hidden, slices, width // group_size).transpose(0, 2, 1, 3)
    down = _pack_rows(np.ascontiguousarray(per_slice), np.ascontiguousarray(scales), bits, group_size)
    return np.ascontiguousarray(down).reshape(-1)


def _check_quantized(hidden: int, inter: int, slices: int, bits: int, group_size: int) -> None:
    reason = supported_quantized(hidden, inter, slices, bits, group_size)
    if reason:
        raise MoetrtError(f"the moetrt CPU expert kernel cannot run these experts: {reason}")


def packed_quantized_bytes(experts: int, rows: int, inputs: int, bits: int, group_size: int) -> int:
    """Length of a `pack_quantized` half: `experts` blocks of `rows` rows over `inputs` inputs (slices only
    reorder them)."""
    return experts * quantized_bytes(rows, inputs, bits, group_size)


def packed_gate_up_shape(experts: int, inter: int, hidden: int, slices: int) -> tuple[int, ...]:
    """Shape of `pack_gate_up` for `[E, 2I, H]` cut into `slices`."""
    width = inter // slices
    return (experts, slices, 2 * width // GROUP, hidden // LANES, GROUP, LANES)


def packed_down_shape(experts: int, hidden: int, inter: int, slices: int) -> tuple[int, ...]:
    """Shape of `pack_down` for `[E, H, I]` cut into `slices`."""
    width = inter // slices
    return (experts, slices, hidden // GROUP, width // LANES, GROUP, LANES)


COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-Wno-psabi")


@dataclass(frozen=True)
class KernelTarget:
    """An instruction-set level the kernel is compiled for: `compiler_flags` select it, `cpu_flags` are what
    /proc/cpuinfo must show for a CPU to run the result (None: every flag of the CPU that compiled it)."""

    name: str
    arch: str  # platform.machine()
    compiler_flags: tuple[str, ...]
    cpu_flags: tuple[str, ...] | None


X86_64_V2 = ("cx16", "lahf_lm", "pni", "popcnt", "sse4_1", "sse4_2", "ssse3")
X86_64_V3 = (*X86_64_V2, "abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
X86_64_V4 = (*X86_64_V3, "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")

# Per architecture, best first. x86: the psABI levels (GCC 11+, clang 12+), tuned generically so the library does
# not depend on the CPU that built it. The kernel's speed comes from its vector width and register count, not from
# tuning: on an AVX2 CPU x86-64-v3 gives what -march=native gives (256-bit FMA, 16 registers, ROW_BLOCK 3); on
# AVX-512, x86-64-v4 defines __AVX512F__ as native does (32 registers, ROW_BLOCK 4). The "-vnni" levels add the
# integer dot product int8/int4 experts use (_mm256_dpbusd_epi32: AVX-512 VNNI with VL, or the VEX AVX-VNNI of
# AVX2-only CPUs); x86-64-v2's quantized path is plain C. aarch64: the building CPU's own features, and the
# armv8-a baseline (NEON) that every aarch64 CPU runs.
TARGETS = (
    KernelTarget("x86-64-v4-vnni", "x86_64", ("-march=x86-64-v4", "-mavx512vnni", "-mtune=generic"),
                 (*X86_64_V4, "avx512_vnni")),
    KernelTarget("x86-64-v4", "x86_64", ("-march=x86-64-v4", "-mtune=generic"), X86_64_V4),
    KernelTarget("x86-64-v3-vnni", "x86_64", ("-march=x86-64-v3", "-mavxvnni", "-mtune=generic"),
                 (*X86_64_V3, "avx_vnni")),
    KernelTarget("x86-64-v3", "x86_64", ("-march=x86-64-v3", "-mtune=generic"), X86_64_V3),
    KernelTarget("x86-64-v2", "x86_64", ("-march=x86-64-v2", "-mtune=generic"), X86_64_V2),
    KernelTarget("native", "aarch64", ("-mcpu=native",), None),
    KernelTarget("armv8-a", "aarch64", ("-march=armv8-a",), ("asimd", "fp")),
)


def targets(arch: str) -> tuple[KernelTarget, ...]:
    """The levels an engine built on a CPU of architecture `arch` carries, best first (none for others)."""
    return tuple(target for target in TARGETS if target.arch == arch)


def choose(carried: Sequence[CpuKernel], cpu_flags: Iterable[str]) -> CpuKernel | None:
    """The first of `carried` (best first) whose required flags are all in `cpu_flags`, else None."""
    have = set(cpu_flags)
    return next((kernel for kernel in carried if set(kernel.cpu_flags) <= have), None)


@dataclass(frozen=True)
class KernelChoice:
    """The build of the kernel an engine runs on this machine: `path` of a build the engine carries, or None for
    one compiled here (`native_library`); `description` says which, for `moetrt info` and the load note."""

    path: Path | None
    description: str


def expert_kernel(carried: Sequence[CpuKernel], directory: Path) -> KernelChoice:
    """For an engine in `directory` carrying `carried` (best first): the best build this CPU runs, else one
    compiled for this machine. Raises MoetrtError (the CPU, the builds carried, the fix) when neither is possible."""
    from moetrt import hardware

    names = ", ".join(kernel.target for kernel in carried) or "none"
    chosen = choose(carried, hardware.cpu_flags())
    if chosen is not None:
        return KernelChoice(directory / chosen.file, f"{chosen.target} (carried: {names})")
    why = (f"none of the engine's builds ({names}) fits (this CPU lacks "
           f"{', '.join(sorted(set(carried[-1].cpu_flags) - set(hardware.cpu_flags())))} for {carried[-1].target})"
           if carried else "the engine carries no build")
    problem = cannot_compile_here()
    if problem is None:
        return KernelChoice(None, f"compiled for this CPU: {why}")
    raise MoetrtError(f"moetrt's CPU expert kernel cannot run on this {hardware.cpu_arch()} CPU: {why}, and it "
                      f"cannot be compiled here ({problem}); rebuild the engine with --moe-kernel onnxruntime, or "
                      "install gcc")


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
        "the moetrt CPU expert kernel needs a C compiler here and none was found; install gcc "
        "(Debian: apt-get install gcc), or build the engine with --moe-kernel onnxruntime"
    )


def compile_kernel(output: Path, flags: Sequence[str], compiler: str | None = None, source: Path = SOURCE) -> None:
    """Compile `source` (cpu_experts.c) with COMMON_FLAGS and `flags` into the shared library `output`, whole or
    not at all (another process may be loading the same name). Raises MoetrtError without a compiler or when
    compiling fails (e.g. a compiler too old for `-march=x86-64-v4`)."""
    compiler = compiler or _compiler()
    fd, partial = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        out = subprocess.run([compiler, *COMMON_FLAGS, *flags, "-o", partial, str(source), "-lm"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise MoetrtError(f"compiling {source.name} ({compiler} {' '.join(flags)}) failed: "
                              f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
        os.chmod(partial, 0o755)  # mkstemp made it private; the engine may be served by another user
        os.replace(partial, output)
    finally:
        Path(partial).unlink(missing_ok=True)


def cannot_compile_here() -> str | None:
    """Why the kernel cannot be compiled on this machine at load (no compiler, or no writable cache), or None."""
    if find_compiler() is None:
        return "no C compiler"
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"the kernel cache {folder} cannot be created ({error.strerror})"
    return None if os.access(folder, os.W_OK) else f"the kernel cache {folder} is not writable"


def cached_build(flags: Sequence[str], compiler: str | None = None, source: Path = SOURCE) -> tuple[Path, str]:
    """`source` (the kernel, cpu_experts.c) compiled with `flags` in the cache (`$MOETRT_CACHE_DIR`), keyed by the
    source, the flags, the compiler's version and this CPU: compiled once, then reused (engine builds carry the
    same libraries every time). Returns (path, sha256). Raises MoetrtError without a compiler or a writable cache,
    or when compiling fails."""
    from moetrt import hardware

    compiler = compiler or _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), " ".join([*COMMON_FLAGS, *flags]).encode(), version.encode(),
                    " ".join(hardware.cpu_flags()).encode(), hardware.cpu_arch().encode()])
    ).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{key}.so"
    record = path.with_name(f"{path.name}.sha256")  # written after the library: a build cut short has none
    recorded = record.read_text().strip() if record.is_file() else None
    if recorded is None or not path.is_file() or file_sha256(path) != recorded:  # missing, partial or damaged
        problem = cannot_compile_here()
        if problem:
            raise MoetrtError(f"cannot compile the moetrt CPU expert kernel here: {problem}; set MOETRT_CACHE_DIR to "
                              "a writable directory, or build the engine with --moe-kernel onnxruntime")
        compile_kernel(path, flags, compiler, source)
        recorded = file_sha256(path)
        write_bytes(record, f"{recorded}\n".encode())
    return path, recorded


@functools.cache
def native_library() -> ctypes.CDLL:
    """The kernel compiled for this machine (`-march=native`), once, into the cache; used where no carried build
    fits, and by tests and benchmarks. Raises MoetrtError without a compiler or a writable cache."""
    path, recorded = cached_build(["-march=native"])
    return load_library(path, recorded, fix=f"delete {path} and retry")


def check_code(path: Path, sha256: str, what: str, fix: str) -> None:
    """Refuse compiled code at `path` (`what` it is, for the message) unless its bytes hash to `sha256` (hex): run
    before the dynamic loader maps it, since damaged code would crash the process. Raises MoetrtError ending in
    `fix` when it cannot be read or does not match."""
    try:
        digest = file_sha256(path)
    except OSError as error:
        raise MoetrtError(f"cannot read {what} {path} ({error.strerror}); {fix}") from None
    if digest != sha256:
        raise MoetrtError(f"{what} {path} is damaged (sha256 {digest[:16]}..., recorded {sha256[:16]}...); {fix}")


@functools.cache
def load_library(path: Path, sha256: str | None = None, fix: str = "rebuild the engine") -> ctypes.CDLL:
    """The compiled kernel at `path`, its ABI checked and its entry point typed. With `sha256` (hex), the file
    is hashed first and refused unless it matches, before the dynamic loader maps it: damaged code would crash
    the process. Raises MoetrtError (ending in `fix`) when it is damaged, cannot be loaded or is another version
    of the kernel."""
    if sha256 is not None:
        check_code(path, sha256, "the CPU expert kernel", fix)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise MoetrtError(f"cannot load the CPU expert kernel {path} ({error}); {fix}") from None
    if lib.moetrt_experts_abi() != ABI:
        raise MoetrtError(f"{path} is not the kernel this moetrt expects; {fix}")
    pointer, size = ctypes.c_void_p, ctypes.c_long
    lib.moetrt_experts.argtypes = [pointer] * 6 + [size] * 8 + [ctypes.c_int]
    lib.moetrt_experts.restype = ctypes.c_int
    return lib


ERRORS = {-1: "bad arguments (an expert id out of range, or a shape the packed layout cannot hold)",
          -2: "out of memory", -3: "could not start its threads"}


class CpuExperts:
    """One MoE layer's routed experts, packed; `__call__` runs them on raw float32/int32 buffers. `bits` 32: the
    float32 layout (`pack_gate_up`, `pack_down`); 8 or 4: the uint8 arrays of `pack_quantized` with scales per
    `group_size` inputs. `library`: a loaded build of the kernel (`load_library`), by default the one compiled
    for this machine. Raises MoetrtError for a shape the kernel cannot run or arrays that do not match it."""

    def __init__(self, gate_up: np.ndarray, down: np.ndarray, num_experts: int, hidden: int, inter: int,
                 slices: int, threads: int | None = None, library: ctypes.CDLL | None = None, bits: int = 32,
                 group_size: int = 0):
        if bits == 32:
            reason = supported(hidden, inter, slices)
            sizes, dtype = (num_experts * 2 * inter * hidden, num_experts * hidden * inter), np.float32
        else:
            reason = supported_quantized(hidden, inter, slices, bits, group_size)
            sizes = (num_experts * quantized_bytes(2 * inter, hidden, bits, group_size),
                     num_experts * quantized_bytes(hidden, inter, bits, group_size))
            dtype = np.uint8
        if reason:
            raise MoetrtError(f"the moetrt CPU expert kernel cannot run these experts: {reason}")
        if (gate_up.size, down.size) != sizes:
            raise MoetrtError("packed expert weights do not match the recorded expert shape; rebuild the engine")
        for array in (gate_up, down):
            if array.dtype != dtype or not array.flags.c_contiguous:
                raise MoetrtError(f"packed {bits}-bit expert weights must be contiguous {np.dtype(dtype).name}")
        self.gate_up, self.down = gate_up, down
        self.num_experts, self.hidden, self.inter, self.slices = num_experts, hidden, inter, slices
        self.bits, self.group_size = bits, group_size if bits != 32 else 0
        self.threads = max(1, min(threads or os.cpu_count() or 1, slices, 64))
        self.library = library if library is not None else native_library()
        self._run = self.library.moetrt_experts

    def run_pointers(self, x: int, ids: int, weights: int, out: int, tokens: int, top_k: int) -> None:
        """x/out `[T, H]` float32, ids `[T, k]` int32, weights `[T, k]` float32, all C-contiguous, by address."""
        status = self._run(x, ids, weights, self.gate_up.ctypes.data, self.down.ctypes.data, out, tokens, top_k,
                           self.num_experts, self.hidden, self.inter, self.slices, self.bits, self.group_size,
                           self.threads)
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
