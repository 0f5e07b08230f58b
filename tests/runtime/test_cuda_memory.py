"""The TensorRT session's CUDA layer on a GPU, through cuda-python: the device latent cache, CUDA graph replay, and
recovery from a failed capture.

Marked `gpu`; skips without a CUDA GPU, and where cuda-python is not installed (it comes with `moetrt[trt]`).
"""

import numpy as np
import pytest
import torch

from moetrt.errors import MoetrtError
from moetrt.runtime.trt import cuda_memory as cuda
from moetrt.runtime.trt.device_cache import DeviceLatentCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
ROWS = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)  # [steps, slots, latent]


@pytest.fixture
def stream():
    try:
        stream = cuda.stream_create()
    except MoetrtError as error:  # no cuda-python
        pytest.skip(str(error))
    yield stream
    cuda.stream_destroy(stream)


def test_latent_cache_rows_round_trip_and_the_unused_rows_stay_zero(stream):
    cache = DeviceLatentCache(2, 8, 3, 16, 4, stream)  # 2 layers, latent 8, 3 slots, context 16, fp32
    first, _ = cache.reserve(2)
    cuda.to_device(first.pointer, ROWS, stream)
    cache.advance(2)
    back = np.empty_like(ROWS)
    cuda.to_host(back, cache.past()[0].pointer, stream)
    padding = np.ones((14, 3, 8), np.float32)
    cuda.to_host(padding, cache.past()[0].pointer + ROWS.nbytes, stream)
    cuda.synchronize(stream)
    cache.close()
    assert np.array_equal(back, ROWS)
    assert not padding.any()


def test_a_replayed_graph_copies_the_source_as_it_is_at_replay(stream):
    source, target = cuda.DeviceBuffer(ROWS.nbytes), cuda.DeviceBuffer(ROWS.nbytes)
    cuda.begin_capture(stream)
    cuda.device_copy(target.pointer, source.pointer, ROWS.nbytes, stream)
    graph = cuda.end_capture(stream)
    graph_exec = cuda.instantiate(graph)
    cuda.to_device(source.pointer, ROWS * 2, stream)
    cuda.launch_graph(graph_exec, stream)
    back = np.empty_like(ROWS)
    cuda.to_host(back, target.pointer, stream)
    cuda.synchronize(stream)
    cuda.destroy_graph(graph, graph_exec)
    for buffer in (source, target):
        buffer.close()
    assert np.array_equal(back, ROWS * 2)


def test_a_failed_capture_leaves_no_error_for_the_next_call(stream):
    """The session's fallback after a capture fails: cuda.capture ends the capture and clears the error it left
    (as trtexec does), so the plain execution that follows does not report it."""
    def forbidden_during_capture() -> bool:
        cuda.synchronize(stream)  # synchronizing a capturing stream invalidates the capture
        return True

    cuda.begin_capture(stream)  # first, unguarded: the error stays behind
    with pytest.raises(cuda.CudaError):
        forbidden_during_capture()
    with pytest.raises(cuda.CudaError):
        cuda.end_capture(stream)
    assert cuda.last_error() != 0  # what TensorRT's next enqueue would have reported; reading it also resets it

    with pytest.raises(cuda.CudaError):
        cuda.capture(stream, forbidden_during_capture)
    assert cuda.last_error() == 0
    buffer = cuda.DeviceBuffer(ROWS.nbytes)  # and the stream works as before
    cuda.to_device(buffer.pointer, ROWS, stream)
    back = np.empty_like(ROWS)
    cuda.to_host(back, buffer.pointer, stream)
    cuda.synchronize(stream)
    buffer.close()
    assert np.array_equal(back, ROWS)
