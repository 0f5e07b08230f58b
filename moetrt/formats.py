"""The on-disk formats, typed: an export's `export.json` and an engine's `manifest.json`, and the graph's I/O names.

This is the only module that knows their JSON keys. Each format is a frozen dataclass with one reader
(`read_export_info`, `read_manifest`: a damaged or foreign file is one MoetrtError naming the field and the fix)
and one writer (`write_export_info`, `write_manifest`). Backend-specific parts of a manifest are sections
(`OrtSection`, `TrtSection`), stored under the backend's name and registered in `SECTIONS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, TypeVar, Union

from moetrt.atomic import write_json
from moetrt.config import ModelConfig
from moetrt.errors import MoetrtError
from moetrt.jsonfile import read_json_object
from moetrt.settings import BuildProfile

# -- files ------------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
EXPORT_JSON = "export.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PLAN_FILE = "model.plan"
EXPERTS_FILE = "experts.bin"
# A file a description names, relative to the directory it sits in. The readers refuse an absolute name, a `..`
# component, or a symlink that leads out of the directory, before anything opens the file.
FileName = Annotated[str, "a file inside the described directory"]
# Files that make an export (and later an engine) self-sufficient for serving.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")

ENGINE_FORMAT = "moetrt-engine"
# 3: typed sections (`ort.layout` says graph or segments); 1 and 2 were written before, and are refused.
ENGINE_FORMAT_VERSION = 3
EXPORT_FORMAT = "moetrt-export"
EXPORT_FORMAT_VERSION = 2
ROUTING_FORMAT = "moetrt-routing-counts"
ROUTING_FORMAT_VERSION = 1

# -- the decoder graph's inputs and outputs (export/onnx_export.py documents the interface) ------------------------

INPUT_IDS = "input_ids"  # [batch, seq] int64
POSITION_IDS = "position_ids"  # [batch, seq] int64, per row
ATTENTION_MASK = "attention_mask"  # [batch, past_len + seq] int64, 1 for real tokens
LOGIT_POSITIONS = "logit_positions"  # [batch, n_logits] int64, positions in seq that get logits
HOST_INPUTS = (INPUT_IDS, POSITION_IDS, ATTENTION_MASK, LOGIT_POSITIONS)
LOGITS = "logits"  # [batch, n_logits, vocab]
PAST_LATENT_PREFIX = "past_latent."  # + layer: [past_len, batch, latent_dim], the cache so far
NEW_LATENT_PREFIX = "new_latent."  # + layer: [seq, batch, latent_dim], the rows this call adds


def past_latent(layer: int) -> str:
    return f"{PAST_LATENT_PREFIX}{layer}"


def new_latent(layer: int) -> str:
    return f"{NEW_LATENT_PREFIX}{layer}"


# A speculative graph (an engine built with --mtp) also runs DeepSeek-V3's multi-token-prediction module, whose
# latent rows are layer `num_layers` (past_latent.<L>, new_latent.<L>) with their own mask.
# The module runs on the call's first `mtp_seq` positions (0: skipped, S: all).
MTP_INPUT_IDS = "mtp_input_ids"  # [batch, mtp_seq] int64: the token after each position, -1: the main model's pick
MTP_ATTENTION_MASK = "mtp_attention_mask"  # [batch, mtp_total_len] int64: the MTP module's valid rows
DRAFT_POSITIONS = "draft_positions"  # [batch, n_drafts] int64: which of the mtp_seq positions propose a draft
DRAFT_IDS = "draft_ids"  # [batch, n_drafts] int64: the MTP module's greedy draft at each draft position


def graph_input_names(num_layers: int, mtp_layers: int = 0) -> list[str]:
    names = [*HOST_INPUTS, *(past_latent(i) for i in range(num_layers))]
    if mtp_layers:
        names += [MTP_INPUT_IDS, MTP_ATTENTION_MASK, DRAFT_POSITIONS, past_latent(num_layers)]
    return names


def graph_output_names(num_layers: int, mtp_layers: int = 0) -> list[str]:
    names = [LOGITS, *(new_latent(i) for i in range(num_layers))]
    if mtp_layers:
        names += [new_latent(num_layers), DRAFT_IDS]
    return names


@dataclasses.dataclass(frozen=True)
class TensorIO:
    """One graph input or output: symbolic dims are names (batch, seq, past_len, total_len, n_logits)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The MLA latent cache the graph reads and extends: per layer `[past_len, batch, latent_dim]`, a row being
    [RMSNorm(compressed kv) (kv_lora_rank) | RoPE'd shared key (rope_dim)]; the graph returns only the new rows."""

    num_layers: int
    latent_dim: int
    kv_lora_rank: int
    rope_dim: int
    layout: str = "position-major [past_len, batch, latent_dim] per layer"


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """The graph's inputs and outputs. `mtp_layers`: 1 when the graph also runs the multi-token-prediction module
    (a speculative graph: MTP_INPUT_IDS, MTP_ATTENTION_MASK, DRAFT_POSITIONS and its latent layer in, its rows
    `[mtp_seq, batch, latent_dim]` and DRAFT_IDS out),
    else 0."""

    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    cache: CacheLayout
    mtp_layers: int = 0


def graph_io(config: ModelConfig, dtype: str, mtp_layers: int = 0) -> GraphIO:
    """The decoder graph's inputs and outputs for `config` at activation `dtype`, with symbolic shapes."""
    layers = range(config.num_hidden_layers + mtp_layers)
    ids = ("batch", "seq")
    mtp_inputs = (TensorIO(MTP_INPUT_IDS, "int64", ("batch", "mtp_seq")),
                  TensorIO(MTP_ATTENTION_MASK, "int64", ("batch", "mtp_total_len")),
                  TensorIO(DRAFT_POSITIONS, "int64", ("batch", "n_drafts")))
    latent_in = [TensorIO(past_latent(i), dtype, ("past_len", "batch", config.latent_dim)) for i in layers]
    latent_out = [TensorIO(new_latent(i), dtype, ("seq", "batch", config.latent_dim)) for i in layers]
    inputs = [TensorIO(INPUT_IDS, "int64", ids), TensorIO(POSITION_IDS, "int64", ids),
              TensorIO(ATTENTION_MASK, "int64", ("batch", "total_len")),
              TensorIO(LOGIT_POSITIONS, "int64", ("batch", "n_logits")), *latent_in]
    outputs = [TensorIO(LOGITS, dtype, ("batch", "n_logits", config.vocab_size)), *latent_out]
    if mtp_layers:
        inputs[-1:-1] = mtp_inputs  # graph_input_names' order: the MTP inputs, then the MTP module's latent layer
        outputs[-1] = TensorIO(new_latent(config.num_hidden_layers), dtype, ("mtp_seq", "batch", config.latent_dim))
        outputs.append(TensorIO(DRAFT_IDS, "int64", ("batch", "n_drafts")))
    return GraphIO(
        inputs=tuple(inputs), outputs=tuple(outputs),
        cache=CacheLayout(config.num_hidden_layers, config.latent_dim, config.kv_lora_rank, config.qk_rope_head_dim),
        mtp_layers=mtp_layers,
    )


# -- export.json --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeRef:
    """The custom node an export carries (plugins/spec.py), by name and version."""

    op_type: str
    domain: str
    version: int


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How an export's (and its engine's) weights are quantized, in the field's terms (moetrt/quantization.py has
    the rules): weight-only, symmetric (no zero points), `bits` 8 or 4, one `scale_dtype` scale per `group_size`
    input channels of a row. `tensors`: the tensor kinds quantized at `bits`; `kept`: kinds left in the engine's
    dtype."""

    scheme: str
    bits: int
    group_size: int
    symmetric: bool = True
    scale_dtype: str = "float16"
    tensors: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CheckpointFingerprint:
    """The checkpoint an export or engine was built from (export/checkpoint.py checkpoint_fingerprint): how many
    tensors and weight bytes, and a sha256 over the tensors' names, dtypes, shapes and bytes (all of them when
    `whole`, else samples of each tensor)."""

    tensors: int
    weight_bytes: int
    whole: bool
    sha256: str


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """An export directory's description: what was traced and how it was lowered.

    target: "ort", "trt" or "onnx" (standard ops). moe_kernel (ort only): "onnxruntime" or "moetrt", else "none".
    expert_slices: sub-experts per expert the ort lowering cut (1 elsewhere). quantization: None for weights in
    `dtype`, else how they are quantized."""

    target: str
    dtype: str
    opset: int
    source: str
    tokenizer: bool
    io: GraphIO
    node: NodeRef
    model_config: ModelConfig
    versions: dict[str, str]
    expert_slices: int = 1
    moe_kernel: str = "none"
    model_file: FileName = MODEL_FILE
    external_data: FileName = DATA_FILE
    quantization: Quantization | None = None
    checkpoint: CheckpointFingerprint | None = None  # None: exported by a moetrt that did not record it


# -- manifest.json ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Artifact:
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Span:
    """`count` elements from byte `offset` of a file: float32 values for a float32 layer, bytes for a quantized one
    (ExpertLayer.bits)."""

    offset: int
    count: int


@dataclasses.dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer's routed experts in experts.bin, packed for moetrt's CPU kernel (plugins/cpu_experts.py).
    inputs: the segment outputs it reads (hidden [T, H] float32, topk_ids [T, k] int32, topk_weights [T, k]
    float32); output: the value name the next segment reads ([T, H]). bits: 32 for float32 weights, 8 or 4 for
    quantized ones with one float16 scale per `group_size` input channels (packed by cpu_experts.pack_quantized)."""

    inputs: tuple[str, ...]
    output: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    slices: int
    gate_up: Span
    down: Span
    bits: int = 32
    group_size: int = 0


