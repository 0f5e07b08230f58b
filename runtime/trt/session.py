"""TensorRT session over an engine's plan: numpy in, numpy logits out, the latent cache on the device.

Behind the same interface as OrtSession (runtime/session.py's Session). One execution context per optimization
profile (prefill, decode: export/trt/plan.py). The cache is a DeviceLatentCache: the engine reads the past rows and
writes the new ones in place through tensor addresses. Decode steps run as CUDA graphs where shapes allow: the past
is padded (masked, zero rows) to a bucket so the shapes, and thus the graph, repeat for many steps; the new rows go to
a fixed staging buffer and are copied into the cache after each replay. One graph is kept: any other use of the
decode context (another bucket, batch or cache, or plain execution) replaces it, because a graph bakes in the
context's state at capture. A graph that cannot be captured (some engines cannot) falls back to plain execution.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import tensorrt as trt

from moetrt.errors import MoetrtError
from moetrt.progress import note
from moetrt.runtime.trt import cuda_memory as cuda
from moetrt.runtime.trt.cuda_memory import DeviceArray, DeviceBuffer
from moetrt.runtime.trt.device_cache import DeviceLatentCache
from moetrt.formats import (
    ATTENTION_MASK,
    HOST_INPUTS,
    INPUT_IDS,
    LOGIT_POSITIONS,
    LOGITS,
    POSITION_IDS,
    EngineManifest,
    TrtSection,
    new_latent,
    past_latent,
)

ITEMSIZES = {"float32": 4, "float16": 2, "bfloat16": 2}
SMALLEST_BUCKET = 64


def decode_buckets(max_context: int) -> list[int]:
    """Past lengths decode steps are padded to: powers of two from 64, then max_context itself."""
    buckets, bucket = [], SMALLEST_BUCKET
    while bucket < max_context:
        buckets.append(bucket)
        bucket *= 2
    return [*buckets, max_context]


def bfloat16_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """bfloat16 values, held as their uint16 bit patterns (numpy has no bfloat16), as float32: exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclasses.dataclass
class DecodeGraph:
    """A captured decode step for one (batch, bucket, cache): fixed input, logits and staging buffers."""

    graph: int
    graph_exec: int
    inputs: dict[str, DeviceBuffer]
    logits: DeviceBuffer
    staging: list[DeviceBuffer]


