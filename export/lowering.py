"""Lowering passes: rewrite the traced graph's routed-experts nodes for one backend.

`trt` keeps the plugin node for TensorRT's ONNX parser, `ort` rewrites it to ONNX Runtime's
`com.microsoft::MoE`, `onnx` to standard ONNX ops only. All passes work on an onnx_ir model in place.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from moetrt.errors import MoetrtError
from moetrt.plugins.spec import ROUTED_EXPERTS


def routed_experts_nodes(model: ir.Model) -> list[ir.Node]:
    """The plugin nodes of the graph, checked against the spec."""
    nodes = [n for n in model.graph if n.domain == ROUTED_EXPERTS.domain and n.op_type == ROUTED_EXPERTS.op_type]
    for node in nodes:
        required = len(ROUTED_EXPERTS.required_inputs)
        if not required <= len(node.inputs) <= len(ROUTED_EXPERTS.inputs) or len(node.outputs) != 1:
            raise MoetrtError(f"plugin node {node.name} has {len(node.inputs)} inputs; the spec wants {required}+")
    return nodes


@dataclasses.dataclass(frozen=True)
class LoweringPlan:
    """What an export is lowered for: `target` ("ort", "trt" or "onnx", standard ops) and, for "ort", the routed
    experts' layout the ONNX Runtime backend's plan chose (export/ort/plan.py): `moe_kernel` ("onnxruntime" or
    "moetrt"), `expert_slices` and `why` (said to the user). Other targets keep the defaults."""

    target: str
    expert_slices: int = 1
    moe_kernel: str = "none"
    why: str = ""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise MoetrtError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")


# export target -> the module whose `lower(model, plan)` rewrites the routed-experts nodes for it
TARGETS = {"ort": "moetrt.export.ort.lower", "trt": "moetrt.export.trt.lower", "onnx": "moetrt.export.portable"}


def lower(model: ir.Model, plan: LoweringPlan) -> ir.Model:
    """Rewrite `model`'s routed-experts nodes in place for `plan.target`; returns it."""
    import importlib

    importlib.import_module(TARGETS[plan.target]).lower(model, plan)
    return model


def replace_node(node: ir.Node, new_nodes: list[ir.Node], new_output: ir.Value) -> None:
    """Put `new_nodes` where `node` was and route its single output's uses (graph outputs too) to `new_output`."""
    old = node.outputs[0]
    name = old.name
    new_output.shape, new_output.type = old.shape, old.type
    node.graph.insert_before(node, new_nodes)
    old.replace_all_uses_with(new_output, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    new_output.name = name


def add_initializer(model: ir.Model, array, name: str) -> ir.Value:
    """Register numpy `array` as a new initializer named `name`."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    model.graph.register_initializer(value)
    return value


def lazy_initializer(model: ir.Model, name: str, compute, dtype: ir.DataType, shape) -> ir.Value:
    """Register initializer `name` whose data `compute()` (a numpy array of `shape`, held as `dtype`: INT4 values
    come as int8) gives only when it is read, typically when the graph is saved: weights derived in a lowering
    never all exist at once (export/streaming.py). `compute` reads its sources' `const_value` when called."""
    def tensor() -> ir.TensorProtocol:
        array = compute()
        if tuple(array.shape) != tuple(shape):
            raise MoetrtError(f"{name}: derived weight has shape {list(array.shape)}, expected {list(shape)}")
        return ir.Tensor(array, dtype=dtype, name=name)

    lazy = ir.LazyTensor(tensor, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    value = ir.Value(name=name, shape=lazy.shape, type=ir.TensorType(dtype), const_value=lazy)
    model.graph.register_initializer(value)
    return value


def drop_unused_initializer(model: ir.Model, value: ir.Value) -> None:
    if value.name in model.graph.initializers and not value.uses():
        model.graph.initializers.pop(value.name)


def constant(tape, value, dtype=None) -> ir.Value:
    import numpy as np

    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(value, dtype=dtype))})
