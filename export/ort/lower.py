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

Quantized experts (nodes with `bits`: int8/int4 values, float16 scales per `group_size` input channels,
moetrt/quantization.py) lower to `com.microsoft::QMoE` or to the kernel's packed integer layout
(plugins/cpu_experts.py `pack_quantized`). QMoE stores each value unsigned with the implicit zero point
2^(bits-1) (its schema: 8 for int4, 128 for int8), so `q + 2^(bits-1)`, int4 two per byte, low nibble first.
It picks its experts from `router_probs` and mixes with `router_weights` (onnxruntime >= 1.32), so it gets 1 at
the chosen experts for the one and topk_weights for the other, with normalize_routing_weights=0: DeepSeek's
routing, exactly. Slices work as above; each slice is weighted by the full routing weight, the slices sum. Every
attribute is set but swiglu_limit (as for MoE) and the per-projection bit widths (they inherit expert_weight_bits).
Both quantize the activations to int8 per group in their integer GEMMs (QMOE_ACCURACY_LEVEL, and the kernel's
llama.cpp Q8_0 scheme).

After the experts, the projections that read one input are merged into one MatMul (export/ort/merge.py),
and each rotary embedding becomes one ONNX RotaryEmbedding node (export/ort/rope.py).

A quantized token embedding (two Gathers and a DequantizeLinear in the export, export/quantized.py) becomes one
`com.microsoft::GatherBlockQuantized` over int4 values (int8: uint8 offset by its implicit zero point 128), so
an int4 table is stored in 4 bits as llama.cpp's Q4_0 token_embd is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from moetrt.errors import MoetrtError
from moetrt.export.lowering import (
    LoweringPlan,
    constant,
    drop_unused_initializer,
    lazy_initializer,
    replace_node,
    routed_experts_nodes,
)
from moetrt.export.ort.merge import merge_sibling_projections
from moetrt.export.ort.rope import fuse_rotary_embeddings
from moetrt.plugins.spec import QUANTIZED_BITS_ATTRIBUTE
from moetrt.progress import note
from moetrt.quantization import pack_int4

MS_DOMAIN = "com.microsoft"
EXPERTS_DOMAIN, EXPERTS_OP = "moetrt.cpu", "Experts"
MOE_KERNELS = ("onnxruntime", "moetrt")
# QMoE's accuracy_level (MatMulNBits' meaning): 4 lets its int4 GEMMs quantize activations to int8 per block, as
# llama.cpp's Q8_0 activations; its int8 experts do so at every level (no fp32 kernel). ds-mini's shape (64
# experts of 1024x512, 6 active, g 32), 2 busy shared cores here: int4 3.2 ms at 4 vs 12.3 ms at 0 (batch 1), 18 vs
# 57 ms (batch 8).
QMOE_ACCURACY_LEVEL = 4