class TrtSession:
    backend = "trt"

    def __init__(self, manifest: EngineManifest):
        info = manifest.section
        if not isinstance(info, TrtSection):
            raise MoetrtError(f"{manifest.directory} is a {manifest.backend} engine, not a TensorRT one")
        if manifest.dtype not in ITEMSIZES:
            raise MoetrtError(f"TensorRT sessions run float32, float16 or bfloat16 engines, not {manifest.dtype}")
        if info.python_at_runtime:
            self._register_jit_plugins()
        config = manifest.model_config
        self.num_layers, self.latent_dim, self.vocab_size = config.num_hidden_layers, config.latent_dim, config.vocab_size
        self.itemsize = ITEMSIZES[manifest.dtype]
        self.max_context = manifest.profile.max_context
        self.stream = cuda.stream_create()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(manifest.path(info.plan).read_bytes())
        if not self.engine:
            raise MoetrtError(f"TensorRT could not load {manifest.path(info.plan)} (its log above says why); "
                              "rebuild the engine with this TensorRT")
        names = [profile.name for profile in info.profiles]
        self.contexts = {name: self.engine.create_execution_context() for name in names}
        for index, name in enumerate(names):
            self.contexts[name].set_optimization_profile_async(index, self.stream)
        self.logits_dtype = self.engine.get_tensor_dtype(LOGITS)
        self.logits_itemsize = 2 if self.logits_dtype in (trt.DataType.HALF, trt.DataType.BF16) else 4
        self.buffers = {name: DeviceBuffer() for name in (*HOST_INPUTS, LOGITS, "scratch")}
        self.graph_key: tuple[int, ...] | None = None
        self.graph: DecodeGraph | None = None

    @staticmethod
    def _register_jit_plugins() -> None:
        try:
            from moetrt.plugins import trt_plugin  # noqa: F401 - importing registers the plugins
        except ImportError as error:
            raise MoetrtError(f"this engine's plugin is the JIT form, which needs Python packages at run time "
                              f"({error.name} is missing): install moetrt[gpu] or rebuild with --trt-plugin aot") from None

    def new_cache(self, slots: int, max_context: int) -> DeviceLatentCache:
        return DeviceLatentCache(self.num_layers, self.latent_dim, slots, max_context, self.itemsize, self.stream)

    def run(
        self,
        input_ids: npt.ArrayLike,
        position_ids: npt.ArrayLike,
        attention_mask: npt.ArrayLike,
        logit_positions: npt.ArrayLike,
        past: list[DeviceArray],
        new_rows: list[DeviceArray] | None = None,
    ) -> tuple[npt.NDArray[np.float32], list[DeviceArray]]:
        """One graph call; see OrtSession.run. `past` and `new_rows` are device views of a DeviceLatentCache (the
        engine writes the new rows in place). Returns float32 logits `[B, N, vocab]` and the new rows."""
        arrays = (input_ids, position_ids, attention_mask, logit_positions)
        host = {name: np.ascontiguousarray(array, dtype=np.int64) for name, array in zip(HOST_INPUTS, arrays)}
        batch, seq = host[INPUT_IDS].shape
        n_logits = host[LOGIT_POSITIONS].shape[1]
        if new_rows is None:
            new_rows = self._scratch_rows(seq, batch)
        if seq == 1 and n_logits == 1:
            logits = self._decode(host, past, new_rows)
        else:
            logits = self._execute("prefill", host, past, new_rows)
        return logits, new_rows

    # -- plain execution -----------------------------------------------------------------------------------------

    def _execute(self, profile: str, host: dict[str, npt.NDArray[np.int64]], past: list[DeviceArray],
                 new_rows: list[DeviceArray]) -> npt.NDArray[np.float32]:
        if profile == "decode":
            self._drop_graph()
        context = self.contexts[profile]
        for name, array in host.items():
            pointer = self.buffers[name].reserve(array.nbytes)
            cuda.to_device(pointer, array, self.stream)
            self._bind(context, name, array.shape, pointer)
        for layer, (rows, out) in enumerate(zip(past, new_rows)):
            self._bind(context, past_latent(layer), rows.shape, rows.pointer)
            context.set_tensor_address(new_latent(layer), out.pointer)
        logits_shape = (host[INPUT_IDS].shape[0], host[LOGIT_POSITIONS].shape[1], self.vocab_size)
        logits = self.buffers[LOGITS].reserve(int(np.prod(logits_shape)) * self.logits_itemsize)
        context.set_tensor_address(LOGITS, logits)
        if not context.execute_async_v3(self.stream):
            raise MoetrtError(f"TensorRT could not run the {profile} profile at these shapes (its log says why)")
        return self._logits(logits, logits_shape)

    def _bind(self, context: trt.IExecutionContext, name: str, shape: tuple[int, ...], pointer: int) -> None:
        if not context.set_input_shape(name, trt.Dims(list(shape))):
            raise MoetrtError(f"input {name} of shape {list(shape)} is outside the engine's profiles "
                              "(rebuild with larger --max-batch / --max-seq / --max-context)")
        context.set_tensor_address(name, pointer)

    def _logits(self, pointer: int, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
        if self.logits_itemsize == 4:
            logits = np.empty(shape, dtype=np.float32)
            cuda.to_host(logits, pointer, self.stream)
            cuda.synchronize(self.stream)
            return logits
        bits = np.empty(shape, dtype=np.uint16)
        cuda.to_host(bits, pointer, self.stream)
        cuda.synchronize(self.stream)
        if self.logits_dtype == trt.DataType.HALF:
            return bits.view(np.float16).astype(np.float32)
        return bfloat16_to_float32(bits)

    def _scratch_rows(self, seq: int, batch: int) -> list[DeviceArray]:
        """Device rows for a caller that keeps no cache (Session.run's new_rows=None)."""
        layer_bytes = seq * batch * self.latent_dim * self.itemsize
        base = self.buffers["scratch"].reserve(layer_bytes * self.num_layers)
        return [DeviceArray(base + i * layer_bytes, (seq, batch, self.latent_dim), self.itemsize, layer_bytes)
                for i in range(self.num_layers)]

    # -- decode steps as CUDA graphs ----------------------------------------------------------------------------

    def _decode(self, host: dict[str, npt.NDArray[np.int64]], past: list[DeviceArray], new_rows: list[DeviceArray]) -> npt.NDArray[np.float32]:
        batch, length = host[INPUT_IDS].shape[0], past[0].shape[0] if past else 0
        bucket = next((b for b in decode_buckets(self.max_context) if b >= length), None)
        if not past or bucket is None or any(rows.capacity < bucket * batch * self.latent_dim * self.itemsize
                                             for rows in past):
            return self._execute("decode", host, past, new_rows)
        key = (batch, bucket, *(rows.pointer for rows in past))
        if key != self.graph_key:
            self._drop_graph()
            self.graph_key, self.graph = key, self._capture(batch, bucket, past)
        graph = self.graph
        if graph is None:  # capture failed for this key: plain execution until the key changes
            return self._execute_uncaptured(host, past, new_rows)
        padded = {**host, ATTENTION_MASK: pad_mask(host[ATTENTION_MASK], bucket)}
        for name, array in padded.items():
            cuda.to_device(graph.inputs[name].pointer, array, self.stream)
        cuda.launch_graph(graph.graph_exec, self.stream)
        for staging, out in zip(graph.staging, new_rows):
            cuda.device_copy(out.pointer, staging.pointer, out.nbytes, self.stream)
        return self._logits(graph.logits.pointer, (batch, 1, self.vocab_size))

    def _capture(self, batch: int, bucket: int, past: list[DeviceArray]) -> DecodeGraph | None:
        """Bind fixed buffers at padded shapes, run once (TensorRT finishes shape-dependent setup), capture."""
        context = self.contexts["decode"]
        shapes = {INPUT_IDS: (batch, 1), POSITION_IDS: (batch, 1), ATTENTION_MASK: (batch, bucket + 1),
                  LOGIT_POSITIONS: (batch, 1)}
        inputs = {name: DeviceBuffer(int(np.prod(shape)) * 8) for name, shape in shapes.items()}
        logits = DeviceBuffer(batch * self.vocab_size * self.logits_itemsize)
        staging = [DeviceBuffer(batch * self.latent_dim * self.itemsize) for _ in past]
        for name, shape in shapes.items():
            cuda.memset(inputs[name].pointer, inputs[name].nbytes, self.stream)
            self._bind(context, name, shape, inputs[name].pointer)
        for layer, (rows, out) in enumerate(zip(past, staging)):
            self._bind(context, past_latent(layer), (bucket, batch, self.latent_dim), rows.pointer)
            context.set_tensor_address(new_latent(layer), out.pointer)
        context.set_tensor_address(LOGITS, logits.pointer)
        graph = graph_exec = 0
        try:
            if not context.execute_async_v3(self.stream):
                raise cuda.CudaError("warm-up execution failed")
            cuda.synchronize(self.stream)
            cuda.begin_capture(self.stream)
            try:
                captured = context.execute_async_v3(self.stream)
            finally:
                graph = cuda.end_capture(self.stream)
            if not captured or not graph:
                raise cuda.CudaError("execution could not be captured")
            graph_exec = cuda.instantiate(graph)
        except cuda.CudaError as error:
            note(f"decode step at batch {batch}, past {bucket}: no CUDA graph ({error}); running it directly")
            cuda.destroy_graph(graph, graph_exec)
            for buffer in (*inputs.values(), logits, *staging):
                buffer.close()
            return None
        return DecodeGraph(graph, graph_exec, inputs, logits, staging)

    def _execute_uncaptured(self, host: dict[str, npt.NDArray[np.int64]], past: list[DeviceArray],
                            new_rows: list[DeviceArray]) -> npt.NDArray[np.float32]:
        key = self.graph_key
        logits = self._execute("decode", host, past, new_rows)
        self.graph_key = key  # remember the failed capture, so the next step does not retry it
        return logits

    def _drop_graph(self) -> None:
        if self.graph is not None:
            cuda.destroy_graph(self.graph.graph, self.graph.graph_exec)
            for buffer in (*self.graph.inputs.values(), self.graph.logits, *self.graph.staging):
                buffer.close()
        self.graph_key, self.graph = None, None

    def close(self) -> None:
        self._drop_graph()
        for buffer in self.buffers.values():
            buffer.close()
        cuda.stream_destroy(self.stream)


def pad_mask(mask: npt.NDArray[np.int64], bucket: int) -> npt.NDArray[np.int64]:
    """`[B, P+1]` -> `[B, bucket+1]`: the past's columns, zeros up to the bucket, the new token's column last."""
    padded = np.zeros((mask.shape[0], bucket + 1), dtype=np.int64)
    padded[:, : mask.shape[1] - 1] = mask[:, :-1]
    padded[:, -1] = mask[:, -1]
    return padded


if TYPE_CHECKING:  # mypy (tests/typecheck) proves the TensorRT session is a Session over device views
    from moetrt.runtime.session import Session

    _trt_session: type[Session[DeviceArray]] = TrtSession
