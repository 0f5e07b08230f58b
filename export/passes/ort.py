"""The `ort` lowering: each dispatch node becomes ONNX Runtime's `com.microsoft::MoE`, exactly.

MoE picks its own top-k from router probabilities, so it is fed `log(w)` at the chosen experts and -inf
elsewhere: its softmax then reproduces `w / sum(w)` on exactly those experts (`normalize_routing_weights=1`),
and the output is rescaled by `sum(w)`. Gate and up rows are interleaved (`swiglu_fusion=1`). Every
attribute is set explicitly except `swiglu_limit`, whose absence means no clamp: older kernels defaulted
to GPT-OSS's clamped SwiGLU, so this lowering is exact on onnxruntime >= 1.32 (pyproject pins it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from moetrt.errors import MoetrtError
from moetrt.export.passes import replace_node, add_initializer, constant, dispatch_nodes, drop_unused_initializer

MS_DOMAIN = "com.microsoft"


def interleave_gate_up(w_gate_up: np.ndarray) -> np.ndarray:
    """`[E, 2I, H]` gate rows then up rows -> rows g0, u0, g1, u1, ... (MoE's swiglu_fusion=1 layout)."""
    experts, rows, hidden = w_gate_up.shape
    return w_gate_up.reshape(experts, 2, rows // 2, hidden).transpose(0, 2, 1, 3).reshape(experts, rows, hidden)


def lower_ort(model: ir.Model) -> None:
    for node in dispatch_nodes(model):
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            raise MoetrtError("the ort lowering takes dequantised experts; export fp8 checkpoints dequantised")
        hidden, topk_ids, topk_weights, w_gate_up, w_down = node.inputs[:5]
        if w_gate_up.const_value is None:
            raise MoetrtError(f"{node.name}: expert weights must be initializers for the ort lowering")
        top_k = topk_ids.shape[-1] if topk_ids.shape is not None else None
        if not isinstance(top_k, int):
            raise MoetrtError(f"{node.name}: the number of active experts must be static")
        num_experts = w_gate_up.shape[0]
        fc1 = add_initializer(model, interleave_gate_up(w_gate_up.const_value.numpy()), w_gate_up.name + ".interleaved")
        tape = Tape()
        dtype = hidden.dtype.value  # ONNX TensorProto enum for Cast
        tokens = tape.op("Shape", [hidden], {"start": 0, "end": 1})
        width = tape.op("Concat", [tokens, constant(tape, [num_experts], np.int64)], {"axis": 0})
        minus_inf = tape.op("Expand", [constant(tape, [[-np.inf]], np.float32), width])
        ids = tape.op("Cast", [topk_ids], {"to": ir.DataType.INT64.value})
        log_weights = tape.op("Log", [topk_weights])
        router_probs = tape.op("ScatterElements", [minus_inf, ids, log_weights], {"axis": 1})  # [T, E]
        router_probs = tape.op("Cast", [router_probs], {"to": dtype})
        moe = tape.op(
            "MoE",
            [hidden, router_probs, fc1, None, w_down],
            {
                "k": top_k,
                "activation_type": "swiglu",
                "swiglu_fusion": 1,
                "activation_alpha": 1.0,
                "activation_beta": 0.0,
                "normalize_routing_weights": 1,
                "use_sparse_mixer": 0,
            },
            domain=MS_DOMAIN,
        )
        weight_sum = tape.op("ReduceSum", [topk_weights, constant(tape, [1], np.int64)], {"keepdims": 1})
        scaled = tape.op("Mul", [moe, tape.op("Cast", [weight_sum], {"to": dtype})])
        replace_node(node, tape.nodes, scaled)
        drop_unused_initializer(model, w_gate_up)
    model.opset_imports.pop("moetrt", None)
    model.opset_imports[MS_DOMAIN] = 1
