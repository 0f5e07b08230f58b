"""Load a Hugging Face safetensors checkpoint into the reference model, layer by layer.

Tensors are read straight from memory-mapped shards into the model's preallocated parameters, and each
tensor's pages are released after the copy, so peak memory stays near one copy of the weights. FP8 block
weights are dequantised here. Pickle files are never opened.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moetrt.errors import MoetrtError
from moetrt.config import ModelConfig, load_config
from moetrt.formats import CheckpointFingerprint
from moetrt.export.model import DeepseekForCausalLM, checkpoint_key, parameter_name, rope_inv_freq
from moetrt.plugins.routed_experts import dequantize_blocks
from moetrt.progress import note, track
from moetrt.quantization import QuantScheme

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Checkpoint key of one routed expert -> (stacked parameter, which half of gate_up; None for down).
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_TARGETS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Tensors a checkpoint may hold that its config makes redundant (transformers loads past them too): rotary caches
# that some writers save, the correction bias of a router that selects without it, and the zero-sized shared
# experts transformers writes for n_shared_experts 0. Checkpoint key pattern -> when it is redundant.
REDUNDANT_TENSORS: tuple[tuple[re.Pattern[str], Callable[[ModelConfig, "TensorInfo"], bool]], ...] = (
    (re.compile(r"rotary_emb\.(inv_freq|original_inv_freq|cos_cached|sin_cached)$"), lambda config, info: True),
    (re.compile(r"\.mlp\.gate\.e_score_correction_bias$"), lambda config, info: not config.uses_correction_bias),
    (re.compile(r"\.mlp\.shared_experts\.\w+\.weight$"),
     lambda config, info: not config.n_shared_experts and 0 in info.shape),
)
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """A memory-mapped safetensors file: header parsed eagerly, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")
        size = path.stat().st_size
        try:
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(self._file.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as error:
            self._file.close()
            raise MoetrtError(f"{path} is not a valid safetensors file ({error}); re-download or re-save it")
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise MoetrtError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or data_start + end > size:
                raise MoetrtError(f"{path}: tensor {name} lies outside the file or has the wrong size (truncated?)")
            self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
        # ACCESS_COPY gives a writable private mapping (torch.frombuffer wants one); nothing is written back.
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def view(self, name: str) -> torch.Tensor:
        """A tensor backed by the mapped file (no copy); copy out of it, then `release(name)`."""
        info = self.tensors[name]
        count = math.prod(info.shape)
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.end - info.start, offset=info.start)
        return flat.view(info.dtype).view(info.shape)

    def read_bytes(self, name: str, offset: int, count: int) -> bytes:
        """Up to `count` bytes of tensor `name`'s data from byte `offset` of it, read from the file (not mapped)."""
        info = self.tensors[name]
        self._file.seek(info.start + offset)
        return self._file.read(max(0, min(count, info.end - info.start - offset)))

    def release(self, name: str, rows: slice | None = None) -> None:
        """Drop the tensor's pages (only those of `rows`, a slice along its first axis, when given) from this
        process's resident memory; the mapping is private and never written, so they read back from the file."""
        info = self.tensors[name]
        begin, end = info.start, info.end
        if rows is not None and info.shape:
            row_bytes = (end - begin) // max(info.shape[0], 1)
            first, last, _ = rows.indices(info.shape[0])
            begin, end = info.start + first * row_bytes, info.start + last * row_bytes
        page = mmap.PAGESIZE
        start = begin // page * page
        if self._map is not None and end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()


