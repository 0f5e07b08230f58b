"""The `trt` lowering: each routed-experts node becomes four single-kernel plugin nodes for TensorRT's ONNX parser.

`moetrt::MoeAlign -> MoeGateUp -> MoeDown -> MoeCombine` (plugins/spec.py's MOE_STAGES), intermediates as plugin
outputs, so each node has an ahead-of-time implementation of exactly one kernel and an engine runs without Python.
Every node carries the `launch` attribute (static dimensions, dtype, the decode and the prefill block sizes) and,
for the parser's plugin lookup, `plugin_version` and `plugin_namespace`: a node with `plugin_namespace` is looked up
in that namespace; one without it is tried as a plugin only because no ONNX importer has its op type, in namespace
"" (and, in some parsers, the node's domain after that).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.tape import Tape

from moetrt.errors import MoetrtError
from moetrt.export.lowering import LoweringPlan, replace_node, routed_experts_nodes
from moetrt.plugins.moe_launch import ExpertDims
from moetrt.export.trt.plan import QUANTIZED_REFUSAL
from moetrt.plugins.spec import LAUNCH_ATTRIBUTE, MOE_STAGES, QUANTIZED_BITS_ATTRIBUTE, ROUTED_EXPERTS
from moetrt.plugins.trt_stages import StageAttribute

DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
IR_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()} | {"int32": ir.DataType.INT32}


def lower(model: ir.Model, plan: LoweringPlan) -> None:
    """Each routed-experts node as the four stage plugin nodes, for TensorRT's ONNX parser."""
    for index, node in enumerate(routed_experts_nodes(model)):
        attribute = stage_attribute(node)
        hidden, topk_ids, topk_weights, w_gate_up, w_down = node.inputs[:5]
        tape = Tape()
        aligned = stage(tape, "align", [topk_ids], attribute, index)
        act = stage(tape, "gate_up", [hidden, w_gate_up, *aligned], attribute, index)
        expert_out = stage(tape, "down", [act[0], w_down, topk_weights, *aligned], attribute, index)
        output = stage(tape, "combine", [expert_out[0]], attribute, index)
        replace_node(node, tape.nodes, output[0])
    model.opset_imports[ROUTED_EXPERTS.domain] = ROUTED_EXPERTS.version


def stage_attribute(node: ir.Node) -> StageAttribute:
    """The `launch` attribute for one routed-experts node, from its weights' shapes and dtypes."""
    if QUANTIZED_BITS_ATTRIBUTE in node.attributes:
        raise MoetrtError(QUANTIZED_REFUSAL)
    if len(node.inputs) > 5 and node.inputs[5] is not None:
        raise MoetrtError("the trt lowering takes dequantised experts; export fp8 checkpoints dequantised")
    hidden, topk_ids, _, w_gate_up, w_down = node.inputs[:5]
    dtypes = {value.dtype for value in (hidden, w_gate_up, w_down)}
    if len(dtypes) != 1 or hidden.dtype not in DTYPE_NAMES:
        raise MoetrtError(f"{node.name}: the TensorRT stages take hidden and expert weights in one of "
                          f"{', '.join(DTYPE_NAMES.values())}; got {sorted(str(d) for d in dtypes)}")
    top_k = topk_ids.shape[-1] if topk_ids.shape is not None else None
    if w_gate_up.shape is None or not isinstance(top_k, int) or not w_gate_up.shape.is_static():
        raise MoetrtError(f"{node.name}: expert weights and the number of active experts must be static")
    experts, two_inter, hidden_size = (int(d) for d in w_gate_up.shape)
    dims = ExpertDims(hidden_size, two_inter // 2, experts, top_k)
    # One PTX per stage and tactic serves every T of a profile: the decode and prefill block sizes are both picked
    # here, and each profile runs one (plugins/trt_stages.py).
    return StageAttribute.select(dims, DTYPE_NAMES[hidden.dtype])


def stage(tape: Tape, name: str, inputs: list, attribute: StageAttribute, index: int) -> list[ir.Value]:
    """Record one stage node; its outputs get the spec's names (prefixed per layer) and dtypes."""
    spec = MOE_STAGES[name]
    outputs = tape.op_multi_out(
        spec.op_type,
        inputs,
        {
            LAUNCH_ATTRIBUTE: attribute.encode(),
            "plugin_version": str(spec.version),
            "plugin_namespace": spec.domain,
        },
        domain=spec.domain,
        num_outputs=len(spec.outputs),
    )
    for value, output in zip(outputs, spec.outputs):
        value.name = f"moe{index}.{output.name}"
        dtype = "int32" if output.dtypes == ("int32",) else attribute.dtype
        value.type = ir.TensorType(IR_DTYPES[dtype])
        value.shape = ir.Shape([None] * len(output.shape))
    tape.nodes[-1].name = f"moe{index}.{name}"
    return list(outputs)