@dataclasses.dataclass(frozen=True)
class OrtSegment:
    """One graph segment of an engine cut around moetrt's expert kernel (export/ort/split.py): its graph file, the
    values it reads and the values it passes on. `draft_only`: a segment of an --mtp engine's multi-token-prediction
    module, run only on calls where the module drafts."""

    model: FileName
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    draft_only: bool = False


@dataclasses.dataclass(frozen=True)
class CpuKernel:
    """moetrt's CPU expert kernel compiled for one instruction-set level (plugins/cpu_experts.py TARGETS) and
    carried in the engine: `file` relative to the engine directory; `cpu_flags` what /proc/cpuinfo must show
    for this CPU to run it."""

    target: str
    file: FileName
    cpu_flags: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OrtSection:
    """An ONNX Runtime engine: one optimised graph (`layout="graph"`: `model` + `external_data`), or segments cut
    at the routed experts with moetrt's CPU kernel between them (`layout="segments"`: `segments`, `experts_file`,
    `expert_layers`, and `kernels`, best first). The saved graph is tied to the package's major.minor version,
    the provider and the CPU architecture; `cpu_flags` are the instruction sets it depends on (none at
    optimization level "extended": the hardware-specific passes run at load)."""

    package: str
    provider: str
    optimization_level: str
    cpu_arch: str
    cpu_flags: tuple[str, ...]
    moe_kernel: str
    expert_slices: int
    layout: str
    model: FileName | None = None
    external_data: FileName | None = None
    segments: tuple[OrtSegment, ...] = ()
    experts_file: FileName | None = None
    expert_layers: tuple[ExpertLayer, ...] = ()
    gpu_compute_capability: tuple[int, ...] | None = None
    kernels: tuple[CpuKernel, ...] = ()

    def __post_init__(self) -> None:
        if self.layout == "graph" and self.model is None:
            raise MoetrtError("the ort section's layout is 'graph' but it names no model")
        # the main model's segments have one expert layer between each two; the MTP module's, one between its two
        module = 1 if self.draft_segments else 0
        if self.layout == "segments" and (self.experts_file is None
                                          or len(self.segments) != len(self.expert_layers) + 1 + module):
            raise MoetrtError(f"the ort section's layout is 'segments' but it has {len(self.segments)} segments "
                              f"({'with' if module else 'without'} an MTP module's), "
                              f"{len(self.expert_layers)} expert layers and experts file {self.experts_file!r}")
        if self.layout not in ("graph", "segments"):
            raise MoetrtError(f"the ort section's layout is {self.layout!r}, not 'graph' or 'segments'")

    @property
    def segmented(self) -> bool:
        return self.layout == "segments"

    @property
    def draft_segments(self) -> int:
        """How many segments are the MTP module's (`draft_only`): 2 in a segmented --mtp engine, else 0."""
        return sum(segment.draft_only for segment in self.segments)


