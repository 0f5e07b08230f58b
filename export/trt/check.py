"""What TensorRT's ONNX parser would refuse in an export, found without TensorRT or a GPU.

`check_trt_export(export_dir)` reads the graph (not the weights), infers types, and walks every node, subgraphs
included, against export/trt/support.py (TensorRT's documented operator support) and the plugin spec: operators
the parser has no importer for, tensor types an importer does not take (int64 where int32 is needed among them),
build-time constants and attribute values its restrictions demand, mixed floating-point types a strongly typed
network cannot reconcile, tensors whose type is unknown, and plugin nodes that do not match plugins/spec.py.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx

from moetrt.errors import MoetrtError
from moetrt.export.trt import support
from moetrt.plugins.spec import ACTIVATION_DTYPES, LAUNCH_ATTRIBUTE, MOE_STAGES, ROUTED_EXPERTS, PluginSpec
from moetrt.plugins.trt_stages import StageAttribute

STANDARD_DOMAINS = ("", "ai.onnx")
# What onnx-tensorrt's importer does with a plugin node that lacks plugin_namespace (the `trt` lowering sets it).
NO_NAMESPACE_NOTE = ("plugin nodes without plugin_namespace reach the plugin importer only because no ONNX operator "
                     "has their op type; it looks them up in namespace \"\" and, in parsers that fall back to it, the "
                     "node's domain (set plugin_namespace to be independent of that)")
SPEC_TYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int32": "INT32", "float8e4m3fn": "FP8"}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing the parser would refuse. kind: operator, type, int64, constant, attribute, strong-typing, plugin,
    opset."""

    kind: str
    node: str
    op: str
    problem: str


@dataclasses.dataclass
class TrtCheckReport:
    model: str
    opset: int
    nodes: int
    plugin_nodes: Counter[str]
    refused: list[Finding]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.refused

    def format(self) -> str:
        lines = [f"TensorRT parser check of {self.model}",
                 f"  against {support.SOURCE} (opset {support.OPSET_RANGE[0]}-{support.OPSET_RANGE[1]}) and "
                 f"plugins/spec.py; graph opset {self.opset}, {self.nodes} nodes"]
        if self.plugin_nodes:
            lines.append("  plugin nodes: " + ", ".join(f"{op} x{n}" for op, n in sorted(self.plugin_nodes.items())))
        lines += [f"  note: {note}" for note in self.notes]
        if self.ok:
            lines.append("  ok: nothing TensorRT's parser would refuse")
            return "\n".join(lines)
        lines.append(f"  REFUSED ({len(self.refused)}):")
        for kind, count in sorted(Counter(f.kind for f in self.refused).items()):
            lines.append(f"    {count} x {kind}")
        for finding in self.refused[:200]:
            lines.append(f"    [{finding.kind}] {finding.node} ({finding.op}): {finding.problem}")
        if len(self.refused) > 200:
            lines.append(f"    ... and {len(self.refused) - 200} more")
        return "\n".join(lines)


def check_trt_export(export_dir: str | Path) -> TrtCheckReport:
    """Check `export_dir/model.onnx` (or an .onnx file) for what TensorRT's parser would refuse."""
    path = Path(export_dir)
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise MoetrtError(f"{path} does not exist: check an export directory (`moetrt export`)")
    try:
        model = onnx.load(str(path), load_external_data=False)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as error:  # onnx raises its own exception types for damaged files
        raise MoetrtError(f"{path} is not a readable ONNX model ({str(error).splitlines()[0][:200]})") from None
    return Checker(model).run(str(path))


