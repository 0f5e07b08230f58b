"""TensorRT session over an engine's plan: numpy in, numpy logits out, the latent cache on the device.

Behind the same interface as OrtSession (runtime/session.py's Session). One execution context per optimization
profile (prefill, decode: export/trt/plan.py), sharing one user-managed activation buffer: the contexts run one at a
time on the session's stream, so neither needs memory of its own. The cache is a DeviceLatentCache: the engine reads
the past rows in place, and writes the new rows into a staging buffer whose layers all start 256-byte aligned, as
TensorRT requires (runtime/trt/bindings.py); the session copies them into the cache. Every address and shape set on a
context is checked. Decode steps run as CUDA graphs where shapes allow: the past is padded (masked, zero rows) to a
bucket so the shapes, and thus the graph, repeat for many steps. One graph is kept: any other use of the decode
context (another bucket, batch or cache, or plain execution) replaces it, because a graph bakes in the context's
state at capture. A graph that cannot be captured (some engines cannot) falls back to plain execution, after CUDA's
sticky error from the failed capture is cleared.
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
from moetrt.runtime.trt.bindings import StagingLayout, misaligned, step_bindings
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


def capture_inputs(batch: int, bucket: int) -> dict[str, npt.NDArray[np.int64]]:
    """The host inputs of the warm-up run before a capture: token 0 at position 0 for every row, with its own
    column unmasked, so attention sees one real key (an all-masked row would send NaN through the network)."""
    mask = np.zeros((batch, bucket + 1), dtype=np.int64)
    mask[:, -1] = 1
    zeros = np.zeros((batch, 1), dtype=np.int64)
    return {INPUT_IDS: zeros, POSITION_IDS: zeros.copy(), ATTENTION_MASK: mask, LOGIT_POSITIONS: zeros.copy()}


@dataclasses.dataclass
class DecodeGraph:
    """A captured decode step for one (batch, bucket, cache): fixed input, logits and staging buffers."""

    graph: int
    graph_exec: int
    inputs: dict[str, DeviceBuffer]
    logits: DeviceBuffer
    staging: DeviceBuffer
    rows: list[DeviceArray]  # the staging buffer's layers

    def buffers(self) -> tuple[DeviceBuffer, ...]:
        return (*self.inputs.values(), self.logits, self.staging)


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
        if manifest.profile.max_context is None:  # builds fit the profile to the model before writing it
            raise MoetrtError(f"{manifest.directory}: the manifest's profile has no max_context; rebuild the engine")
        self.max_context = manifest.profile.max_context
        self.stream = cuda.stream_create()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(manifest.path(info.plan).read_bytes())
        if not self.engine:
            raise MoetrtError(f"TensorRT could not load {manifest.path(info.plan)} (its log above says why); "
                              "rebuild the engine with this TensorRT")
        # One activation buffer for both contexts (each would otherwise hold its own for the largest profile).
        self.activations = DeviceBuffer(self.engine.device_memory_size_v2)
        self.contexts = {profile.name: self._context(index, profile.name)
                         for index, profile in enumerate(info.profiles)}
        self.logits_dtype = self.engine.get_tensor_dtype(LOGITS)
        self.logits_itemsize = 2 if self.logits_dtype in (trt.DataType.HALF, trt.DataType.BF16) else 4
        self.buffers = {name: DeviceBuffer() for name in (*HOST_INPUTS, LOGITS, "staging")}
        self.graph_key: tuple[int, ...] | None = None
        self.graph: DecodeGraph | None = None

    def _context(self, profile_index: int, name: str) -> trt.IExecutionContext:
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if not context:
            raise MoetrtError(f"TensorRT could not create an execution context for the {name} profile")
        context.set_device_memory(self.activations.pointer, self.engine.device_memory_size_v2)
        if not context.set_optimization_profile_async(profile_index, self.stream):
            raise MoetrtError(f"TensorRT refused optimization profile {profile_index} ({name}) of this engine")
        return context

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
        engine's new rows are copied there from the staging buffer it writes). Returns float32 logits
        `[B, N, vocab]` and the new rows (without `new_rows`: the staging views, valid until the next call)."""
        arrays = (input_ids, position_ids, attention_mask, logit_positions)
        host = {name: np.ascontiguousarray(array, dtype=np.int64) for name, array in zip(HOST_INPUTS, arrays)}
        n_logits = host[LOGIT_POSITIONS].shape[1]
        if host[INPUT_IDS].shape[1] == 1 and n_logits == 1:
            logits, written = self._decode(host, past)
        else:
            logits, written = self._execute("prefill", host, past)
        if new_rows is None:
            return logits, written
        for staged, out in zip(written, new_rows):  # ordered on the stream before any later use of the cache
            cuda.device_copy(out.pointer, staged.pointer, staged.nbytes, self.stream)
        return logits, new_rows

    # -- plain execution -----------------------------------------------------------------------------------------

    def _execute(self, profile: str, host: dict[str, npt.NDArray[np.int64]],
                 past: list[DeviceArray]) -> tuple[npt.NDArray[np.float32], list[DeviceArray]]:
        """Plain execution; returns the logits and the staging views holding the new rows."""
        if profile == "decode":
            self._drop_graph()
        context = self.contexts[profile]
        batch, seq = host[INPUT_IDS].shape
        inputs = {}
        for name, array in host.items():
            inputs[name] = self.buffers[name].reserve(array.nbytes)
            cuda.to_device(inputs[name], array, self.stream)
        layout = StagingLayout(self.num_layers, seq, batch, self.latent_dim, self.itemsize)
        staging = layout.views(self.buffers["staging"].reserve(layout.nbytes))
        logits_shape = (batch, host[LOGIT_POSITIONS].shape[1], self.vocab_size)
        logits = self.buffers[LOGITS].reserve(int(np.prod(logits_shape)) * self.logits_itemsize)
        shapes = {name: array.shape for name, array in host.items()}
        self._bind_step(context, inputs, shapes, past, staging, logits)
        if not context.execute_async_v3(self.stream):
            raise MoetrtError(f"TensorRT could not run the {profile} profile at these shapes (its log says why)")
        return self._logits(logits, logits_shape), staging

    def _bind_step(self, context: trt.IExecutionContext, inputs: dict[str, int], shapes: dict[str, tuple[int, ...]],
                   past: list[DeviceArray], staging: list[DeviceArray], logits: int) -> None:
        """Set every input shape and tensor address of one step, each checked, all 256-byte aligned."""
        past_names = [(past_latent(layer), rows) for layer, rows in enumerate(past)]
        new_names = [(new_latent(layer), rows) for layer, rows in enumerate(staging)]
        addresses = step_bindings(inputs, past_names, new_names, (LOGITS, logits))
        wrong = misaligned(addresses)
        if wrong:  # a bug here, not the user's: TensorRT would fail or read the wrong bytes
            raise AssertionError(f"tensor addresses not 256-byte aligned: {', '.join(wrong)}")
        for name, shape in (*shapes.items(), *((name, rows.shape) for name, rows in past_names)):
            if not context.set_input_shape(name, trt.Dims(list(shape))):
                raise MoetrtError(f"input {name} of shape {list(shape)} is outside the engine's profiles "
                                  "(rebuild with larger --max-batch / --max-seq / --max-context)")
        for name, pointer in addresses.items():
            if not context.set_tensor_address(name, pointer):
                raise MoetrtError(f"TensorRT refused the address of {name} (its log says why)")

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

    # -- decode steps as CUDA graphs ----------------------------------------------------------------------------

    def _decode(self, host: dict[str, npt.NDArray[np.int64]],
                past: list[DeviceArray]) -> tuple[npt.NDArray[np.float32], list[DeviceArray]]:
        batch, length = host[INPUT_IDS].shape[0], past[0].shape[0] if past else 0
        bucket = next((b for b in decode_buckets(self.max_context) if b >= length), None)
        if not past or bucket is None or any(rows.capacity < bucket * batch * self.latent_dim * self.itemsize
                                             for rows in past):
            return self._execute("decode", host, past)
        key = (batch, bucket, *(rows.pointer for rows in past))
        if key != self.graph_key:
            self._drop_graph()
            self.graph_key, self.graph = key, self._capture(batch, bucket, past)
        graph = self.graph
        if graph is None:  # capture failed for this key: plain execution until the key changes
            return self._execute_uncaptured(host, past)
        padded = {**host, ATTENTION_MASK: pad_mask(host[ATTENTION_MASK], bucket)}
        for name, array in padded.items():
            cuda.to_device(graph.inputs[name].pointer, array, self.stream)
        cuda.launch_graph(graph.graph_exec, self.stream)
        return self._logits(graph.logits.pointer, (batch, 1, self.vocab_size)), graph.rows

    def _capture(self, batch: int, bucket: int, past: list[DeviceArray]) -> DecodeGraph | None:
        """Bind fixed buffers at padded shapes, run once on a real-looking step (TensorRT finishes shape-dependent
        setup), capture. None when that fails, with CUDA's sticky error cleared."""
        context = self.contexts["decode"]
        warm_up = capture_inputs(batch, bucket)
        inputs = {name: DeviceBuffer(array.nbytes) for name, array in warm_up.items()}
        logits = DeviceBuffer(batch * self.vocab_size * self.logits_itemsize)
        layout = StagingLayout(self.num_layers, 1, batch, self.latent_dim, self.itemsize)
        staging = DeviceBuffer(layout.nbytes)
        rows = layout.views(staging.pointer)
        padded = [DeviceArray(view.pointer, (bucket, batch, self.latent_dim), self.itemsize, view.capacity)
                  for view in past]
        graph = graph_exec = 0
        try:
            for name, array in warm_up.items():
                cuda.to_device(inputs[name].pointer, array, self.stream)
            shapes = {name: array.shape for name, array in warm_up.items()}
            pointers = {name: buffer.pointer for name, buffer in inputs.items()}
            self._bind_step(context, pointers, shapes, padded, rows, logits.pointer)
            if not context.execute_async_v3(self.stream):
                raise cuda.CudaError("warm-up execution failed")
            cuda.synchronize(self.stream)
            graph = cuda.capture(self.stream, lambda: context.execute_async_v3(self.stream))
            graph_exec = cuda.instantiate(graph)
        except (cuda.CudaError, MoetrtError) as error:
            cuda.clear_error()  # as trtexec does: a failed capture leaves an error that the next launch would report
            note(f"decode step at batch {batch}, past {bucket}: no CUDA graph ({error}); running it directly")
            cuda.destroy_graph(graph, graph_exec)
            for buffer in (*inputs.values(), logits, staging):
                buffer.close()
            return None
        return DecodeGraph(graph, graph_exec, inputs, logits, staging, rows)

    def _execute_uncaptured(self, host: dict[str, npt.NDArray[np.int64]],
                            past: list[DeviceArray]) -> tuple[npt.NDArray[np.float32], list[DeviceArray]]:
        key = self.graph_key
        result = self._execute("decode", host, past)
        self.graph_key = key  # remember the failed capture, so the next step does not retry it
        return result

    def _drop_graph(self) -> None:
        if self.graph is not None:
            cuda.destroy_graph(self.graph.graph, self.graph.graph_exec)
            for buffer in self.graph.buffers():
                buffer.close()
        self.graph_key, self.graph = None, None

    def close(self) -> None:
        self._drop_graph()
        for buffer in self.buffers.values():
            buffer.close()
        self.contexts.clear()  # before their activation memory goes
        self.activations.close()
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