def interleave_gate_up(w_gate_up: np.ndarray) -> np.ndarray:
    """`[E, 2I, H]` gate rows then up rows -> rows g0, u0, g1, u1, ... (MoE's swiglu_fusion=1 layout)."""
    experts, rows, hidden = w_gate_up.shape
    return w_gate_up.reshape(experts, 2, rows // 2, hidden).transpose(0, 2, 1, 3).reshape(experts, rows, hidden)


def slice_experts(fc1: np.ndarray, fc2: np.ndarray, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved fc1 `[E, 2I, H]` and down `[E, H, I]` -> `[S*E, 2I/S, H]` and `[S*E, H, I/S]`, slice-major.
    Their block scales (`[E, 2I, H/g]`, `[E, H, I/g]`) slice the same way when (I/S) % g == 0."""
    return slice_fc1(fc1, slices), slice_fc2(fc2, slices)


def slice_fc1(fc1: np.ndarray, slices: int) -> np.ndarray:
    """The fc1 half of `slice_experts`: `[E, 2I, H]` -> `[S*E, 2I/S, H]`."""
    experts, rows, columns = fc1.shape
    fc1 = fc1.reshape(experts, slices, rows // slices, columns).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(fc1).reshape(slices * experts, rows // slices, columns)


def slice_fc2(fc2: np.ndarray, slices: int) -> np.ndarray:
    """The down half of `slice_experts`: `[E, H, I]` -> `[S*E, H, I/S]`."""
    experts, hidden, inter = fc2.shape
    fc2 = fc2.reshape(experts, hidden, slices, inter // slices).transpose(2, 0, 1, 3)
    return np.ascontiguousarray(fc2).reshape(slices * experts, hidden, inter // slices)


def _sliced_shape(shape, slices: int, axis: int) -> tuple[int, ...]:
    """`slice_fc1` (axis 1) / `slice_fc2` (axis 2) output shape for input `shape`."""
    dims = list(shape)
    dims[0], dims[axis] = dims[0] * slices, dims[axis] // slices
    return tuple(dims)


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def lower(model: ir.Model, plan: LoweringPlan) -> None:
    """Each routed-experts node as com.microsoft::MoE, or moetrt's CPU kernel node, as `plan` says."""
    expert_slices, moe_kernel = plan.expert_slices, plan.moe_kernel
    if moe_kernel not in MOE_KERNELS:
        raise MoetrtError(f"moe_kernel must be one of {', '.join(MOE_KERNELS)}, got {moe_kernel!r}")
    for node in routed_experts_nodes(model):
        quantized = expert_quantization(node)
        if quantized is None and len(node.inputs) > 5 and node.inputs[5] is not None:
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
        if quantized is not None:
            bits, group = quantized
            if (inter // expert_slices) % group:
                raise MoetrtError(f"{node.name}: {expert_slices} expert slices of {inter} channels are not whole "
                                  f"groups of {group}; build with OrtOptions(expert_slices=S), S dividing "
                                  f"{inter // group}")
            if moe_kernel == "moetrt":
                _lower_quantized_to_kernel(model, node, expert_slices, bits, group)
            else:
                _lower_to_qmoe(model, node, expert_slices, top_k, bits, group)
            continue
        if moe_kernel == "moetrt":
            _lower_to_kernel(model, node, expert_slices)
            continue
        dtype_of = w_gate_up.const_value.dtype
        fc1_shape = _sliced_shape(w_gate_up.shape, expert_slices, 1)
        fc1 = lazy_initializer(model, w_gate_up.name + ".interleaved",
                               lambda w=w_gate_up, s=expert_slices: slice_fc1(interleave_gate_up(_array(w)), s),
                               dtype_of, fc1_shape)
        fc2 = w_down
        if expert_slices > 1:
            fc2 = lazy_initializer(model, f"{w_down.name}.sliced{expert_slices}",
                                   lambda w=w_down, s=expert_slices: slice_fc2(_array(w), s), w_down.const_value.dtype,
                                   _sliced_shape(w_down.shape, expert_slices, 2))
        tape = Tape()
        dtype = hidden.dtype.value  # ONNX TensorProto enum for Cast
        router_probs = _expert_columns(tape, hidden, topk_ids, tape.op("Log", [topk_weights]), num_experts,
                                       -np.inf)  # [T, E]
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
    merged = merge_sibling_projections(model)
    if merged:
        note(f"merged projections: {merged} MatMuls fewer (q_a with kv_a, gate with up: export/ort/merge.py)")
    rotary = fuse_rotary_embeddings(model)
    if rotary:
        note(f"rotary embeddings: {rotary} as ONNX RotaryEmbedding nodes (export/ort/rope.py)")
    if moe_kernel == "moetrt":
        model.opset_imports[EXPERTS_DOMAIN] = 1
    embeddings = _lower_quantized_embedding(model)
    if moe_kernel != "moetrt" or embeddings:
        model.opset_imports[MS_DOMAIN] = 1


def _lower_quantized_embedding(model: ir.Model) -> int:
    """Gather(q) + Gather(scale) + DequantizeLinear (marked with the values' bits) -> GatherBlockQuantized; returns
    how many were rewritten (a graph has one embedding)."""
    from moetrt.export.quantized import GATHERED_BITS

    count = 0
    for node in [n for n in model.graph if n.op_type == "DequantizeLinear" and GATHERED_BITS in n.metadata_props]:
        bits = int(node.metadata_props[GATHERED_BITS])
        gather_q, gather_scale = (value.producer() for value in node.inputs[:2])
        if any(g is None or g.op_type != "Gather" or g.inputs[0].const_value is None
               for g in (gather_q, gather_scale)):
            raise MoetrtError(f"{node.name}: a quantized embedding must gather from initializers; re-export")
        table, scales = gather_q.inputs[0], gather_scale.inputs[0]
        # one table for every Gather of it (an --mtp graph embeds the drafts' tokens too)
        data = model.graph.initializers.get(f"{table.name}.int4" if bits == 4 else f"{table.name}.uint8")
        if data is None and bits == 4:
            data = lazy_initializer(model, f"{table.name}.int4", lambda t=table: _array(t), ir.DataType.INT4,
                                    table.shape)
        elif data is None:  # uint8 with the implicit zero point 128
            data = lazy_initializer(model, f"{table.name}.uint8",
                                    lambda t=table: (_array(t).astype(np.int16) + 128).astype(np.uint8),
                                    ir.DataType.UINT8, table.shape)
        tape = Tape()
        out = tape.op("GatherBlockQuantized", [data, gather_q.inputs[1], scales],
                      {"gather_axis": 0, "quantize_axis": 1, "bits": bits,
                       "block_size": node.attributes["block_size"].as_int()}, domain=MS_DOMAIN)
        replace_node(node, tape.nodes, out)
        for gather in (gather_q, gather_scale):
            model.graph.remove(gather, safe=True)
        drop_unused_initializer(model, table)
        count += 1
    return count


def _lower_to_kernel(model: ir.Model, node: ir.Node, slices: int) -> None:
    """The routed-experts node -> `moetrt.cpu::Experts(hidden, topk_ids, topk_weights, gate_up, down)`, packed."""
    from moetrt.plugins.cpu_experts import (pack_down, pack_gate_up, packed_down_shape, packed_gate_up_shape,
                                            supported)

    w_gate_up, w_down = node.inputs[3:5]
    num_experts, hidden_size, inter = w_down.shape[0], w_down.shape[1], w_down.shape[2]
    reason = supported(hidden_size, inter, slices)
    if reason:
        raise MoetrtError(f"{node.name}: the moetrt expert kernel cannot run these experts: {reason}")
    dtype = w_gate_up.const_value.dtype
    gate_up = lazy_initializer(model, f"{w_gate_up.name}.packed{slices}",
                               lambda: _per_expert(lambda w: pack_gate_up(interleave_gate_up(w), slices),
                                                   _array(w_gate_up)),
                               dtype, packed_gate_up_shape(num_experts, inter, hidden_size, slices))
    down = lazy_initializer(model, f"{w_down.name}.packed{slices}",
                            lambda: _per_expert(lambda w: pack_down(w, slices), _array(w_down)), dtype,
                            packed_down_shape(num_experts, hidden_size, inter, slices))
    _emit_kernel_node(model, node, (gate_up, down), {"num_experts": num_experts, "hidden_size": hidden_size,
                                                     "intermediate_size": inter, "slices": slices})


def _emit_kernel_node(model: ir.Model, node: ir.Node, packed: tuple[ir.Value, ir.Value],
                      attributes: dict[str, int]) -> None:
    """Replace `node` by `moetrt.cpu::Experts(hidden, topk_ids, topk_weights, gate_up, down)` over the `packed`
    initializers."""
    hidden, topk_ids, topk_weights = node.inputs[:3]
    replaced = [value for value in node.inputs[3:] if value is not None]
    gate_up, down = packed
    tape = Tape()
    out = tape.op(EXPERTS_OP, [hidden, topk_ids, topk_weights, gate_up, down], attributes, domain=EXPERTS_DOMAIN)
    replace_node(node, tape.nodes, out)
    for value in replaced:
        drop_unused_initializer(model, value)


def expert_quantization(node: ir.Node) -> tuple[int, int] | None:
    """(bits, group_size) of a routed-experts node holding int8/int4 experts (plugins/spec.py), else None."""
    bits = node.attributes.get(QUANTIZED_BITS_ATTRIBUTE)
    if bits is None:
        return None
    block = node.attributes["block_size"].as_ints()
    if bits.as_int() not in (8, 4) or len(block) != 2 or block[0] != 1 or len(node.inputs) < 7:
        raise MoetrtError(f"{node.name}: quantized experts need bits 8 or 4, block_size [1, g] and both scales; "
                          "re-export the checkpoint")
    return bits.as_int(), block[1]


def _quantized_inputs(node: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """The node's (gate_up values [E, 2I, H] int8, their scales [E, 2I, H/g] float16, down values [E, H, I], their
    scales [E, H, I/g]), checked to be initializers."""
    w_gate_up, w_down, gate_up_scale, down_scale = node.inputs[3:7]
    if any(value.const_value is None for value in (w_gate_up, w_down, gate_up_scale, down_scale)):
        raise MoetrtError(f"{node.name}: expert weights and scales must be initializers for the ort lowering")
    return w_gate_up, gate_up_scale, w_down, down_scale


def _per_expert(pack, *arrays: np.ndarray) -> np.ndarray:
    """`pack(*arrays)` for an expert-major packed layout, computed one expert at a time into one array (the packing's
    temporaries stay one expert's, not a layer's)."""
    first = pack(*(array[:1] for array in arrays))
    out = np.empty((arrays[0].shape[0] * first.shape[0], *first.shape[1:]), first.dtype)
    step = first.shape[0]
    out[:step] = first
    for expert in range(1, arrays[0].shape[0]):
        out[expert * step : (expert + 1) * step] = pack(*(array[expert : expert + 1] for array in arrays))
    return out


def _lower_quantized_to_kernel(model: ir.Model, node: ir.Node, slices: int, bits: int, group: int) -> None:
    """A quantized routed-experts node -> moetrt.cpu::Experts over the kernel's packed integer blocks."""
    from moetrt.plugins.cpu_experts import (pack_quantized_down, pack_quantized_gate_up, packed_quantized_bytes,
                                            supported_quantized)

    num_experts, hidden_size, inter = node.inputs[4].shape[0], node.inputs[4].shape[1], node.inputs[4].shape[2]
    reason = supported_quantized(hidden_size, inter, slices, bits, group)
    if reason:
        raise MoetrtError(f"{node.name}: the moetrt expert kernel cannot run these experts: {reason}")
    fc1_q, fc1_d, down_q, down_d = _quantized_inputs(node)
    gate_up = lazy_initializer(
        model, f"{fc1_q.name}.packed{slices}",
        lambda: _per_expert(lambda q, d: pack_quantized_gate_up(interleave_gate_up(q), interleave_gate_up(d), bits,
                                                                group, slices), _array(fc1_q), _array(fc1_d)),
        ir.DataType.UINT8, (packed_quantized_bytes(num_experts, 2 * inter, hidden_size, bits, group),))
    down = lazy_initializer(
        model, f"{down_q.name}.packed{slices}",
        lambda: _per_expert(lambda q, d: pack_quantized_down(q, d, bits, group, slices), _array(down_q),
                            _array(down_d)),
        ir.DataType.UINT8, (packed_quantized_bytes(num_experts, hidden_size, inter, bits, group),))
    _emit_kernel_node(model, node, (gate_up, down), {"num_experts": num_experts, "hidden_size": hidden_size,
                                                     "intermediate_size": inter, "slices": slices, "bits": bits,
                                                     "group_size": group})


def qmoe_weights(q: np.ndarray, bits: int) -> np.ndarray:
    """int8 values `[..., K]` in [-2^(bits-1), 2^(bits-1)) -> QMoE's unsigned storage: `q + 2^(bits-1)` as uint8
    (its implicit zero point), int4 two per byte, low nibble first: `[..., K * bits / 8]`."""
    unsigned = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    return np.ascontiguousarray(pack_int4(unsigned) if bits == 4 else unsigned)


def _lower_to_qmoe(model: ir.Model, node: ir.Node, slices: int, top_k: int, bits: int, group: int) -> None:
    """A quantized routed-experts node -> com.microsoft::QMoE, selection and mixing weights apart (module doc)."""
    hidden, topk_ids, topk_weights, w_gate_up, w_down = node.inputs[:5]
    num_experts = w_down.shape[0]
    fc1_q, fc1_d, down_q, down_d = _quantized_inputs(node)
    scale_dtype = np.float16 if hidden.dtype == ir.DataType.FLOAT16 else np.float32
    fc1_shape = _sliced_shape(fc1_q.shape, slices, 1)
    fc2_shape = _sliced_shape(down_q.shape, slices, 2)
    packed_dims = lambda shape: (*shape[:-1], shape[-1] * bits // 8)  # noqa: E731
    fc1 = lazy_initializer(model, f"{fc1_q.name}.qmoe{slices}",
                           lambda: qmoe_weights(slice_fc1(interleave_gate_up(_array(fc1_q)), slices), bits),
                           ir.DataType.UINT8, packed_dims(fc1_shape))
    fc2 = lazy_initializer(model, f"{down_q.name}.qmoe{slices}",
                           lambda: qmoe_weights(slice_fc2(_array(down_q), slices), bits), ir.DataType.UINT8,
                           packed_dims(fc2_shape))
    # Scales in the activations' dtype (the float16-rounded values, exactly): with float16 scales for float32
    # activations ONNX Runtime inserts a Cast, and QMoE, its scales no longer an initializer, falls back to
    # dequantizing the experts and a float GEMM on every call (its PrePackQNBitExperts warning).
    fc1_scales = lazy_initializer(
        model, f"{fc1_d.name}.qmoe{slices}",
        lambda: np.ascontiguousarray(slice_fc1(interleave_gate_up(_array(fc1_d)), slices), scale_dtype),
        ir.DataType.from_numpy(np.dtype(scale_dtype)), _sliced_shape(fc1_d.shape, slices, 1))
    fc2_scales = lazy_initializer(
        model, f"{down_d.name}.qmoe{slices}",
        lambda: np.ascontiguousarray(slice_fc2(_array(down_d), slices), scale_dtype),
        ir.DataType.from_numpy(np.dtype(scale_dtype)), _sliced_shape(down_d.shape, slices, 2))
    tape = Tape()
    dtype = hidden.dtype.value
    ones = tape.op("Expand", [constant(tape, [[1.0]], np.float32), tape.op("Shape", [topk_weights])])
    selected = _expert_columns(tape, hidden, topk_ids, ones, num_experts, 0.0)  # [T, E]: 1 where chosen
    mixing = _expert_columns(tape, hidden, topk_ids, topk_weights, num_experts, 0.0)  # [T, E]: topk_weights
    if slices > 1:  # every slice of an expert gets its column, and the expert's whole weight
        selected, mixing = (tape.op("Concat", [columns] * slices, {"axis": 1}) for columns in (selected, mixing))
    selected, mixing = (tape.op("Cast", [columns], {"to": dtype}) for columns in (selected, mixing))
    out = tape.op(
        "QMoE",
        [hidden, selected, fc1, fc1_scales, None, fc2, fc2_scales, *([None] * 7), mixing],
        {
            "k": top_k * slices,
            "activation_type": "swiglu",
            "swiglu_fusion": 1,
            "activation_alpha": 1.0,
            "activation_beta": 0.0,
            "normalize_routing_weights": 0,
            "use_sparse_mixer": 0,
            "quant_type": "int",
            "expert_weight_bits": bits,
            "block_size": group,
            "weights_prepacked": 0,
            "accuracy_level": QMOE_ACCURACY_LEVEL,
        },
        domain=MS_DOMAIN,
    )
    replaced = [value for value in node.inputs[3:] if value is not None]
    replace_node(node, tape.nodes, out)
    for value in replaced:
        drop_unused_initializer(model, value)


def _expert_columns(tape: Tape, hidden: ir.Value, topk_ids: ir.Value, values: ir.Value, num_experts: int,
                    fill: float) -> ir.Value:
    """`[T, E]` float32: `values [T, k]` at each token's chosen experts, `fill` elsewhere."""
    tokens = tape.op("Shape", [hidden], {"start": 0, "end": 1})
    width = tape.op("Concat", [tokens, constant(tape, [num_experts], np.int64)], {"axis": 0})
    background = tape.op("Expand", [constant(tape, [[fill]], np.float32), width])
    ids = tape.op("Cast", [topk_ids], {"to": ir.DataType.INT64.value})
    return tape.op("ScatterElements", [background, ids, values], {"axis": 1})