class Checker:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.refused: list[Finding] = []
        self.notes: set[str] = set()
        self.types: dict[str, int] = {}
        self.constants: set[str] = set()
        self.plugins: Counter[str] = Counter()

    def run(self, name: str) -> TrtCheckReport:
        opset = next((o.version for o in self.model.opset_import if o.domain in STANDARD_DOMAINS), 0)
        low, high = support.OPSET_RANGE
        if not low <= opset <= high:
            self.refuse("opset", "graph", "", f"opset {opset} is outside TensorRT's {low}-{high}")
        nodes = list(walk(self.model.graph))
        for graph in graphs(self.model.graph):
            self.collect(graph)
        for node in nodes:
            self.check(node)
        return TrtCheckReport(name, opset, len(nodes), self.plugins, self.refused, sorted(self.notes))

    def refuse(self, kind: str, node: str, op: str, problem: str) -> None:
        self.refused.append(Finding(kind, node, op, problem))

    def collect(self, graph: onnx.GraphProto) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            self.types[value.name] = value.type.tensor_type.elem_type
        for tensor in graph.initializer:
            self.types[tensor.name] = tensor.data_type
            self.constants.add(tensor.name)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                self.constants.update(node.output)

    def type_of(self, name: str) -> str | None:
        """The operators.md name of a tensor's type, '?' when unknown, None for a type TensorRT lacks."""
        elem = self.types.get(name, 0)
        if elem == 0:
            return "?"
        if elem == support.DOUBLE:
            self.notes.add("DOUBLE tensors are cast down to FP32 by the parser")
        return support.ONNX_TYPES.get(elem)

    def check(self, node: onnx.NodeProto) -> None:
        label = node.name or (node.output[0] if node.output else "?")
        op = f"{node.domain}::{node.op_type}" if node.domain not in STANDARD_DOMAINS else node.op_type
        if node.domain == ROUTED_EXPERTS.domain:
            self.plugins[op] += 1
            self.check_plugin(node, label, op)
        elif node.domain not in STANDARD_DOMAINS:
            self.refuse("operator", label, op, f"domain {node.domain!r} has no TensorRT importer and moetrt "
                        "registers no plugin for it (build from a trt or onnx export)")
        elif node.op_type not in support.OPERATORS:
            self.refuse("operator", label, op, "not in TensorRT's ONNX operator support list")
        else:
            self.check_standard(node, label, op)

    def check_standard(self, node: onnx.NodeProto, label: str, op: str) -> None:
        allowed = support.OPERATORS[node.op_type].split()
        index_inputs = support.INDEX_INPUTS.get(node.op_type, ())
        data = [name for i, name in enumerate(node.input) if name and i not in index_inputs]
        if node.op_type in ("Cast", "CastLike", "Constant", "ConstantOfShape"):
            data += list(node.output)
        floats = set()
        for name in data:
            kind = self.type_of(name)
            if kind == "?":
                self.refuse("strong-typing", label, op, f"type of {name} is unknown after shape inference")
            elif kind is None:
                self.refuse("type", label, op, f"{name} has ONNX type {self.types[name]}, which TensorRT lacks")
            elif kind not in allowed:
                int64 = kind == "INT64" and "INT32" in allowed
                self.refuse("int64" if int64 else "type", label, op,
                            f"{name} is {kind}" + (", int32 is needed" if int64 else "")
                            + f"; {node.op_type} takes {', '.join(allowed)}")
            elif kind in ("FP32", "FP16", "BF16"):
                floats.add(kind)
        if node.op_type in support.SAME_TYPE_OPERATORS and len(floats) > 1:
            self.refuse("strong-typing", label, op, f"mixes {' and '.join(sorted(floats))}: a strongly typed "
                        "network inserts no casts")
        for index, rule in support.CONSTANT_INPUTS.get(node.op_type, {}).items():
            if index < len(node.input) and node.input[index] and node.input[index] not in self.constants:
                self.refuse("constant", label, op, rule)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for name, want in support.ATTRIBUTE_RULES.get(node.op_type, ()):
            got = attributes.get(name, want)
            got = got.decode() if isinstance(got, bytes) else got
            if got != want:
                self.refuse("attribute", label, op, f"{name}={got!r}; TensorRT needs {want!r}")

    def check_plugin(self, node: onnx.NodeProto, label: str, op: str) -> None:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attributes = {k: v.decode() if isinstance(v, bytes) else v for k, v in attributes.items()}
        specs = {spec.op_type: spec for spec in (ROUTED_EXPERTS, *MOE_STAGES.values())}
        spec = specs.get(node.op_type)
        if spec is None:
            self.refuse("plugin", label, op, f"moetrt registers no plugin {node.op_type} "
                        f"(it has {', '.join(specs)})")
            return
        for problem in plugin_problems(spec, node, attributes, self.type_of):
            self.refuse("plugin", label, op, problem)
        if "plugin_namespace" not in attributes:
            self.notes.add(NO_NAMESPACE_NOTE)


def plugin_problems(spec: PluginSpec, node: onnx.NodeProto, attributes: dict, type_of) -> Iterator[str]:
    """Where a plugin node differs from its spec: arity, tensor types, attributes, plugin version and namespace."""
    if attributes.get("plugin_version", str(spec.version)) != str(spec.version):
        yield f"plugin_version {attributes['plugin_version']!r}, the plugin is version {spec.version}"
    if attributes.get("plugin_namespace", spec.domain) != spec.domain:
        yield f"plugin_namespace {attributes['plugin_namespace']!r}, the plugin's namespace is {spec.domain!r}"
    inputs = [name for name in node.input]
    if spec is ROUTED_EXPERTS and len(inputs) > len(spec.required_inputs):
        yield "fp8 block scales given: the TensorRT plugin takes dequantised experts (export dequantises them)"
    if len(inputs) != len(spec.required_inputs) or len(node.output) != len(spec.outputs):
        yield (f"{len(inputs)} inputs and {len(node.output)} outputs; the spec has {len(spec.required_inputs)} "
               f"and {len(spec.outputs)}")
        return
    dtype = expected_dtype(spec, attributes, type_of(inputs[0]))
    if isinstance(dtype, str) and dtype.startswith("bad"):
        yield dtype
        return
    for name, tensor in (*zip(inputs, spec.required_inputs), *zip(node.output, spec.outputs)):
        want = SPEC_TYPES[tensor.dtypes[0]] if len(tensor.dtypes) == 1 else dtype
        got = type_of(name)
        if got != want:
            yield f"{tensor.name} ({name}) is {got}, the plugin takes {want}"


def expected_dtype(spec: PluginSpec, attributes: dict, hidden_type: str | None) -> str:
    """The one activation/weight type of a plugin node: its `launch` attribute's, or for the spec's node the
    hidden input's; 'bad ...' when the attribute is missing or unreadable."""
    if spec is ROUTED_EXPERTS:
        if attributes.get("activation", "silu") != "silu":
            return f"bad activation {attributes['activation']!r}: the plugin computes silu(gate) * up"
        allowed = [SPEC_TYPES[d] for d in ACTIVATION_DTYPES]
        return hidden_type if hidden_type in allowed else f"bad hidden type {hidden_type}; takes {allowed}"
    if LAUNCH_ATTRIBUTE not in attributes:
        return f"bad node: no `{LAUNCH_ATTRIBUTE}` attribute (export with --target trt)"
    try:
        return SPEC_TYPES[StageAttribute.decode(attributes[LAUNCH_ATTRIBUTE]).dtype]
    except ValueError as error:
        return f"bad {error}"


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from graphs(sub)


def walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, those of Loop/If/Scan bodies included."""
    for sub in graphs(graph):
        yield from sub.node
