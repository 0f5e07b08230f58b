"""The `ort` lowering: each routed-experts node becomes ONNX Runtime's `com.microsoft::MoE`, exactly.

MoE picks its own top-k from router probabilities, so it is fed `log(w)` at the chosen experts and -inf
elsewhere: its softmax then reproduces `w / sum(w)` on exactly those experts (`normalize_routing_weights=1`),
and the output is rescaled by `sum(w)`. Gate and up rows are interleaved (`swiglu_fusion=1`). Every
attribute is set explicitly except `swiglu_limit`, whose absence means no clamp: older kernels defaulted
to GPT-OSS's clamped SwiGLU, so this lowering is exact on onnxruntime >= 1.32 (pyproject pins it).

Expert slices, for the CPU kernel: it splits the expert index range statically between its threads, so at
batch 1 (6 of 64 experts active) one thread often gets most of the work and the other waits: that cost a
third of the MoE time on 2 cores. With `expert_slices=S` each expert is cut along its intermediate dimension
into S sub-experts (SwiGLU is per channel and the down projection sums over channels, so the slices add up to
the expert), laid out slice-major: `[S * E]`, slice s of every expert in the s-th range. The router columns
are repeated S times and k becomes S*k, so with S threads each thread does exactly one slice of every chosen
expert. The weights are only rearranged, not copied.

`moe_kernel="moetrt"` lowers each routed-experts node to `moetrt.cpu::Experts` instead: moetrt's own CPU kernel
(plugins/cpu_experts.c), which reads each chosen expert once for all its rows from a packed layout. ONNX
Runtime cannot run that node; the engine build cuts the graph at these nodes (export/ort/split.py) and the runtime
calls the kernel between the pieces.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from moetrt.errors import MoetrtError
from moetrt.export.lowering import (
    LoweringPlan,
    add_initializer,
    constant,
    drop_unused_initializer,
    replace_node,
    routed_experts_nodes,
)

MS_DOMAIN = "com.microsoft"
EXPERTS_DOMAIN, EXPERTS_OP = "moetrt.cpu", "Experts"
MOE_KERNELS = ("onnxruntime", "moetrt")

def interleave_gate_up(w_gate_up: np.ndarray) -> np.ndarray:
    """`[E, 2I, H]` gate rows then up rows -> rows g0, u0, g1, u1, ... (MoE's swiglu_fusion=1 layout)."""
    experts, rows, hidden = w_gate_up.shape
    return w_gate_up.reshape(experts, 2, rows // 2, hidden).transpose(0, 2, 1, 3).reshape(experts, rows, hidden)


def slice_experts(fc1: np.ndarray, fc2: np.ndarray, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved fc1 `[E, 2I, H]` and down `[E, H, I]` -> `[S*E, 2I/S, H]` and `[S*E, H, I/S]`, slice-major."""
    experts, rows, hidden = fc1.shape
    inter = fc2.shape[2]
    fc1 = fc1.reshape(experts, slices, rows // slices, hidden).transpose(1, 0, 2, 3)
    fc2 = fc2.reshape(experts, hidden, slices, inter // slices).transpose(2, 0, 1, 3)
    return (np.ascontiguousarray(fc1).reshape(slices * experts, rows // slices, hidden),
            np.ascontiguousarray(fc2).reshape(slices * experts, hidden, inter // slices))


def lower(model: ir.Model, plan: LoweringPlan) -> None:
    """Each routed-experts node as com.microsoft::MoE, or moetrt's CPU kernel node, as `plan` says."""
    expert_slices, moe_kernel = plan.expert_slices, plan.moe_kernel
    if moe_kernel not in MOE_KERNELS:
        raise MoetrtError(f"moe_kernel must be one of {', '.join(MOE_KERNELS)}, got {moe_kernel!r}")
    for node in routed_experts_nodes(model):
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            raise MoetrtError("the ort lowering takes dequantised experts; export fp8 checkpoints dequantised")
        hidden, topk_ids, topk_weights, w_gate_up, w_down = node.inputs[:5]
        if w_gate_up.const_value is None:
            raise MoetrtError(f"{node.name}: expert weights must be initializers for the ort lowering")
        top_k = topk_ids.shape[-1] if topk_ids.shape is not None else None
        if not isinstance(top_k, int):
            raise MoetrtError(f"{node.name}: the number of active experts must be static")
        num_experts, inter = w_gate_up.shape[0], w_down.shape[2]
        if expert_slices < 1 or inter % expert_slices:
            raise MoetrtError(f"expert_slices must divide moe_intermediate_size {inter}, got {expert_slices}")
        fc1_array = interleave_gate_up(w_gate_up.const_value.numpy())
        if moe_kernel == "moetrt":
            _lower_to_kernel(model, node, fc1_array, expert_slices)
            continue
        fc2 = w_down
        if expert_slices > 1:
            fc1_array, fc2_array = slice_experts(fc1_array, w_down.const_value.numpy(), expert_slices)
            fc2 = add_initializer(model, fc2_array, f"{w_down.name}.sliced{expert_slices}")
        fc1 = add_initializer(model, fc1_array, w_gate_up.name + ".interleaved")
        tape = Tape()
        dtype = hidden.dtype.value  # ONNX TensorProto enum for Cast
        tokens = tape.op("Shape", [hidden], {"start": 0, "end": 1})
        width = tape.op("Concat", [tokens, constant(tape, [num_experts], np.int64)], {"axis": 0})
        minus_inf = tape.op("Expand", [constant(tape, [[-np.inf]], np.float32), width])
        ids = tape.op("Cast", [topk_ids], {"to": ir.DataType.INT64.value})
        log_weights = tape.op("Log", [topk_weights])
        router_probs = tape.op("ScatterElements", [minus_inf, ids, log_weights], {"axis": 1})  # [T, E]
        if expert_slices > 1:  # every slice of an expert gets its column
            router_probs = tape.op("Concat", [router_probs] * expert_slices, {"axis": 1})
        router_probs = tape.op("Cast", [router_probs], {"to": dtype})
        moe = tape.op(
            "MoE",
            [hidden, router_probs, fc1, None, fc2],
            {
                "k": top_k * expert_slices,
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
        if expert_slices > 1:  # the kernel normalised over S*k columns
            weight_sum = tape.op("Mul", [weight_sum, constant(tape, [float(expert_slices)], np.float32)])
        scaled = tape.op("Mul", [moe, tape.op("Cast", [weight_sum], {"to": dtype})])
        replace_node(node, tape.nodes, scaled)
        drop_unused_initializer(model, w_gate_up)
        drop_unused_initializer(model, w_down)
    model.opset_imports.pop("moetrt", None)
    if moe_kernel == "moetrt":
        model.opset_imports[EXPERTS_DOMAIN] = 1
    else:
        model.opset_imports[MS_DOMAIN] = 1


def _lower_to_kernel(model: ir.Model, node: ir.Node, fc1: np.ndarray, slices: int) -> None:
    """The routed-experts node -> `moetrt.cpu::Experts(hidden, topk_ids, topk_weights, gate_up, down)`, packed."""
    from moetrt.plugins.cpu_experts import pack_down, pack_gate_up, supported

    hidden, topk_ids, topk_weights, w_gate_up, w_down = node.inputs[:5]
    num_experts, hidden_size, inter = w_down.shape[0], w_down.shape[1], w_down.shape[2]
    reason = supported(hidden_size, inter, slices)
    if reason:
        raise MoetrtError(f"{node.name}: the moetrt expert kernel cannot run these experts: {reason}")
    gate_up = add_initializer(model, pack_gate_up(fc1, slices), f"{w_gate_up.name}.packed{slices}")
    down = add_initializer(model, pack_down(w_down.const_value.numpy(), slices), f"{w_down.name}.packed{slices}")
    tape = Tape()
    out = tape.op(EXPERTS_OP, [hidden, topk_ids, topk_weights, gate_up, down],
                  {"num_experts": num_experts, "hidden_size": hidden_size, "intermediate_size": inter,
                   "slices": slices}, domain=EXPERTS_DOMAIN)
    replace_node(node, tape.nodes, out)
    drop_unused_initializer(model, w_gate_up)
    drop_unused_initializer(model, w_down)
