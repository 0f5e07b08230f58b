"""Merged projections: the MatMuls that read one input become one MatMul over their weights side by side.

DeepSeek's layers project each input more than once: the attention input through `q_a_proj` and
`kv_a_proj_with_mqa` (`q_proj` and `kv_a_proj_with_mqa` without a query LoRA), an MLP's input through `gate_proj`
and `up_proj`. At decode each of those is a small GEMV whose fixed cost in ONNX Runtime (MatMulNBits: about 20 us
on 2 cores whatever the width) outweighs its bytes, so the ort lowering concatenates such weights along their output
columns and splits the one product, as vLLM's `MergedColumnParallelLinear` (gate_up_proj) and SGLang's DeepSeek
`fused_qkv_a_proj_with_mqa` do. Each output column is the same dot product as before, so the result is unchanged.

Weights are either plain 2-D initializers `[K, N]` or block-quantized ones behind `DequantizeLinear` (export/
quantized.py: values `[K, N]`, scales `[K / group, N]`, blocks along axis 0); projections merge only with others of
the same kind, dtype and blocking. The merged weights are lazy initializers: in a streaming build they are read,
concatenated and written one pair at a time (export/streaming.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from moetrt.export.lowering import constant, drop_unused_initializer, lazy_initializer


def merge_sibling_projections(model: ir.Model) -> int:
    """Rewrite, in place, each group of two or more MatMuls of one input by initializer weights (plain or
    DequantizeLinear'd) into one MatMul and a Split; returns how many MatMuls were removed."""
    groups: dict[tuple, list[tuple[ir.Node, tuple]]] = {}
    for node in model.graph:
        weight = _projection_weight(node)
        if weight is not None:
            groups.setdefault((id(node.inputs[0]), weight[0]), []).append((node, weight))
    removed = 0
    for members in groups.values():
        if len(members) > 1:
            _merge(model, members)
            removed += len(members) - 1
    return removed


def _projection_weight(node: ir.Node) -> tuple | None:
    """For a MatMul of an activation by a 2-D weight: (kind key, sources), where sources are the initializers to
    concatenate (values, then scales for a quantized weight); None for any other node."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if weight is None or len(weight.uses()) != 1:
        return None
    if _is_matrix_initializer(weight):
        return ("plain", weight.dtype, weight.shape[0]), (weight,)
    dequantize = weight.producer()
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(dequantize.inputs) != 2:
        return None
    values, scales = dequantize.inputs
    axis = dequantize.attributes.get_int("axis", 1)
    block = dequantize.attributes.get_int("block_size", 0)
    if not (_is_matrix_initializer(values) and _is_matrix_initializer(scales)) or axis != 0 or not block:
        return None
    return ("blocked", values.dtype, scales.dtype, values.shape[0], block), (values, scales)


def _is_matrix_initializer(value: ir.Value) -> bool:
    shape = value.shape
    return (value.const_value is not None and value.is_initializer() and shape is not None and len(shape) == 2
            and all(isinstance(d, int) for d in shape))


def _merge(model: ir.Model, members: list[tuple[ir.Node, tuple]]) -> None:
    """One MatMul over the members' weights concatenated along N, then one Split into their outputs; a member
    whose output only a Split along its last axis reads (kv_a into the latent and the rope key) hands that Split's
    outputs to the merged one."""
    nodes = [node for node, _ in members]
    sources = [weight[1] for _, weight in members]  # per member: (values,) or (values, scales)
    widths = [group[0].shape[1] for group in sources]
    merged = []
    for part in range(len(sources[0])):  # values, then scales
        parts = [group[part] for group in sources]
        shape = (parts[0].shape[0], sum(widths))
        name = "+".join(p.name for p in parts)
        merged.append(model.graph.initializers.get(name) or lazy_initializer(
            model, name, lambda parts=parts: np.concatenate([p.const_value.numpy() for p in parts], axis=1),
            parts[0].dtype, shape))
    first = nodes[0]
    tape = Tape()
    weight = merged[0]
    if len(merged) == 2:
        block = members[0][1][0][-1]  # the kind key ends with the block size
        weight = tape.op("DequantizeLinear", merged, {"axis": 0, "block_size": block})
    product = tape.op("MatMul", [first.inputs[0], weight])
    pieces: list[tuple[int, ir.Value]] = []  # (width, the value it replaces), in column order
    absorbed = []
    for node, width in zip(nodes, widths):
        split = _last_axis_split(node.outputs[0], width)
        if split is None:
            pieces.append((width, node.outputs[0]))
        else:
            pieces.extend(zip(split[1], split[0].outputs))
            absorbed.append(split[0])
    outputs = tape.op_multi_out("Split", [product, constant(tape, [w for w, _ in pieces], np.int64)],
                                {"axis": -1}, num_outputs=len(pieces))
    first.graph.insert_before(first, tape.nodes)
    for (_, old), new in zip(pieces, outputs):
        new.shape, new.type = old.shape, old.type
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = name
    split_sizes = [split.inputs[1] for split in absorbed]
    for split in absorbed:  # readers first: a node goes only once its outputs are unused
        split.graph.remove(split, safe=True)
    for node in nodes:
        dequantize = node.inputs[1].producer()
        node.graph.remove(node, safe=True)
        if dequantize is not None:
            dequantize.graph.remove(dequantize, safe=True)
    for value in [*(value for group in sources for value in group), *split_sizes]:
        drop_unused_initializer(model, value)


def _last_axis_split(value: ir.Value, width: int) -> tuple[ir.Node, list[int]] | None:
    """The Split along the last axis, with constant sizes summing to `width`, that is `value`'s only reader."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    sizes = node.inputs[1]
    rank = len(value.shape) if value.shape is not None else None
    axis = node.attributes.get_int("axis", 0)
    if sizes is None or sizes.const_value is None or not (axis == -1 or (rank is not None and axis == rank - 1)):
        return None
    widths = [int(w) for w in sizes.const_value.numpy().reshape(-1)]
    if sum(widths) != width or len(widths) != len(node.outputs):
        return None
    return node, widths