@dataclasses.dataclass(frozen=True)
class TrtProfile:
    """One optimization profile: per graph input its (min, opt, max) dims."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], ...]]


@dataclasses.dataclass(frozen=True)
class TrtSection:
    """A TensorRT engine: the plan, the TensorRT version and GPU it was built for, the plugin form."""

    plan: FileName
    version: str
    gpu: str
    compute_capability: tuple[int, ...]
    plugin_form: str
    python_at_runtime: bool
    strongly_typed: bool
    optimization_level: int
    profiles: tuple[TrtProfile, ...]


Section = Union[OrtSection, TrtSection]
# Backend name -> its manifest section, stored under that name.
SECTIONS: dict[str, type[Any]] = {"ort": OrtSection, "trt": TrtSection}


@dataclasses.dataclass(frozen=True)
class EngineManifest:
    """An engine directory's `manifest.json`: what was built, from what, for which machine, and its artifacts.

    `section` is the backend's own part (OrtSection or TrtSection); `directory` is where it was read from
    (not stored)."""

    backend: str
    dtype: str
    export_target: str
    model_config: ModelConfig
    tokenizer: bool
    io: GraphIO
    profile: BuildProfile
    section: Section
    artifacts: dict[FileName, Artifact]
    versions: dict[str, str | None]
    quantization: Quantization | None = None
    checkpoint: CheckpointFingerprint | None = None  # what it was built from; None: not recorded (older builds)
    directory: Path = dataclasses.field(default=Path("."), compare=False)

    def path(self, name: str) -> Path:
        return self.directory / name


# -- readers and writers -------------------------------------------------------------------------------------------


def read_export_info(export_dir: str | Path) -> ExportInfo:
    """Read `EXPORT_DIR/export.json`; raises MoetrtError when it is missing, damaged or of another version."""
    path = Path(export_dir) / EXPORT_JSON
    if not path.is_file():
        raise MoetrtError(f"{Path(export_dir)} has no {EXPORT_JSON}: not an export directory")
    data = read_json_object(path, "re-export the checkpoint")
    _check_header(data, path, EXPORT_FORMAT, (EXPORT_FORMAT_VERSION,), "re-export it with `moetrt export`")
    return _load(ExportInfo, data, path, "re-export the checkpoint")


def write_export_info(export_dir: Path, info: ExportInfo) -> None:
    write_json(export_dir / EXPORT_JSON, {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
                                          **_dump(info)})


def read_manifest(engine_dir: str | Path) -> EngineManifest:
    """Read an engine directory's manifest (no environment checks: runtime/manifest.py makes those).

    Raises MoetrtError for a missing directory or manifest, invalid JSON, a foreign or older format, an unknown
    backend, a missing or mistyped field, a file name that leads out of the directory (absolute, `..`, or a
    symlink pointing outside) or that the artifacts do not record, each naming the fix (mostly: rebuild the
    engine). Nothing but the manifest is opened."""
    directory = Path(engine_dir)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise MoetrtError(f"engine directory {directory} does not exist; build one with `moetrt build-engine`")
    if not path.is_file():
        raise MoetrtError(f"{directory} has no {MANIFEST}: not an engine directory (or an interrupted build)")
    data = read_json_object(path, "rebuild the engine")
    _check_header(data, path, ENGINE_FORMAT, (ENGINE_FORMAT_VERSION,), "rebuild the engine with this moetrt "
                  "(`moetrt build-engine CHECKPOINT -o ENGINE`)")
    backend = data.get("backend")
    if backend not in SECTIONS:
        raise MoetrtError(f"{path}: unknown backend {backend!r} (this moetrt runs {', '.join(SECTIONS)})")
    if not isinstance(data.get(backend), dict):
        raise MoetrtError(f"{path} lacks its '{backend}' section; rebuild the engine")
    fields = {key: value for key, value in data.items() if key not in SECTIONS}
    named: list[tuple[str, str]] = []
    manifest = _load(EngineManifest, {**fields, "section": data[backend]}, path, "rebuild the engine",
                     section=SECTIONS[backend], named=named)
    _check_section_files(manifest, path, named)
    return dataclasses.replace(manifest, directory=directory)


def write_manifest(engine_dir: Path, manifest: EngineManifest) -> None:
    data = _dump(manifest)
    section = data.pop("section")
    data.pop("directory")
    write_json(engine_dir / MANIFEST, {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
                                       **data, manifest.backend: section})


@dataclasses.dataclass(frozen=True)
class RoutingCounts:
    """Tokens routed to each expert, per MoE layer, as measured on a workload (`--record-routing FILE` under
    `--expert-parallel`): `counts[l][e]` for the l-th MoE layer of the engine (in layer order) and expert e.
    `engine_experts` is the engine's routed experts per layer, which a placement checks against."""

    engine_experts: int
    counts: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if any(len(layer) != self.engine_experts for layer in self.counts):
            raise MoetrtError(f"every layer's counts must list {self.engine_experts} experts")
        if any(count < 0 for layer in self.counts for count in layer):
            raise MoetrtError("routing counts must not be negative")


