"""Lowering passes: rewrite the traced graph's expert-dispatch nodes for one backend.

`trt` keeps the plugin node for TensorRT's ONNX parser, `ort` rewrites it to ONNX Runtime's
`com.microsoft::MoE`, `onnx` to standard ONNX ops only. All passes work on an onnx_ir model in place.
"""

from __future__ import annotations

import onnx_ir as ir

from moetrt.errors import MoetrtError
from moetrt.plugins.spec import MOE_DISPATCH


def dispatch_nodes(model: ir.Model) -> list[ir.Node]:
    """The plugin nodes of the graph, checked against the spec."""
    nodes = [n for n in model.graph if n.domain == MOE_DISPATCH.domain and n.op_type == MOE_DISPATCH.op_type]
    for node in nodes:
        required = len(MOE_DISPATCH.required_inputs)
        if not required <= len(node.inputs) <= len(MOE_DISPATCH.inputs) or len(node.outputs) != 1:
            raise MoetrtError(f"plugin node {node.name} has {len(node.inputs)} inputs; the spec wants {required}+")
    return nodes


def lower(model: ir.Model, target: str, expert_slices: int = 1, moe_kernel: str = "onnxruntime") -> ir.Model:
    """Lower for `target`; `expert_slices` and `moe_kernel` apply to `ort` (see `ort.py`)."""
    import functools

    from moetrt.export.passes import ort, portable, trt

    passes = {"trt": trt.lower_trt, "ort": functools.partial(ort.lower_ort, expert_slices=expert_slices,
                                                       moe_kernel=moe_kernel),
              "onnx": portable.lower_portable}
    if target not in passes:
        raise MoetrtError(f"target {target!r} is not one of {', '.join(passes)}")
    passes[target](model)
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


def drop_unused_initializer(model: ir.Model, value: ir.Value) -> None:
    if value.name in model.graph.initializers and not value.uses():
        model.graph.initializers.pop(value.name)


def constant(tape, value, dtype=None) -> ir.Value:
    import numpy as np

    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(value, dtype=dtype))})
