"""What this machine offers an engine: CPU instruction sets and CUDA devices (via the driver, no torch)."""

from __future__ import annotations

import ctypes
import os
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# x86 instruction-set extensions moetrt checks: the x86-64 micro-architecture levels its CPU expert kernel is
# compiled for (plugins/cpu_experts.py TARGETS), and those MLAS picks kernels by (a graph optimised at level "all"
# depends on them; its engine records them). /proc/cpuinfo's x86 `flags` line also holds non-ISA bits
# (hypervisor, constant_tsc), which are dropped; aarch64's `Features` line is all ISA (hwcaps) and kept whole.
X86_ISA_FLAGS = (
    "pni", "ssse3", "cx16", "popcnt", "lahf_lm", "sse4_1", "sse4_2",  # x86-64-v2 (pni: SSE3)
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",  # x86-64-v3 (abm: LZCNT)
    "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",  # x86-64-v4
    "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)


def cpu_arch() -> str:
    return platform.machine()


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """This CPU's instruction-set flags, sorted, in /proc/cpuinfo's names (x86: those in X86_ISA_FLAGS; aarch64:
    every hwcap); empty where /proc/cpuinfo is missing."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(set(value.split()) & set(X86_ISA_FLAGS))
        elif key.strip() == "Features":
            flags.update(value.split())
    return tuple(sorted(flags))


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int


@functools.cache
def cuda_driver_version() -> int | None:
    """The CUDA driver API version (e.g. 12080), or None without a driver."""
    driver = _libcuda()
    if driver is None:
        return None
    version = ctypes.c_int()
    return version.value if driver.cuDriverGetVersion(ctypes.byref(version)) == 0 else None


@functools.cache
def cuda_devices() -> tuple[CudaDevice, ...]:
    """The CUDA GPUs the driver sees (empty without a driver or a GPU)."""
    driver = _libcuda()
    if driver is None or driver.cuInit(0) != 0:
        return ()
    count = ctypes.c_int()
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return ()
    devices = []
    for index in range(count.value):
        handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        driver.cuDeviceGet(ctypes.byref(handle), index)
        driver.cuDeviceGetAttribute(ctypes.byref(major), 75, handle)  # COMPUTE_CAPABILITY_MAJOR
        driver.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle)  # COMPUTE_CAPABILITY_MINOR
        name = ctypes.create_string_buffer(256)
        driver.cuDeviceGetName(name, 256, handle)
        memory = ctypes.c_size_t()
        driver.cuDeviceTotalMem_v2(ctypes.byref(memory), handle)
        devices.append(CudaDevice(index, name.value.decode(), (major.value, minor.value), memory.value))
    return tuple(devices)


def _libcuda():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def available_memory() -> int:
    """Bytes of memory available to new allocations now: Linux's MemAvailable (/proc/meminfo), capped by a cgroup v2
    memory.max set on this process's group; elsewhere the physical memory (os.sysconf)."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, max(int(limit) - used, 0))
    except OSError:
        pass
    return available


def disk_free(path) -> int:
    """Bytes free for an unprivileged writer on the filesystem holding `path` (its nearest existing parent)."""
    import shutil

    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
