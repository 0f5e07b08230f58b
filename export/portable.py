"""The `onnx` lowering: each routed-experts node becomes standard ONNX ops, for any runtime (and TensorRT without
the plugin).

A `Loop` over experts gathers the tokens routed to expert e (NonZero), runs its SwiGLU MLP on just those
rows and adds the weighted result into an fp32 accumulator. Each token picks an expert at most once, so the
rows of one iteration are distinct and a plain ScatterND (no reduction attribute) can write the sums.
Work is proportional to the tokens actually routed, not to tokens x experts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from moetrt.errors import MoetrtError
from moetrt.export.lowering import LoweringPlan, constant, replace_node, routed_experts_nodes
from moetrt.plugins.spec import QUANTIZED_BITS_ATTRIBUTE

OPSET = 21


def _expert_body(node: ir.Node, index: int) -> ir.Graph:
    """Loop body: (expert e, cond, acc [T, H] fp32) -> (cond, acc + scatter(rows of e, w * expert_e(x)))."""
    hidden, topk_ids, topk_weights, w_gate_up, w_down = node.inputs[:5]
    intermediate = w_down.shape[2]
    prefix = f"moe{index}"
    expert = ir.Value(name=f"{prefix}.expert", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name=f"{prefix}.cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    acc = ir.Value(name=f"{prefix}.acc", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, None]))

    tape = Tape()
    chosen = tape.op("Equal", [topk_ids, tape.op("Cast", [expert], {"to": ir.DataType.INT32.value})])  # [T, k]
    zero = constant(tape, 0.0, np.float32)
    weight = tape.op("ReduceSum", [tape.op("Where", [chosen, topk_weights, zero]), constant(tape, [1], np.int64)],
                     {"keepdims": 0})  # [T]
    # A float mask: TensorRT's NonZero takes only FP32/FP16 (export/trt/support.py).
    hit = tape.op("ReduceMax", [tape.op("Cast", [chosen], {"to": ir.DataType.FLOAT.value}),
                                constant(tape, [1], np.int64)], {"keepdims": 0})
    rows = tape.op("Reshape", [tape.op("NonZero", [hit]), constant(tape, [-1], np.int64)])  # [n]
    x = tape.op("Gather", [hidden, rows], {"axis": 0})  # [n, H]
    gate_up = tape.op("Gemm", [x, tape.op("Gather", [w_gate_up, expert], {"axis": 0})], {"transB": 1})  # [n, 2I]
    gate, up = tape.op_multi_out(
        "Split", [gate_up, constant(tape, [intermediate, intermediate], np.int64)], {"axis": 1}, num_outputs=2
    )
    act = tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])
    y = tape.op("Gemm", [act, tape.op("Gather", [w_down, expert], {"axis": 0})], {"transB": 1})  # [n, H]
    row_weight = tape.op("Unsqueeze", [tape.op("Gather", [weight, rows], {"axis": 0}), constant(tape, [1], np.int64)])
    y = tape.op("Mul", [tape.op("Cast", [y], {"to": ir.DataType.FLOAT.value}), row_weight])
    index_rows = tape.op("Unsqueeze", [rows, constant(tape, [1], np.int64)])  # [n, 1]
    summed = tape.op("Add", [tape.op("GatherND", [acc, index_rows]), y])
    acc_out = tape.op("ScatterND", [acc, index_rows, summed])
    cond_out = tape.op("Identity", [cond])
    for number, body_node in enumerate(tape.nodes):  # subgraph names must not collide with the outer graph's
        body_node.name = f"{prefix}.node{number}"
        for output_number, output in enumerate(body_node.outputs):
            output.name = f"{prefix}.v{number}_{output_number}"
    return ir.Graph([expert, cond, acc], [cond_out, acc_out], nodes=tape.nodes, opset_imports={"": OPSET},
                    name=f"{prefix}_expert_loop")


def lower(model: ir.Model, plan: LoweringPlan) -> None:
    """Each routed-experts node as standard ONNX ops (a Loop over the experts): any runtime can run it."""
    for index, node in enumerate(routed_experts_nodes(model)):
        if QUANTIZED_BITS_ATTRIBUTE in node.attributes:
            raise MoetrtError("the standard-ops (onnx) target has no quantized experts yet; export the quantized "
                              "model with --target ort")
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            raise MoetrtError("the onnx lowering takes dequantised experts; export fp8 checkpoints dequantised")
        hidden, w_gate_up = node.inputs[0], node.inputs[3]
        tape = Tape()
        zeros = tape.op("ConstantOfShape", [tape.op("Shape", [hidden])],
                        {"value": ir.tensor(np.zeros(1, dtype=np.float32))})
        trip_count = constant(tape, w_gate_up.shape[0], np.int64)
        keep_going = constant(tape, True, np.bool_)
        summed = tape.op("Loop", [trip_count, keep_going, zeros], {"body": _expert_body(node, index)})
        out = tape.op("Cast", [summed], {"to": hidden.dtype.value})
        replace_node(node, tape.nodes, out)
    model.opset_imports.pop("moetrt", None)
