"""moetrt's ONNX Runtime op library: the CPU expert kernel as the custom op `moetrt.ort::Experts`.

ort_experts_op.c is compiled into an engine's `kernels/` when it is built (no instruction-set flags: one build
serves every CPU of the architecture), or at load into the kernel cache for an engine that carries none, and
registered with a session's options; runtime/ort/fused.py then runs an engine's segments
and expert layers as one graph. The op calls the kernel library the engine loaded (`moetrt_experts_on`, by
address) with ONNX Runtime's intra-op threads. Kernel builds from before that entry point (engines built before
it carry them) lack it: those engines run segment by segment, as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError

SOURCE = Path(__file__).with_name("ort_experts_op.c")
FLAGS = ("-O2",)  # no instruction-set flags: the op only passes pointers on to the kernel
CARRIED = "kernels/ort_ops.so"  # where an engine carries it (export/ort/build.py build_op_library)
ABI = 1
DOMAIN, OP = "moetrt.ort", "Experts"
DISABLE_ENV = "MOETRT_SEGMENTED"  # "1": run engines segment by segment even where the op library is available


@functools.cache
def library(carried: Path | None = None, sha256: str | None = None, fix: str = "rebuild the engine") -> Path:
    """The op library to register: `carried` (an engine's build, refused unless its bytes have `sha256`, hashed
    before the loader maps it), else the one compiled for this machine into the kernel cache; its ABI checked.
    Raises MoetrtError (ending in `fix` for a carried one) when it is damaged, or (not carried) without a compiler
    or a writable cache, or when it does not compile or load."""
    from moetrt.plugins.cpu_experts import cached_build, cannot_compile_here, check_code

    if carried is not None:
        path = carried
        check_code(path, sha256 or "", "the onnxruntime op library", fix)
    else:
        problem = cannot_compile_here()
        if problem is not None:
            raise MoetrtError(f"the engine carries no onnxruntime op library and it cannot be compiled here: {problem}")
        try:
            path, _ = cached_build(FLAGS, source=SOURCE)
        except MoetrtError as error:
            raise MoetrtError(f"the onnxruntime op library did not compile here: {error}") from None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise MoetrtError(f"cannot load moetrt's onnxruntime op library {path} ({error})") from None
    if getattr(lib, "moetrt_ort_ops_abi", lambda: None)() != ABI:
        raise MoetrtError(f"{path} is not the onnxruntime op library this moetrt expects")
    return path


def disabled() -> bool:
    """Whether the environment asks for segment by segment (DISABLE_ENV set to anything but "" or "0")."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def segmented_reason(has_entry_point: bool, carried: bool) -> str | None:
    """Why an engine runs segment by segment here, before any library is loaded, or None: the environment says
    to, its kernel build lacks `moetrt_experts_on` (`has_entry_point` false: built before it), or it carries no op
    library (`carried` false) and none can be compiled here. Used by loading and by `moetrt info`."""
    from moetrt.plugins.cpu_experts import cannot_compile_here

    if disabled():
        return f"{DISABLE_ENV} is set"
    if not has_entry_point:
        return "the engine's kernel build predates in-graph experts; rebuild the engine to run it as one graph"
    if not carried and (problem := cannot_compile_here()) is not None:
        return f"the engine carries no onnxruntime op library and it cannot be compiled here: {problem}"
    return None


def kernel_params(kernel) -> np.ndarray:
    """The `kernel` input of a moetrt.ort::Experts node for `kernel` (a CpuExperts): int64 [10], the addresses of
    moetrt_experts_on and of the packed gate_up and down weights, then num_experts, hidden, inter, slices, bits,
    group size and threads (ort_experts_op.c). The arrays must outlive every run that reads it."""
    run = ctypes.cast(kernel.library.moetrt_experts_on, ctypes.c_void_p).value
    return np.array([run, kernel.gate_up.ctypes.data, kernel.down.ctypes.data, kernel.num_experts, kernel.hidden,
                     kernel.inter, kernel.slices, kernel.bits, kernel.group_size, kernel.threads], dtype=np.int64)