def read_routing_counts(path: str | Path) -> RoutingCounts:
    """Read a routing-counts file; MoetrtError naming the problem and the fix (record it again) otherwise."""
    path = Path(path)
    fix = "record it again with `--expert-parallel --record-routing FILE`"
    if not path.exists():
        raise MoetrtError(f"routing-counts file {path} does not exist; {fix}")
    if not path.is_file():
        raise MoetrtError(f"routing-counts file {path} is not a file; {fix}")
    data = read_json_object(path, fix)
    if data.get("format") != ROUTING_FORMAT:
        raise MoetrtError(f"{path} is not a routing-counts file (no \"format\": \"{ROUTING_FORMAT}\"); {fix}")
    _check_header(data, path, ROUTING_FORMAT, (ROUTING_FORMAT_VERSION,), fix)
    return _load(RoutingCounts, data, path, fix)


def write_routing_counts(path: Path, counts: RoutingCounts) -> None:
    write_json(path, {"format": ROUTING_FORMAT, "format_version": ROUTING_FORMAT_VERSION, **_dump(counts)})


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def artifact_records(directory: Path) -> dict[str, Artifact]:
    """sha256 and size of every file in `directory` but the manifest, by relative path."""
    return {
        str(path.relative_to(directory)): Artifact(file_sha256(path), path.stat().st_size)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _check_section_files(manifest: EngineManifest, path: Path, named: list[tuple[str, str]]) -> None:
    """Every file the backend's section names is a recorded artifact (so `verify --integrity` hashes all that
    loads, and the load-time size check covers it), and the experts file holds every span read from it."""
    for where, name in named:
        if where.startswith("manifest.section") and name not in manifest.artifacts:
            raise MoetrtError(f"{path}: {where} names {name!r}, which the manifest's artifacts do not record; "
                              "rebuild the engine")
    section = manifest.section
    if not isinstance(section, OrtSection) or section.experts_file is None:
        return
    size = manifest.artifacts[section.experts_file].bytes
    for index, layer in enumerate(section.expert_layers):
        itemsize = 4 if layer.bits == 32 else 1  # float32 values, or a quantized layer's packed bytes
        for span in (layer.gate_up, layer.down):
            end = span.offset + itemsize * span.count
            if span.offset < 0 or span.count < 0 or span.offset % itemsize or end > size:
                raise MoetrtError(f"{path}: expert layer {index} reads bytes {span.offset} to {end} of "
                                  f"{section.experts_file}, which holds {size}; rebuild the engine")


def _confined(name: str, directory: Path, where: str, path: Path, fix: str) -> str:
    """`name` when it names a file inside `directory` (relative, no `..`, no symlink leading out; it need not
    exist yet); MoetrtError otherwise. Only links are read, no file is opened."""
    parts = PurePosixPath(name).parts
    if "\0" in name or not parts:
        reason = "names no file"
    elif PurePosixPath(name).is_absolute():
        reason = "is an absolute path"
    elif ".." in parts:
        reason = "climbs out with '..'"
    else:
        try:
            root, target = directory.resolve(), (directory / name).resolve()
        except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
            reason = f"cannot be resolved ({error})"
        else:
            if target.is_relative_to(root) and target != root:
                return name
            reason = f"leads to {target} through a symlink"
    raise MoetrtError(f"{path}: {where} {name!r} {reason}, but the files it names must lie inside {directory}; "
                      f"{fix}")


def _check_header(data: dict[str, Any], path: Path, kind: str, readable: tuple[int, ...], fix: str) -> None:
    if data.get("format") != kind:
        raise MoetrtError(f"{path} is not a {kind} description")
    if data.get("format_version") not in readable:
        raise MoetrtError(f"{path} has format version {data.get('format_version')}, this moetrt reads "
                          f"{' and '.join(map(str, readable))}: {fix}")


T = TypeVar("T")


def _load(cls: type[T], data: Any, path: Path, fix: str, section: type[Any] | None = None,
          named: list[tuple[str, str]] | None = None) -> T:
    """Build dataclass `cls` from JSON `data`, converting nested dataclasses (ModelConfig's too), tuples, dicts
    and optionals, checking every value's type and every FileName's place (`_confined`, relative to `path`'s
    directory). `section` is the concrete type of EngineManifest.section; `named` collects (where, file name)."""

    def convert(hint: Any, value: Any, where: str) -> Any:
        if hint is Any:
            return value
        if hint == FileName:
            checked = _confined(convert(str, value, where), path.parent, where, path, fix)
            if named is not None:
                named.append((where, checked))
            return checked
        if hint == Section:
            hint = section
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [arg for arg in args if arg is not type(None)]
            if len(options) == 1:
                return convert(options[0], value, where)
            if any(isinstance(value, option) and not isinstance(value, bool) for option in options):
                return value  # a union of scalars: int | str dims
            raise MoetrtError(f"{path}: {where} should be one of {options}, got {value!r}; {fix}")
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise MoetrtError(f"{path}: {where} should be an object; {fix}")
            hints = typing.get_type_hints(hint, include_extras=True)
            kwargs = {}
            for field in dataclasses.fields(hint):
                if field.name == "directory":
                    continue
                if field.name in value:
                    kwargs[field.name] = convert(hints[field.name], value[field.name], f"{where}.{field.name}")
                elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    raise MoetrtError(f"{path} lacks the field '{where}.{field.name}'; {fix}")
            try:
                return hint(**kwargs)
            except MoetrtError as error:  # the dataclass's own checks (__post_init__)
                raise MoetrtError(f"{path}: {where}: {error}; {fix}") from None
        if origin is tuple:
            if not isinstance(value, list):
                raise MoetrtError(f"{path}: {where} should be a list; {fix}")
            inner = args[0]
            return tuple(convert(inner, item, f"{where}[{i}]") for i, item in enumerate(value))
        if origin is dict:
            if not isinstance(value, dict):
                raise MoetrtError(f"{path}: {where} should be an object; {fix}")
            return {convert(args[0], key, f"{where} key"): convert(args[1], item, f"{where}.{key}")
                    for key, item in value.items()}
        allowed = (int, float) if hint is float else (hint,)
        if not isinstance(value, allowed) or (hint is int and isinstance(value, bool)):
            raise MoetrtError(f"{path}: {where} should be {getattr(hint, '__name__', hint)}, got {value!r}; {fix}")
        return value

    return convert(cls, data, cls.__name__ if section is None else "manifest")


def _dump(value: Any) -> Any:
    """A dataclass tree as JSON-ready data (tuples as lists, ModelConfig through its own to_dict)."""
    if isinstance(value, ModelConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _dump(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_dump(item) for item in value]
    if isinstance(value, dict):
        return {key: _dump(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
