"""Streaming export: trace a model that holds no weights, then fill the graph's initializers lazily from the shards.

The whole model never exists in memory, whatever its size:

1. `hollow_model` is the checkpoint's skeleton (export/checkpoint.py `CheckpointWeights`) with every parameter and
   buffer a stride-0 tensor of its real shape and dtype (one element of storage each), so torch.onnx traces it
   exactly as it traces the loaded model: the graph does not depend on weight values.
2. `bind_weights` makes each weight initializer of the traced graph an `onnx_ir.LazyTensor` whose data is read
   when it is saved: `WeightStream` materializes the module that owns it (a layer's experts, one projection, the
   head), quantizing or dequantizing FP8 on the way as the eager loader does, and keeps at most a couple of modules.
3. `fold_weights` folds the standard ops that read only weights (the transposes the exporter puts before MatMul,
   the per-head slices of kv_b_proj) into lazy initializers too, before onnxscript's optimizer runs with those
   left alone (the exporter's own optimizer would fold them into materialized arrays).
4. Lowerings derive packed or rearranged weights with `lazy_initializer` (export/lowering.py), and `ir.save`
   writes the external data file tensor by tensor, so peak memory is about one module plus what ONNX Runtime and
   the writer hold at a time.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from moetrt.errors import MoetrtError

# The traced wrapper (onnx_export.DecoderGraph) holds the model as `.model`: its initializers are named so.
WRAPPER_PREFIX = "model."
# Modules kept materialized at once: a layer's experts hand out their values and scales to two packed tensors
# written one after the other; two bounds memory to about twice the largest module.
CACHED_MODULES = 2
# Ops never folded ahead: their outputs depend on shapes only, which onnxscript's folder reads without the data.
SHAPE_OPS = {"Shape", "Size"}


def hollow_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of `tensor`'s shape and dtype backed by one element (all strides 0)."""
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


