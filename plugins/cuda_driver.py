"""Launch AOT stages' PTX through the CUDA driver API (ctypes on libcuda), the way a TensorRT AOT plugin runs them.

No torch and no cuda-python: the caller hands device pointers as ints and a CUstream handle. The GPU tests
(tests/plugins/gpu) and bench/gpu_experts.py run the PTX from plugins/aot_kernels.py with it, without TensorRT.
"""

from __future__ import annotations

import ctypes

from moetrt.plugins.aot_kernels import AotStage

CU_JIT_ERROR_LOG_BUFFER = 5
CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class CudaError(RuntimeError):
    pass


class CudaDriver:
    """The few driver calls a plugin launch needs, on the context current to this thread (torch's primary one)."""

    def __init__(self, library: str = "libcuda.so.1"):
        self.lib = ctypes.CDLL(library)
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        self.lib.cuModuleGetFunction.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
        self.lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.check(self.lib.cuInit(0), "cuInit")
        self.modules: dict[str, ctypes.c_void_p] = {}

    def check(self, result: int, call: str, detail: str = "") -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(name))
            raise CudaError(f"{call} failed: {(name.value or b'?').decode()} ({result}) {detail}".rstrip())

    def driver_version(self) -> int:
        """e.g. 12080 for CUDA 12.8."""
        version = ctypes.c_int()
        self.check(self.lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        return version.value

    def ensure_context(self) -> None:
        """Make device 0's primary context current if nothing is (torch usually already did)."""
        context = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
        if context.value:
            return
        device = ctypes.c_int()
        self.check(self.lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
        self.check(self.lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")

    def load(self, stage: AotStage) -> ctypes.c_void_p:
        """JIT-compile the stage's PTX (driver side, as TensorRT does) and return its CUfunction."""
        self.ensure_context()
        log = ctypes.create_string_buffer(16384)
        options = (ctypes.c_int * 2)(CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
        values = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), ctypes.c_void_p(len(log)))
        module = ctypes.c_void_p()
        ptx = ctypes.create_string_buffer(stage.ptx.encode())
        result = self.lib.cuModuleLoadDataEx(ctypes.byref(module), ptx, 2, options, values)
        self.check(result, f"cuModuleLoadDataEx({stage.kernel_name})", log.value.decode(errors="replace"))
        function = ctypes.c_void_p()
        result = self.lib.cuModuleGetFunction(ctypes.byref(function), module, stage.kernel_name.encode())
        self.check(result, "cuModuleGetFunction")
        if stage.needs_shared_opt_in:
            # Triton's launcher does this for > 48 KiB; a TensorRT AOT plugin needs TensorRT to do the same.
            attribute = CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.check(self.lib.cuFuncSetAttribute(function, attribute, stage.shared_mem), "cuFuncSetAttribute")
        return function

    def launch(self, stage: AotStage, function, pointers: dict[str, int], stream: int) -> None:
        """Launch with exactly `stage.params`: buffers from `pointers`, scalars as int32, null hidden pointers."""
        holders = [argument(param, pointers) for param in stage.params]
        params = (ctypes.c_void_p * len(holders))(*(ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders))
        result = self.lib.cuLaunchKernel(
            function, *stage.grid, stage.block_threads, 1, 1, stage.shared_mem, ctypes.c_void_p(stream), params, None
        )
        self.check(result, f"cuLaunchKernel({stage.kernel_name})")


def argument(param, pointers: dict[str, int]):
    if param.kind == "scalar":
        return ctypes.c_int32(param.value)
    if param.kind == "hidden":
        return ctypes.c_uint64(0)
    return ctypes.c_uint64(pointers[param.name])


def run_stages(driver: CudaDriver, stages, pointers: dict[str, int], stream: int, functions: dict | None = None):
    """Load (once, cached in `functions` by stage name) and launch every stage in order on `stream`."""
    functions = {} if functions is None else functions
    for stage in stages:
        if stage.name not in functions:
            functions[stage.name] = driver.load(stage)
        driver.launch(stage, functions[stage.name], pointers, stream)
    return functions
