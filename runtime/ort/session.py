"""ONNX Runtime session over an engine's offline-optimised graph (numpy in, numpy out, no torch).

The caller owns the latent cache: `past` arrays are bound as inputs by pointer and the new rows are
written by ONNX Runtime straight into caller-provided arrays (slices of the preallocated cache).

Engines built for moetrt's CPU expert kernel (`moe_kernel: moetrt` in the manifest) are a chain of segments
cut at the MoE layers' routed experts (export/ort/split.py). Where moetrt's onnxruntime op library compiles (and
the engine's kernel build has the entry point it calls), the main model's segments are joined at load into one
graph with the expert layers as `moetrt.ort::Experts` nodes (runtime/ort/fused.py): one session run per call.
Otherwise (or with MOETRT_SEGMENTED=1) each call runs segment 0, the kernel on its outputs, segment 1, and so on
(each expert layer after the segment that makes its inputs). An --mtp engine's module has segments of its own,
after the main model's, that a call on which the module runs on no position skips. Values pass between segments
as ONNX Runtime's own buffers, and to the kernel by address, so nothing is copied. Under expert parallelism
(runtime/parallel) the session runs segment by segment and holds an ExpertGroup: it reads only this rank's experts,
gives the kernel their positions (-1 for the other ranks' pairs) and sums the ranks' outputs after each MoE layer.
The segments' sessions stop their threads spinning when a run returns (`session.force_spinning_stop`); otherwise
they would hold the cores the kernel's threads need. They also share one memory arena (`shared_cpu_arena`): with
an arena per segment each kept its own largest activations (a Moonlight-shaped int4 engine, 27 segments: 3.2 GB
more anonymous memory after one 512-token prompt, 1.0 GB shared).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

from moetrt.errors import MoetrtError
from moetrt.progress import note
from moetrt.runtime.kv_cache import LatentKVCache
from moetrt.formats import (DRAFT_IDS, DRAFT_POSITIONS, HOST_INPUTS, LOGITS, MTP_ATTENTION_MASK, MTP_INPUT_IDS,
                            EngineManifest, OrtSection, new_latent, past_latent)

# A directory: every session an engine opens records onnxruntime's profile (per-node kernel times), written there as
# JSON by `OrtSession.end_profiling` (what `python -m moetrt.bench.step_profile` reads).
PROFILE_ENV = "MOETRT_ORT_PROFILE"

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
KERNEL_INPUT_TYPES = ("tensor(float)", "tensor(int32)", "tensor(float)")  # hidden, topk_ids, topk_weights


class Graph:
    """One InferenceSession, run through onnxruntime's pybind layer (`onnxruntime.capi`'s SessionIOBinding and
    OrtValue) rather than its Python wrappers, whose per-call bookkeeping (device lookups, validation, an OrtValue
    wrapper per output) ran for every binding: 15-25 us per run saved (tiny-r1's graph, 421 -> 407 us; a ds-mini
    step makes 8 runs, bench/NOTES.md). The calls are the ones the wrappers make (onnxruntime 1.32's
    onnxruntime_inference_collection.py, the minor release pyproject.toml holds). `device`: where outputs not
    given a buffer are allocated ("cpu" or "cuda")."""

    def __init__(self, session: ort.InferenceSession, device: str):
        self.session = session
        self._c_session = session._sess
        self._output_device = ort.OrtDevice.make(device, 0)._get_c_device()
        self._host = ort.OrtDevice.make("cpu", 0)._get_c_device()

    def run(self, inputs: list[tuple[str, "np.ndarray | ort_c.OrtValue"]],
            outputs: list[tuple[str, np.ndarray | None]]) -> list:
        """Run with `inputs` (numpy arrays, bound by address, or onnxruntime OrtValues from an earlier run) and
        `outputs` (name, a C-contiguous array to write into, or None for one onnxruntime allocates on the
        session's device). Returns the outputs as pybind OrtValues (`.numpy()`, `.shape()`, `.data_ptr()`), in
        order. The arrays must stay alive until this returns (the caller holds them)."""
        binding = ort_c.SessionIOBinding(self._c_session)
        for name, value in inputs:
            if isinstance(value, np.ndarray):
                binding.bind_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name, into in outputs:
            if into is None:
                binding.bind_output(name, self._output_device)
            else:
                binding.bind_output(name, self._host, into.dtype, list(into.shape), into.ctypes.data)
        self._c_session.run_with_iobinding(binding, None)
        values = binding.get_outputs()
        return [values[index] for index in range(len(values))]


@dataclass
class Segment:
    graph: Graph
    inputs: list[str]
    outputs: list[str]
    draft_only: bool = False  # the MTP module's: skipped on calls where it runs on no position
    then: list[int] | None = None  # the expert layers that run after this segment (they read its outputs)

    @property
    def session(self) -> ort.InferenceSession:
        return self.graph.session


@dataclass
class KernelLayer:
    kernel: object  # moetrt.plugins.cpu_experts.CpuExperts
    inputs: list[str]  # hidden [T, H], topk_ids [T, k], topk_weights [T, k]
    output: str


class OrtSession:
    backend = "ort"

    def __init__(self, manifest: EngineManifest, threads: int | None = None, expert_group=None):
        if manifest.dtype not in NUMPY_DTYPES:
            raise MoetrtError(f"ONNX Runtime sessions run float32 or float16 engines, not {manifest.dtype}")
        config = manifest.model_config
        self.num_layers = config.num_hidden_layers
        self.mtp_layers = manifest.io.mtp_layers  # 1: the graph runs the MTP module too (its latent layer is last)
        self.latent_dim = config.latent_dim
        self.vocab_size = config.vocab_size
        self.dtype = np.dtype(NUMPY_DTYPES[manifest.dtype])
        section = manifest.section
        assert isinstance(section, OrtSection)
        ort.disable_telemetry_events()  # usage telemetry (Windows builds' ETW events): off
        self._profiled = bool(os.environ.get(PROFILE_ENV))  # read by _session_options for every session below
        options = _session_options(section, threads)
        providers = [section.provider] + (["CPUExecutionProvider"] if section.provider != "CPUExecutionProvider" else [])
        self._device = "cuda" if section.provider == "CUDAExecutionProvider" else "cpu"
        self._segments: list[Segment] = []
        self._experts: list[KernelLayer] = []
        self._kernel_description = "none"
        self._constants: dict[str, np.ndarray] = {}  # inputs every run binds (the joined graph's kernel parameters)
        self.group = expert_group
        if expert_group is not None and self.mtp_layers:
            raise MoetrtError("--expert-parallel runs engines without the multi-token-prediction module; rebuild "
                              "this one without --mtp")
        if expert_group is not None and not section.segmented:
            raise MoetrtError("--expert-parallel runs engines whose routed experts are moetrt's CPU kernel; this one "
                              "runs them inside onnxruntime: rebuild it with `--moe-kernel moetrt`")
        if section.segmented:
            library, description = _kernel_library(manifest, section)
            note(f"experts: moetrt's CPU kernel, {description}")
            joined = None
            if expert_group is None and section.provider == "CPUExecutionProvider":
                joined = _join(manifest, section, _session_options(section, threads), providers, library)
            if joined is not None:
                graph, joined_graph = joined
                self._segments.append(Segment(Graph(graph, self._device), list(joined_graph.inputs),
                                              list(joined_graph.outputs)))
            for segment in section.segments:
                if joined is not None and not segment.draft_only:
                    continue
                session = _open_graph(manifest, segment.model, options, providers)
                self._segments.append(Segment(Graph(session, self._device), list(segment.inputs),
                                              list(segment.outputs), segment.draft_only))
            self._experts = _load_experts(manifest, section, self._segments, threads, library, expert_group,
                                          joined_graph.layers if joined is not None else ())
            self._kernel_description = description
            if joined is not None:
                from moetrt.plugins.ort_ops import kernel_params
                from moetrt.runtime.ort.fused import kernel_input

                self._constants = {kernel_input(index): kernel_params(self._experts[index].kernel)
                                   for index in joined_graph.layers}
                self._kernel_description += "; in the onnxruntime graph (one session run per step)"
        else:
            self._graph = Graph(_open_graph(manifest, section.model, options, providers), self._device)
        # What must match across expert-parallel ranks for their routing to agree bit for bit (runtime/parallel).
        experts = manifest.artifacts.get(section.experts_file or "")
        self.fingerprint = "; ".join((f"onnxruntime {ort.__version__}", f"threads {threads or 'default'}",
                                      f"kernel {self._kernel_description.split(' (')[0]}",
                                      f"experts.bin {experts.sha256[:12] if experts else 'none'}"))

    def sessions(self) -> list[ort.InferenceSession]:
        """The onnxruntime sessions this engine runs: one graph, the joined graph (and an --mtp engine's module
        segments), or one per segment."""
        return [segment.session for segment in self._segments] if self._segments else [self._graph.session]

    def end_profiling(self) -> list[str]:
        """With MOETRT_ORT_PROFILE set when the engine loaded: stop each session's profiler and return the JSON
        trace files it wrote (onnxruntime's format: `model_run` events and a `<node>_kernel_time` event per node
        run, times in microseconds), in `sessions()` order. Raises MoetrtError when the engine was loaded without
        it."""
        if not self._profiled:
            raise MoetrtError(f"the engine's sessions were not profiled: set {PROFILE_ENV}=DIR before loading it")
        return [session.end_profiling() for session in self.sessions()]

    def new_cache(self, slots: int, max_context: int) -> LatentKVCache:
        """The host cache: one layer per decoder layer, plus the MTP module's (with its own mask) on an --mtp
        engine."""
        return LatentKVCache(self.num_layers + self.mtp_layers, self.latent_dim, slots, max_context, self.dtype,
                             draft_mask=bool(self.mtp_layers))

    def run(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        attention_mask: np.ndarray,
        logit_positions: np.ndarray,
        past: list[np.ndarray],
        new_rows: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call. ids/positions `[B, S]`, mask `[B, P+S]`, logit_positions `[B, N]` (all int64),
        past per layer `[P, B, D]` (C-contiguous). New rows go into `new_rows` (`[S, B, D]` each) when given.
        Returns logits `[B, N, vocab]` and the new rows. On an --mtp engine the lists include the MTP module's
        layer (last): this plain call skips the module and zeroes that layer's new rows.
        """
        logits, rows, _ = self._call(input_ids, position_ids, attention_mask, logit_positions, past, new_rows)
        return logits, rows

    def run_speculative(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        attention_mask: np.ndarray,
        logit_positions: np.ndarray,
        past: list[np.ndarray],
        new_rows: list[np.ndarray],
        mtp_input_ids: np.ndarray,
        mtp_attention_mask: np.ndarray,
        draft_positions: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`run` on an --mtp engine with the MTP module's inputs (formats.py), which runs on the first M positions:
        mtp_input_ids `[B, M]` int64 (-1 where the main model's greedy pick at that logit position is to be used),
        mtp_attention_mask `[B, P+M]`, draft_positions `[B, N']` (< M). The MTP layer's new rows go into the
        first M rows of `new_rows[-1]`; with M < S the rest are zeroed. Returns logits `[B, N, vocab]` and the
        draft token ids `[B, N']` int64 (the MTP module's greedy prediction of the token after next)."""
        if not self.mtp_layers:
            raise MoetrtError("this engine has no multi-token-prediction module; rebuild it with --mtp")
        logits, _, drafts = self._call(input_ids, position_ids, attention_mask, logit_positions, past, new_rows,
                                       (mtp_input_ids, mtp_attention_mask, draft_positions))
        return logits, drafts

    def _call(self, input_ids, position_ids, attention_mask, logit_positions, past, new_rows, mtp=None):
        host = [np.ascontiguousarray(array, dtype=np.int64)
                for array in (input_ids, position_ids, attention_mask, logit_positions)]
        inputs = dict(zip(HOST_INPUTS, host))
        steps = 0
        if self.mtp_layers:
            batch, past_len = host[0].shape[0], host[2].shape[1] - host[0].shape[1]
            if mtp is None:  # a plain call: the module is skipped (it runs on 0 positions)
                empty = np.zeros((batch, 0), dtype=np.int64)
                mtp = (empty, host[2][:, :past_len], empty)
            for name, array in zip((MTP_INPUT_IDS, MTP_ATTENTION_MASK, DRAFT_POSITIONS), mtp):
                inputs[name] = np.ascontiguousarray(array, dtype=np.int64)
            steps = inputs[MTP_INPUT_IDS].shape[1]
            if new_rows is not None:
                new_rows = list(new_rows)
                new_rows[-1][steps:] = 0  # rows the module did not compute stay finite
                new_rows[-1] = new_rows[-1][:steps]
        if self._segments:
            return self._run_segments(inputs, past, new_rows, drafting=steps > 0)
        bound = [*inputs.items(), *((past_latent(layer), array) for layer, array in enumerate(past))]
        layers = self.num_layers + self.mtp_layers
        outputs: list[tuple[str, np.ndarray | None]] = [(LOGITS, None)]
        for layer in range(layers):  # (an empty view has no memory to bind)
            into = new_rows[layer] if new_rows is not None and new_rows[layer].size else None
            outputs.append((new_latent(layer), into))
        if self.mtp_layers:
            outputs.append((DRAFT_IDS, None))
        values = self._graph.run(bound, outputs)
        logits = values[0].numpy()
        rows = new_rows if new_rows is not None else [value.numpy() for value in values[1: 1 + layers]]
        return logits, rows, (values[1 + layers].numpy() if self.mtp_layers else None)

    def _run_segments(self, inputs, past, new_rows, drafting: bool):
        """The segments in order, each expert layer after the segment that makes its inputs. Without `drafting`
        (the MTP module runs on no position) the module's own segments are skipped: its latent rows are empty
        and no drafts come back."""
        values: dict[str, np.ndarray | ort_c.OrtValue] = dict(inputs)
        values.update(self._constants)
        values.update({past_latent(layer): array for layer, array in enumerate(past)})
        into = ({new_latent(layer): out for layer, out in enumerate(new_rows) if out.size}
                if new_rows is not None else {})
        for segment in self._segments:
            if segment.draft_only and not drafting:
                continue
            got = segment.graph.run([(name, values[name]) for name in segment.inputs],
                                    [(name, into.get(name)) for name in segment.outputs])
            values.update(zip(segment.outputs, got))
            for index in segment.then or ():
                layer = self._experts[index]
                hidden, ids, weights = (values[name] for name in layer.inputs)
                tokens, top_k = ids.shape()
                out = np.empty(hidden.shape(), np.float32)
                if self.group is None:
                    layer.kernel.run_pointers(hidden.data_ptr(), ids.data_ptr(), weights.data_ptr(),
                                              out.ctypes.data, tokens, top_k)
                else:
                    routed = ids.numpy()
                    local = self.group.local_ids(index, routed)
                    layer.kernel.run_pointers(hidden.data_ptr(), local.ctypes.data, weights.data_ptr(),
                                              out.ctypes.data, tokens, top_k)
                    self.group.combine(index, out, routed)
                values[layer.output] = out
        logits = values[LOGITS].numpy()
        batch = logits.shape[0]
        drafts = None
        if self.mtp_layers:  # a skipped module (no position to run on) proposes no draft
            drafts = values[DRAFT_IDS].numpy() if DRAFT_IDS in values else np.zeros((batch, 0), np.int64)
        if new_rows is not None:
            return logits, new_rows, drafts
        layers = self.num_layers + self.mtp_layers
        empty = np.zeros((0, batch, self.latent_dim), self.dtype)  # nor latent rows
        return logits, [values[name].numpy() if (name := new_latent(layer)) in values else empty
                        for layer in range(layers)], drafts


_SHARED_ARENA = False


def shared_cpu_arena() -> None:
    """Register one CPU arena allocator with onnxruntime's process-wide environment (once per process), for the
    sessions that opt in with the session config entry `session.use_env_allocators` (onnxruntime's documented way
    to share an allocator between sessions: include/onnxruntime/core/session/onnxruntime_c_api.h,
    CreateAndRegisterAllocator). The arena grows by what each request needs (arena_extend_strategy 1,
    kSameAsRequested) rather than doubling, and like every onnxruntime arena it keeps what it grew to."""
    global _SHARED_ARENA
    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    _SHARED_ARENA = True


def load_optimization_level(section: OrtSection) -> ort.GraphOptimizationLevel:
    """A graph saved at level "extended" gets the hardware-specific rest (layout passes for this CPU) at load; one
    saved at "all" (engines from before) is already complete."""
    if section.optimization_level == "extended":
        return ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


# What onnxruntime raises for a file it cannot load (its pybind exceptions derive from Exception only).
LOAD_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in (
    "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "NotImplemented",
    "RuntimeException"))


def _open_graph(manifest: EngineManifest, name: str | None, options: ort.SessionOptions,
                providers: list[str]) -> ort.InferenceSession:
    """An InferenceSession on the engine's graph file `name`; MoetrtError naming the file when onnxruntime cannot
    load it (replaced or damaged bytes that kept their size, which the load-time checks do not hash)."""
    assert name is not None
    try:
        return ort.InferenceSession(str(manifest.path(name)), options, providers=providers)
    except LOAD_ERRORS as error:
        reason = " ".join(str(error).split())
        raise MoetrtError(f"onnxruntime cannot load the engine's {name} ({reason}): the file is damaged or was "
                          f"replaced; rebuild the engine (`moetrt verify {manifest.directory} --integrity` names "
                          "every changed file)") from None


def _span(data: np.ndarray, span, bits: int) -> np.ndarray:
    """`span.count` elements from byte `span.offset` of experts.bin: float32 values (bits 32) or packed bytes.
    Raises MoetrtError for a span past the file's end (a truncated file the size check missed)."""
    itemsize = 4 if bits == 32 else 1
    if span.offset % itemsize or span.offset + span.count * itemsize > data.size:
        raise MoetrtError("experts.bin is shorter than the manifest's expert layers say; rebuild the engine")
    view = data[span.offset: span.offset + span.count * itemsize]
    return view.view(np.float32) if bits == 32 else view


def _read_local_experts(file, span, layer, experts: np.ndarray) -> np.ndarray:
    """The packed weights of `experts` (ids, ascending) within `span` of experts.bin, read into one private
    contiguous array in that order (each expert's bytes are contiguous, span bytes / num_experts long): float32
    for bits 32, else uint8. Raises MoetrtError for a file shorter than the manifest says."""
    itemsize = 4 if layer.bits == 32 else 1
    per_expert = span.count * itemsize // layer.num_experts
    out = np.empty(len(experts) * per_expert, dtype=np.uint8)
    for position, expert in enumerate(experts):
        file.seek(span.offset + int(expert) * per_expert)
        if file.readinto(memoryview(out)[position * per_expert: (position + 1) * per_expert]) != per_expert:
            raise MoetrtError("experts.bin is shorter than the manifest's expert layers say; rebuild the engine")
    return out.view(np.float32) if layer.bits == 32 else out


def _session_options(section: OrtSection, threads: int | None) -> ort.SessionOptions:
    """Options for a session on `section`'s graphs: its load-time optimisation level, `threads` intra-op threads
    (None: onnxruntime's default). A segmented engine's sessions stop their threads spinning when a run returns and
    share one CPU arena (the module docstring says why)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = load_optimization_level(section)
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    profile = os.environ.get(PROFILE_ENV)
    if profile:  # onnxruntime's own profiler: one JSON trace per session, written when `end_profiling` is called
        os.makedirs(profile, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile, "onnxruntime")
    if section.segmented:
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if section.provider == "CPUExecutionProvider":
            shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def _kernel_library(manifest: EngineManifest, section: OrtSection):
    """The build of moetrt's CPU expert kernel this machine runs for the engine (ctypes library) and which one it
    is (KernelChoice.description). Raises MoetrtError when none can run here or a carried build is damaged."""
    from moetrt.plugins.cpu_experts import expert_kernel, load_library, native_library

    choice = expert_kernel(section.kernels, manifest.directory)
    if choice.path is None:
        return native_library(), choice.description
    record = manifest.artifacts[choice.path.relative_to(manifest.directory).as_posix()]
    # damaged code would crash the process when run: hash it before the loader maps it
    return load_library(choice.path, record.sha256,
                        fix=f"rebuild the engine (`moetrt verify {manifest.directory} --integrity` names every "
                            "changed file)"), choice.description


def _join(manifest: EngineManifest, section: OrtSection, options: ort.SessionOptions, providers: list[str],
          library):
    """The main model's segments and expert layers as one session (runtime/ort/fused.py) opened with `options`,
    with the JoinedGraph it runs; None, with a note saying why, when the op library is unavailable here or the
    engine's kernel build predates it (the engine then runs segment by segment). Raises MoetrtError when the
    engine's own op library is damaged, or onnxruntime cannot load the joined graph."""
    from moetrt.plugins import ort_ops
    from moetrt.runtime.ort.fused import join_segments, segment_named

    if not any(not segment.draft_only for segment in section.segments):
        return None
    record = manifest.artifacts.get(ort_ops.CARRIED)
    reason = ort_ops.segmented_reason(hasattr(library, "moetrt_experts_on"), carried=record is not None)
    if record is not None and not ort_ops.disabled():
        # code the loader would run, like the kernel: a damaged copy is refused, not worked around
        op_library = ort_ops.library(manifest.path(ort_ops.CARRIED), record.sha256,
                                     fix=f"rebuild the engine (`moetrt verify {manifest.directory} --integrity` "
                                         "names every changed file)")
    elif reason is None:
        try:
            op_library = ort_ops.library()
        except MoetrtError as error:
            reason = str(error)
    if reason is not None:
        note(f"experts: one onnxruntime run per segment, the kernel called between them ({reason})")
        return None
    joined = join_segments(manifest, section, ort_ops.DOMAIN, ort_ops.OP)
    options.register_custom_ops_library(str(op_library))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(manifest.directory))
    try:
        session = ort.InferenceSession(joined.model, options, providers=providers)
    except LOAD_ERRORS as error:
        reason = " ".join(str(error).split())
        named = segment_named(reason, section)
        raise MoetrtError(f"onnxruntime cannot load the engine's {named or 'segments'} as one graph ({reason}): "
                          f"{'the file' if named else 'a file'} is damaged or was replaced; rebuild the engine "
                          f"(`moetrt verify {manifest.directory} --integrity` names every changed file)") from None
    note(f"experts: inside one onnxruntime graph with the main model's segments ({len(joined.layers)} expert "
         "layers as moetrt's onnxruntime op; one session run per call)")
    return session, joined


def _attach(index: int, layer, segments: list[Segment]) -> None:
    """Run expert layer `index` after the one segment that makes its inputs, checking their types. Raises
    MoetrtError when no single segment makes them or their types are not the kernel's (a damaged engine)."""
    after = [segment for segment in segments if layer.inputs[0] in segment.outputs]
    if len(after) != 1:
        raise MoetrtError(f"no single engine segment gives expert layer {index}'s input {layer.inputs[0]}; "
                          "rebuild the engine")
    after[0].then = [*(after[0].then or ()), index]
    produced = {arg.name: arg.type for arg in after[0].session.get_outputs()}
    for name, wanted in zip(layer.inputs, KERNEL_INPUT_TYPES):
        if produced.get(name) != wanted:
            raise MoetrtError(f"engine segment {segments.index(after[0])} gives {name} as {produced.get(name)}, the "
                              f"expert kernel takes {wanted}; rebuild the engine")


def _load_experts(manifest: EngineManifest, section: OrtSection, segments: list[Segment],
                  threads: int | None, library, group=None, joined: tuple[int, ...] = ()) -> list[KernelLayer]:
    """Map experts.bin read-only (processes serving the same engine share it through the page cache) and fault
    it in now, so the first calls do not pay for it; one kernel per MoE layer. (Reading it into private,
    huge-page-backed memory instead streamed no faster: ds-mini, 0.97 vs 0.98 ms per layer at batch 1.) With an
    expert-parallel `group`, only this rank's experts are read, into private memory (nothing is mapped: the page
    cache's large folios would make a mapping resident 2 MB at a time, other ranks' small experts included), and
    each kernel holds just those (the group turns expert ids into positions among them). `library`: the kernel
    build to run (`_kernel_library`). The layers in `joined` run inside the joined graph (its first segment): they
    are not attached to a segment. Returns the kernels, one per expert layer."""
    from moetrt.plugins.cpu_experts import CpuExperts

    assert section.experts_file is not None
    if group is None:
        with open(manifest.path(section.experts_file), "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_WILLNEED)
        data = np.frombuffer(mapped, dtype=np.uint8)
        data[:: mmap.PAGESIZE].sum()  # touch every page
    else:
        group.place([layer.num_experts for layer in section.expert_layers])
        local = {}
        with open(manifest.path(section.experts_file), "rb", buffering=0) as f:
            for index, layer in enumerate(section.expert_layers):
                experts = group.local_experts(index)
                local[index] = (len(experts), *(_read_local_experts(f, span, layer, experts)
                                                for span in (layer.gate_up, layer.down)))
    layers = []
    for index, layer in enumerate(section.expert_layers):
        if index not in joined:  # (a joined layer is a node of the joined graph, which onnxruntime type-checks)
            _attach(index, layer, segments)
        if group is None:
            count = layer.num_experts
            gate_up, down = (_span(data, span, layer.bits) for span in (layer.gate_up, layer.down))
        else:
            count, gate_up, down = local[index]
        kernel = CpuExperts(gate_up, down, count, layer.hidden_size, layer.intermediate_size,
                            layer.slices, threads, library, bits=layer.bits, group_size=layer.group_size)
        layers.append(KernelLayer(kernel, list(layer.inputs), layer.output))
    return layers