def find_weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map every tensor name to its safetensors file, through `model.safetensors.index.json` if present."""
    index_path = checkpoint_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise MoetrtError(f"{index_path} is not a valid safetensors index ({error})") from None
        not_safetensors = sorted({f for f in weight_map.values() if not f.endswith(".safetensors")})
        if not_safetensors:
            raise _pickle_refusal(checkpoint_dir, not_safetensors)
        missing = sorted({f for f in weight_map.values() if not (checkpoint_dir / f).is_file()})
        if missing:
            raise MoetrtError(f"{index_path} names shard(s) that are not there: {', '.join(missing[:5])}")
        return {name: checkpoint_dir / file for name, file in weight_map.items()}
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in checkpoint_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(checkpoint_dir, pickles)
        raise MoetrtError(f"{checkpoint_dir} has no *.safetensors weights")
    return {name: path for path in files for name in _header_names(path)}


FINGERPRINT_WHOLE_BYTES = 256 << 20  # checkpoints with up to this many weight bytes are hashed whole
FINGERPRINT_SAMPLE_BYTES = 1024  # larger ones: each tensor's first, middle and last this many bytes


def checkpoint_fingerprint(checkpoint_dir: Path) -> CheckpointFingerprint:
    """What identifies a checkpoint's weights, whatever files hold them: one sha256 over its tensors in name order
    (name, dtype, shape, then their bytes), so a re-saved or re-sharded copy of the same tensors matches and a
    tensor in another dtype does not. A checkpoint of up to FINGERPRINT_WHOLE_BYTES of weights is hashed whole;
    a larger one by each tensor's first, middle and last FINGERPRINT_SAMPLE_BYTES (about 3 KB a tensor: some
    MB for a DeepSeek-V3-sized checkpoint), which a change elsewhere in a tensor escapes. Raises MoetrtError as
    find_weight_files does."""
    import hashlib

    where = find_weight_files(checkpoint_dir)
    shards = {path: SafetensorsFile(path) for path in sorted(set(where.values()))}
    try:
        infos = {name: shards[path].tensors[name] for name, path in where.items()}
        total = sum(info.end - info.start for info in infos.values())
        whole = total <= FINGERPRINT_WHOLE_BYTES
        digest = hashlib.sha256()
        for name in sorted(infos):
            info = infos[name]
            digest.update(f"{name}\0{str(info.dtype).removeprefix('torch.')}\0{list(info.shape)}\0".encode())
            length = info.end - info.start
            spans = ([(0, length)] if whole or length <= 3 * FINGERPRINT_SAMPLE_BYTES else
                     [(at, FINGERPRINT_SAMPLE_BYTES) for at in (0, (length - FINGERPRINT_SAMPLE_BYTES) // 2,
                                                                 length - FINGERPRINT_SAMPLE_BYTES)])
            for offset, count in spans:
                digest.update(shards[where[name]].read_bytes(name, offset, count))
    finally:
        for shard in shards.values():
            shard.close()
    return CheckpointFingerprint(tensors=len(infos), weight_bytes=total, whole=whole,
                                 sha256=digest.hexdigest())


def _header_names(path: Path) -> list[str]:
    shard = SafetensorsFile(path)
    try:
        return list(shard.tensors)
    finally:
        shard.close()


def _pickle_refusal(checkpoint_dir: Path, files: list[str]) -> MoetrtError:
    return MoetrtError(
        f"{checkpoint_dir} stores weights as pickle ({', '.join(files[:3])}); moetrt loads safetensors only, "
        "because unpickling can run arbitrary code: convert the checkpoint to safetensors first"
    )


def expected_shapes(config: ModelConfig, model: DeepseekForCausalLM, tied: bool,
                    mtp_layers: int = 0) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for every tensor the model needs (per-expert keys for stacked experts; the MTP
    modules' under `model.layers.<num_hidden_layers + depth>`, the first `mtp_layers` of them); no lm_head.weight
    when `tied` (the head is the embedding). `model`: unquantized (on any device, meta too)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            continue
        shapes[checkpoint_key(config, name)] = tuple(tensor.shape)
    h, i = config.hidden_size, config.moe_intermediate_size
    mtp = [config.num_hidden_layers + depth for depth in range(mtp_layers)]
    for layer in [*config.moe_layers, *(layer for layer in mtp if config.is_moe_layer(layer))]:
        for expert in range(config.n_routed_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}."
            shapes[prefix + "gate_proj.weight"] = (i, h)
            shapes[prefix + "up_proj.weight"] = (i, h)
            shapes[prefix + "down_proj.weight"] = (h, i)
    if tied:
        shapes.pop("lm_head.weight", None)
    return shapes


def _redundant(config: ModelConfig, name: str, info: TensorInfo) -> bool:
    return any(pattern.search(name) and applies(config, info) for pattern, applies in REDUNDANT_TENSORS)


def _check_tensors(
    config: ModelConfig, expected: dict[str, tuple[int, ...]], found: dict[str, TensorInfo]
) -> list[str]:
    """Validate names and shapes before loading anything; returns the keys of the skipped MTP layer."""
    mtp, unexpected, wrong = [], [], []
    for name, info in found.items():
        layer = LAYER_KEY.match(name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers and name not in expected \
                and not (name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in expected):
            mtp.append(name)
        elif name not in expected and _redundant(config, name, info):
            continue
        elif name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in expected:
            want = _scale_shape(config, expected[name[: -len(SCALE_SUFFIX)]])
            if info.shape != want:
                wrong.append(f"{name} {list(info.shape)} (expected {list(want)})")
        elif name not in expected:
            unexpected.append(name)
        elif info.shape != expected[name]:
            wrong.append(f"{name} {list(info.shape)} (expected {list(expected[name])})")
        elif info.dtype == torch.float8_e4m3fn and name + SCALE_SUFFIX not in found:
            wrong.append(f"{name} is fp8 without its {name + SCALE_SUFFIX}")
    missing = sorted(set(expected) - set(found))
    problems = [
        f"{label}: {_listing(names)}"
        for label, names in (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", wrong))
        if names
    ]
    if problems:
        raise MoetrtError("checkpoint tensors do not match config.json: " + "; ".join(problems))
    return mtp


def _scale_shape(config: ModelConfig, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    block = config.fp8.block_size if config.fp8 else (128, 128)
    return (math.ceil(weight_shape[0] / block[0]), math.ceil(weight_shape[1] / block[1]))


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def owner_of(config: ModelConfig, key: str) -> str:
    """The module of DeepseekForCausalLM that checkpoint tensor `key` fills: a routed expert's tensors fill the
    layer's stacked (or quantized) experts, any other tensor its parameter's module."""
    expert = EXPERT_KEY.match(key)
    if expert:
        return parameter_name(config, f"model.layers.{expert.group(1)}.mlp.experts")
    return parameter_name(config, key).rpartition(".")[0]


def _fill_into(config: ModelConfig, module: torch.nn.Module, key: str, tensor: torch.Tensor,
               done: Callable[[slice], None] | None = None) -> None:
    """Put checkpoint tensor `tensor` (key `key`, named as its target) into `module`, the module it fills
    (`owner_of`): copied into its parameter, or quantized by a module that holds blocks (export/quantized.py),
    which calls `done(rows)` as each chunk of rows is quantized."""
    expert = EXPERT_KEY.match(key)
    if expert:
        index, kind = int(expert.group(2)), expert.group(3)
        if hasattr(module, "load_expert"):
            module.load_expert(index, kind, tensor)
            return
        stacked_name, half = EXPERT_TARGETS[kind]
        stacked = getattr(module, stacked_name)[index]
        rows = stacked.shape[0] // 2
        (stacked if half is None else stacked[half * rows : (half + 1) * rows]).copy_(tensor)
        return
    attribute = key.rpartition(".")[2]
    if attribute == "weight" and hasattr(module, "load_weight"):
        module.load_weight(tensor, done)
    else:
        getattr(module, attribute).copy_(tensor)


def _group_by_layer(names: list[str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        layer = LAYER_KEY.match(name)
        groups[f"layer {layer.group(1)}" if layer else "embeddings and head"].append(name)
    order = sorted(groups, key=lambda g: int(g.split()[1]) if g.startswith("layer") else -1)
    return [(group, groups[group]) for group in order]


class CheckpointWeights:
    """A safetensors checkpoint opened for reading module by module, checked against its config first.

    `skeleton` is the model on the meta device (dtype set, router fp32, quantized modules swapped in when
    `quantize`): shapes and structure without memory. `materialize(name)` gives a CPU copy of one of its
    submodules filled from the memory-mapped shards (a layer, an expert block, the head): the streaming build
    and the streaming reference hold one module at a time; `load_model()` fills the whole model. Arguments and
    errors as `load_reference`; use as a context manager (or `close()`) to unmap the shards.
    """

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float32", quantize: QuantScheme | None = None,
                 mtp: bool = False):
        from moetrt.export.quantized import check_quantizable, quantize_model

        checkpoint_dir = Path(checkpoint_dir)
        if dtype not in DTYPES:
            raise MoetrtError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if quantize is not None:
            check_quantizable(dtype)
        config = load_config(checkpoint_dir)
        if mtp and config.num_nextn_predict_layers < 1:
            raise MoetrtError(f"{checkpoint_dir} has no multi-token-prediction layer (num_nextn_predict_layers is 0 "
                              "in its config.json), so it cannot draft tokens; build without --mtp")
        self.config, self.dtype, self.mtp_layers = config, dtype, 1 if mtp else 0
        self.weight_files = find_weight_files(checkpoint_dir)
        with torch.device("meta"):
            model = DeepseekForCausalLM(config, mtp_layers=self.mtp_layers)
        model.to(DTYPES[dtype])
        for module in model.modules():
            if module.__class__.__name__ == "Router":
                module.float()
        plain = dict(model.state_dict())  # meta: shapes of the unquantized model
        with torch.device("meta"):  # the quantized modules' buffers too: nothing is allocated before it is read
            model.quantization = quantize_model(model, quantize) if quantize is not None else None
        self.skeleton = model
        self.shards = {path: SafetensorsFile(path) for path in sorted(set(self.weight_files.values()))}
        try:
            found = {}
            for name, path in self.weight_files.items():
                if name not in self.shards[path].tensors:
                    raise MoetrtError(f"the safetensors index places {name} in {path.name}, which lacks it")
                found[name] = self.shards[path].tensors[name]
            mtp_prefix = f"model.layers.{config.num_hidden_layers}."
            if mtp and not any(name.startswith(mtp_prefix) for name in found):
                # (transformers 5 writes num_nextn_predict_layers 1 into every DeepSeek-V3 config, tensors or not)
                raise MoetrtError(f"{checkpoint_dir} has no multi-token-prediction layer (no {mtp_prefix}* tensors, "
                                  "whatever config.json's num_nextn_predict_layers says), so it cannot draft tokens; "
                                  "build without --mtp")
            # Tied embeddings with an lm_head.weight in the checkpoint as well: transformers loads that head untied.
            self.tied = config.tie_word_embeddings and "lm_head.weight" not in found
            self.expected = expected_shapes(config, _Shapes(plain), self.tied, self.mtp_layers)
            skipped = _check_tensors(config, self.expected, found)
        except BaseException:
            self.close()
            raise
        if skipped and self.mtp_layers:
            note(f"loading the multi-token-prediction module (model.layers.{config.num_hidden_layers}); skipping "
                 f"{len(skipped)} tensors it does not need (its copies of the shared embedding and head, deeper "
                 "MTP layers)")
        elif skipped:
            note(f"skipping {len(skipped)} tensors of the multi-token-prediction layer "
                 f"(model.layers.{config.num_hidden_layers})")
        # module -> [(target key, source key)]: a tied head is filled from the embedding's tensor
        self.sources: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key in sorted(self.expected):
            self.sources[owner_of(config, key)].append((key, key))
        if self.tied:  # (a float head is tied to the embedding's tensor by load_model; materialize fills a copy)
            self.sources["lm_head"].append(("lm_head.weight", "model.embed_tokens.weight"))

    def __enter__(self) -> "CheckpointWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
        self.shards = {}

    @property
    def quantization(self):
        return self.skeleton.quantization

    def read(self, key: str) -> torch.Tensor:
        """Checkpoint tensor `key` as stored (FP8 blocks dequantized to float32): a view of the mapped shard,
        valid until `release(key)`."""
        return _read(self.shards[self.weight_files[key]], self.shards, self.weight_files, key, self.config)

    def release(self, key: str, rows: slice | None = None) -> None:
        """Drop tensor `key`'s mapped pages (of `rows` only, along its first axis, when given)."""
        self.shards[self.weight_files[key]].release(key, rows)

    def fill(self, name: str, module: torch.nn.Module, skip: str | None = None) -> None:
        """Fill `module` (the skeleton's submodule `name`, on the CPU) and every module under it from the shards,
        but the submodule named `skip` (full name) and those under it."""
        prefix = f"{name}." if name else ""
        with torch.no_grad():
            for owner in [owner for owner in self.sources if owner == name or owner.startswith(prefix)]:
                if skip and (owner == skip or owner.startswith(skip + ".")):
                    continue
                self._fill_owner(owner, module if owner == name else module.get_submodule(owner[len(prefix):]))

    def _fill_owner(self, owner: str, module: torch.nn.Module) -> None:
        """Fill the tensors module `owner` holds itself (not its submodules') into `module`, its CPU copy."""
        for key, source in self.sources[owner]:
            # a quantizing module lets the source's rows go as it goes (a 160k-row head: 0.67 GB of bf16 pages)
            _fill_into(self.config, module, key, self.read(source),
                       lambda rows, source=source: self.release(source, rows))
            self.release(source)

    def materialize(self, name: str) -> torch.nn.Module:
        """A CPU copy of the skeleton's submodule `name` (e.g. "model.layers.3", "lm_head"), filled."""
        import copy

        module = copy.deepcopy(self.skeleton.get_submodule(name))
        module.to_empty(device="cpu")
        self.fill(name, module)
        return module.eval()

    def load_model(self) -> DeepseekForCausalLM:
        """The whole model on the CPU (the skeleton itself, filled layer by layer with progress)."""
        model = self.skeleton
        model.to_empty(device="cpu")
        model.inv_freq = rope_inv_freq(self.config.rope, self.config.qk_rope_head_dim)[0]  # fp32 whatever the dtype
        groups = _group_by_layer(list(self.sources))
        tie_after = self.tied and not hasattr(model.lm_head, "load_weight")
        with torch.no_grad():
            for _, owners in track(groups, "loading weights"):
                for owner in owners:
                    if not (owner == "lm_head" and tie_after):
                        self._fill_owner(owner, model.get_submodule(owner))
        if tie_after:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def load_reference(checkpoint_dir: str | Path, dtype: str = "float32",
                   quantize: QuantScheme | None = None, mtp: bool = False) -> DeepseekForCausalLM:
    """Load a safetensors checkpoint into `DeepseekForCausalLM` (eval mode, on the CPU).

    dtype: "float32", "float16" or "bfloat16" for the model; the router stays fp32. quantize: hold the weights
    export/quantized.py chooses block-quantized (float32 models only), each quantized as it is read (FP8 ones from
    their own dequantization, one tensor at a time), so the model never exists in float32; the description is
    left on `model.quantization`. mtp: load the first multi-token-prediction module as `model.mtp[0]` (else its
    tensors are skipped, as are those of any further MTP depth). Raises MoetrtError for a bad config, pickle
    weights, missing / unexpected / wrongly shaped tensors (listed together), quantization with another dtype, or
    `mtp` for a checkpoint without an MTP layer.
    """
    with CheckpointWeights(checkpoint_dir, dtype, quantize, mtp) as weights:
        return weights.load_model()


class _Shapes:
    """Stands in for a model in `expected_shapes`: its state dict as recorded before quantization."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _read(
    shard: SafetensorsFile,
    shards: dict[Path, SafetensorsFile],
    weight_files: dict[str, Path],
    name: str,
    config: ModelConfig,
) -> torch.Tensor:
    tensor = shard.view(name)
    if tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor
    scale_name = name + SCALE_SUFFIX
    scale_shard = shards[weight_files[scale_name]]
    block = config.fp8.block_size if config.fp8 else (128, 128)
    weight = dequantize_blocks(tensor, scale_shard.view(scale_name), block)
    scale_shard.release(scale_name)
    return weight
