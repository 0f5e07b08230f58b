"""Device memory, copies, streams and CUDA graphs through cuda-python's runtime API, as small typed functions.

cuda-python ships Cython modules without type information; everything above this module sees ints (device
pointers and handles) and numpy arrays. No torch. Errors raise CudaError naming the call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import numpy as np
import numpy.typing as npt

from moetrt.errors import MoetrtError


# The host arrays the sessions copy: int64 inputs, float32 / float16 / bfloat16-as-uint16 logits.
HostArray = npt.NDArray[np.int64] | npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]


class CudaError(RuntimeError):
    pass


@functools.cache
def _runtime() -> ModuleType:
    """cuda-python's runtime API: `cuda.bindings.runtime` (cuda-python >= 12.6), `cuda.cudart` before. Imported on
    first use, so this module imports (and its callers' pure helpers test) without it."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MoetrtError("TensorRT engines need cuda-python: pip install 'moetrt[trt]'")


def _call(name: str, *args: object) -> int:
    """Call cudart.`name`; raise on an error status; return its one result as an int (pointer or handle), else 0."""
    cudart = _runtime()
    status, *results = getattr(cudart, name)(*args)
    if status != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(status)
        raise CudaError(f"{name} failed: {text.decode() if isinstance(text, bytes) else text} ({int(status)})")
    return int(results[0]) if results else 0


def malloc(nbytes: int) -> int:
    return _call("cudaMalloc", max(nbytes, 1))


def free(pointer: int) -> None:
    _call("cudaFree", pointer)


def stream_create() -> int:
    return _call("cudaStreamCreate")


def stream_destroy(stream: int) -> None:
    _call("cudaStreamDestroy", stream)


def synchronize(stream: int) -> None:
    _call("cudaStreamSynchronize", stream)


def memset(pointer: int, nbytes: int, stream: int) -> None:
    _call("cudaMemsetAsync", pointer, 0, nbytes, stream)


def memset_2d(pointer: int, pitch: int, width: int, height: int, stream: int) -> None:
    """Zero `height` rows of `width` bytes, each `pitch` bytes after the one before (cudaMemset2DAsync)."""
    if width and height:
        _call("cudaMemset2DAsync", pointer, pitch, 0, width, height, stream)


def to_device(pointer: int, array: HostArray, stream: int) -> None:
    """Copy a C-contiguous host array to `pointer` (pageable memory: the copy is staged, then asynchronous)."""
    if not array.flags.c_contiguous:
        raise ValueError("to_device copies C-contiguous arrays only")
    _call("cudaMemcpyAsync", pointer, array.ctypes.data, array.nbytes, _runtime().cudaMemcpyKind.cudaMemcpyHostToDevice,
          stream)


def to_host(array: HostArray, pointer: int, stream: int) -> None:
    """Copy into a C-contiguous host array; synchronise `stream` before reading it."""
    _call("cudaMemcpyAsync", array.ctypes.data, pointer, array.nbytes, _runtime().cudaMemcpyKind.cudaMemcpyDeviceToHost,
          stream)


def device_copy(destination: int, source: int, nbytes: int, stream: int) -> None:
    _call("cudaMemcpyAsync", destination, source, nbytes, _runtime().cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)


def copy_2d(destination: int, destination_pitch: int, source: int, source_pitch: int, width: int, height: int,
            stream: int) -> None:
    """Copy `height` rows of `width` bytes between device pointers whose rows lie `*_pitch` bytes apart
    (cudaMemcpy2DAsync: the two regions must not overlap)."""
    if width and height:
        _call("cudaMemcpy2DAsync", destination, destination_pitch, source, source_pitch, width, height,
              _runtime().cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)


def begin_capture(stream: int) -> None:
    # Thread-local: other threads' CUDA calls do not invalidate this capture.
    _call("cudaStreamBeginCapture", stream, _runtime().cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)


def end_capture(stream: int) -> int:
    return _call("cudaStreamEndCapture", stream)


def last_error() -> int:
    """cudaGetLastError: the error status left by an earlier call (0 for none), which it also resets."""
    status = _runtime().cudaGetLastError()
    return int(status[0] if isinstance(status, tuple) else status)


def clear_error() -> None:
    """Reset the error a failed call leaves behind (not a sticky context error, which no call clears): without it,
    the next kernel launch (TensorRT checks cudaGetLastError after its own) reports the stale error."""
    last_error()


def capture(stream: int, work: Callable[[], bool]) -> int:
    """Capture what `work` enqueues on `stream` (it returns False on failure) into a graph; returns the graph. On
    any failure the capture is ended, its partial graph destroyed and the error it left cleared, then CudaError is
    raised (an exception from `work` propagates after the same cleanup)."""
    begin_capture(stream)
    done, graph = False, 0
    try:
        done = bool(work())
    finally:
        try:
            graph = end_capture(stream)
        except CudaError:
            graph = 0
        if not (done and graph):
            destroy_graph(graph, 0)
            clear_error()
    if not done:
        raise CudaError("the captured work failed")
    if not graph:
        raise CudaError("the stream capture was invalidated")
    return graph


def instantiate(graph: int) -> int:
    # WithFlags: the same (graph, flags) signature in CUDA 11.4+ and 12+, unlike cudaGraphInstantiate.
    return _call("cudaGraphInstantiateWithFlags", graph, 0)


def launch_graph(graph_exec: int, stream: int) -> None:
    _call("cudaGraphLaunch", graph_exec, stream)


def destroy_graph(graph: int, graph_exec: int) -> None:
    if graph_exec:
        _call("cudaGraphExecDestroy", graph_exec)
    if graph:
        _call("cudaGraphDestroy", graph)


@dataclasses.dataclass(frozen=True)
class DeviceArray:
    """A view of device memory: no ownership. `capacity` is the bytes allocated from `pointer` on."""

    pointer: int
    shape: tuple[int, ...]
    itemsize: int
    capacity: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize


class DeviceBuffer:
    """An allocation that grows on demand (its contents do not survive a growth) and is freed by `close`."""

    def __init__(self, nbytes: int = 0):
        self.pointer, self.nbytes = 0, 0
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> int:
        """A pointer to at least `nbytes`; reallocates when the buffer is smaller."""
        if nbytes > self.nbytes or not self.pointer:
            self.close()
            self.pointer, self.nbytes = malloc(nbytes), max(nbytes, 1)
        return self.pointer

    def close(self) -> None:
        if self.pointer:
            free(self.pointer)
            self.pointer, self.nbytes = 0, 0