def hollow_model(weights) -> torch.nn.Module:
    """A copy of the skeleton of `weights` (a CheckpointWeights) with stride-0 CPU tensors for every parameter and
    buffer, and its real rotary table: traceable, holding no weights. A tied head shares the embedding's tensor, as
    loaded."""
    from moetrt.export.model import rope_inv_freq

    import copy

    model = copy.deepcopy(weights.skeleton)  # the skeleton stays on the meta device for `materialize`
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                module._parameters[name] = torch.nn.Parameter(hollow_tensor(parameter), requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = hollow_tensor(buffer)
    config = weights.config
    model.inv_freq = rope_inv_freq(config.rope, config.qk_rope_head_dim)[0]
    if weights.tied and not hasattr(model.lm_head, "load_weight"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


M_MMAP_THRESHOLD = -3  # glibc mallopt(3) parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def allocate_large_buffers_by_mmap() -> None:
    """Have glibc serve every allocation over 1 MB with its own mmap, returned to the system when freed. By default
    glibc raises that threshold up to 32 MB after each large free (mallopt(3), M_MMAP_THRESHOLD), and the per-tensor
    buffers of a streaming build (an expert's weight, a packed block) then come from the heap, whose freed space
    fragments and is not given back: RSS crept by gigabytes over a 16B model. Process-wide and kept (a process that
    builds pays an mmap per large buffer afterwards too). No-op off glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc malloc_trim(3)); no-op elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


class WeightStream:
    """State-dict tensors of `weights` (a CheckpointWeights) on demand, one owning module materialized at a time.

    `tensor(key)` materializes the module that owns `key` (everything under it is filled at once: a quantized
    linear's values and scales come from one quantization) and keeps it until each of its tensors has been
    handed out, or until `CACHED_MODULES` later modules push it out (then it is materialized again if asked)."""

    def __init__(self, weights):
        self.weights = weights
        self.state_keys = set(weights.skeleton.state_dict())
        self._cache: OrderedDict[str, tuple[torch.nn.Module, set[str]]] = OrderedDict()
        self.materialized = 0  # how many modules were read from the shards (a module read twice counts twice)

    def tensor(self, key: str) -> torch.Tensor:
        """State-dict tensor `key` of the model (e.g. "model.layers.3.mlp.experts.gate_up_q"), on the CPU."""
        owner, _, attribute = key.rpartition(".")
        if owner not in self._cache:
            module = self.weights.materialize(owner)
            left = {name for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
            self._cache[owner] = (module, left)
            self.materialized += 1
            while len(self._cache) > CACHED_MODULES:
                self._cache.popitem(last=False)
                release_free_memory()
        module, left = self._cache[owner]
        left.discard(attribute)
        if not left:
            del self._cache[owner]
            release_free_memory()
        return getattr(module, attribute).detach()


def _torch_tensor(tensor: torch.Tensor, name: str) -> ir.TensorProtocol:
    from onnx_ir.tensor_adapters import TorchTensor

    return TorchTensor(tensor.contiguous(), name=name)


def bind_weights(model: ir.Model, stream: WeightStream, prefix: str = WRAPPER_PREFIX) -> int:
    """Make every initializer of the traced `model` named `prefix + <state-dict key>` a LazyTensor read through
    `stream`; returns how many. Raises MoetrtError if a hollow weight is left unbound (it would save zeros)."""
    count = 0
    for name, value in model.graph.initializers.items():
        key = name[len(prefix):] if name.startswith(prefix) else None
        if key in stream.state_keys:
            value.const_value = ir.LazyTensor(_reader(stream, key, name), dtype=value.const_value.dtype,
                                              shape=value.const_value.shape, name=name)
            count += 1
        elif _is_hollow(value.const_value):
            raise MoetrtError(f"the traced graph's weight {name} has no checkpoint tensor behind it; re-export with "
                              "a moetrt that knows this model")
    return count


def _reader(stream: WeightStream, key: str, name: str) -> Callable[[], ir.TensorProtocol]:
    return lambda: _torch_tensor(stream.tensor(key), name)


def _is_hollow(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.dim() > 0 and raw.numel() > 1 and all(s == 0 for s in raw.stride())


def _lazy(value: ir.Value) -> bool:
    return isinstance(value.const_value, ir.LazyTensor)


def reads_lazy_weight(node: ir.Node) -> bool:
    """Whether `node` reads a weight that is only read when saved (onnxscript's folder must leave it alone)."""
    return any(value is not None and _lazy(value) for value in node.inputs)


def _constant_input(value: ir.Value | None) -> bool:
    return value is None or value.const_value is not None


def fold_weights(model: ir.Model) -> int:
    """Fold every standard node whose inputs are all constant and at least one a lazy weight into a lazy
    initializer (evaluated by onnx's reference implementation when saved); returns how many. In graph order, so
    chains (a Cast then a Transpose) fold one after another."""
    count = 0
    for node in list(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
            node.outputs[0].const_value = node.attributes["value"].as_tensor()  # what onnxscript's folder reads too
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type in SHAPE_OPS or node.op_type == "Constant":
            continue
        inputs = list(node.inputs)
        if not all(_constant_input(value) for value in inputs) or not any(v is not None and _lazy(v) for v in inputs):
            continue
        proto = _node_proto(node)
        specs = _output_specs(node, proto, model.opset_imports.get("", 21))
        sources = [value.const_value if value is not None else None for value in inputs]
        for index, (output, (dtype, shape)) in enumerate(zip(node.outputs, specs)):
            if not output.uses() and not output.is_graph_output():
                continue
            name = output.name
            lazy = ir.LazyTensor(_evaluator(proto, sources, index, name), dtype=dtype, shape=shape, name=name)
            folded = ir.Value(name=f"{name}.folded", shape=shape, type=ir.TensorType(dtype), const_value=lazy)
            model.graph.register_initializer(folded)
            output.replace_all_uses_with(folded, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        for value in inputs:
            if value is not None and value.name in model.graph.initializers and not value.uses():
                model.graph.initializers.pop(value.name)
        count += 1
    return count


def _node_proto(node: ir.Node):
    """`node` alone as a NodeProto (inputs renamed in0.., outputs out0..) for onnx.reference."""
    import onnx

    attributes = {name: ir.serde.serialize_attribute(attr) for name, attr in node.attributes.items()}
    proto = onnx.helper.make_node(node.op_type, [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)],
                                  [f"out{i}" for i in range(len(node.outputs))], domain=node.domain)
    proto.attribute.extend(attributes.values())
    return proto


def _output_specs(node: ir.Node, proto, opset: int) -> list[tuple[ir.DataType, ir.Shape]]:
    """Each output's (dtype, static shape) by ONNX's shape inference for `node` alone, from its constant inputs'
    types (and the data of the small, already loaded ones: a Reshape's target shape)."""
    import onnx

    types, data = {}, {}
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        tensor = value.const_value
        types[f"in{index}"] = onnx.helper.make_tensor_type_proto(tensor.dtype.value, list(tensor.shape.dims))
        if not isinstance(tensor, ir.LazyTensor) and tensor.size <= 1024:
            data[f"in{index}"] = ir.serde.serialize_tensor(tensor)
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    try:
        inferred = onnx.shape_inference.infer_node_outputs(schema, proto, types, data)
    except Exception as error:  # onnx raises its own InferenceError types
        raise MoetrtError(f"{node.name} ({node.op_type}) derives a weight whose shape ONNX cannot infer ({error}); "
                          "re-export with a moetrt that knows this model") from None
    specs = []
    for index in range(len(node.outputs)):
        tensor_type = inferred[f"out{index}"].tensor_type
        dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
        if None in dims:
            raise MoetrtError(f"{node.name} ({node.op_type}) derives a weight without a static shape; re-export with "
                              "a moetrt that knows this model")
        specs.append((ir.DataType(tensor_type.elem_type), ir.Shape(dims)))
    return specs


def _evaluator(proto, sources: list, index: int, name: str) -> Callable[[], ir.TensorProtocol]:
    def evaluate() -> ir.TensorProtocol:
        from onnx.reference import ReferenceEvaluator

        feeds = {f"in{i}": source.numpy() for i, source in enumerate(sources) if source is not None}
        outputs = ReferenceEvaluator(proto).run(None, feeds)
        return ir.tensor(np.ascontiguousarray(outputs[index]), name=name)

    return evaluate
