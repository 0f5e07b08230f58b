"""Rotary embeddings as one ONNX `RotaryEmbedding` node each (opset 23) instead of the nine the trace gives.

The trace spells DeepSeek's rotary embedding of a query or key's rope part `x` (last axis h) as rotate-half
arithmetic on the cosines and sines of its positions (`cos`, `sin`: `[batch, seq, h/2]`, computed once per graph
from position_ids, with YaRN's scaling in them; the query's broadcast over heads through an Unsqueeze):

    x1, x2 = x[..., 0::2], x[..., 1::2]      (rope_interleave, DeepSeek-V3's checkpoints: two strided Slices;
                                             without it the two halves, from a Split or two Slices)
    y = Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)

That is two Slices (or a Split), six Muls, a Sub, an Add and a Concat per site, two sites a layer. ONNX's
RotaryEmbedding-23 with `interleaved=0` computes `y` from `Concat(x1, x2)` (the operator spec's reference), taking
a 3-D input `[batch, seq, heads * h]` with `num_heads` and the cosines and sines per position as `[batch, seq, h/2]`
(no position_ids). So a site becomes a Gather of x's even then odd elements (for interleaved checkpoints) and one
RotaryEmbedding; a per-head query gets a Reshape either side, to and from 3-D. `y`, what the cache stores for the
key, is unchanged: the same layout, the same products. That is 12 nodes fewer a layer. At batch 1 an ONNX Runtime
node costs a few microseconds whatever it computes, which is most of a small model's step (bench/NOTES.md).

The ort target's default-domain opset becomes 23 where a site is rewritten; the operators the graph holds are the
same between opsets 21 and 23 but for added types. Anything that does not match the pattern exactly is left as it
is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from moetrt.export.lowering import constant, replace_node

ROPE_OPSET = 23  # ONNX RotaryEmbedding's first version


def fuse_rotary_embeddings(model: ir.Model) -> int:
    """Rewrite, in place, every rotate-half rotary embedding (module docstring) into RotaryEmbedding; returns how
    many sites were rewritten (the model's default opset is raised to 23 when any was)."""
    fused = 0
    for node in list(model.graph):
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            site = _match(node)
            if site is not None:
                _rewrite(node, *site)
                fused += 1
    if fused:
        model.opset_imports[""] = max(model.opset_imports.get("", ROPE_OPSET), ROPE_OPSET)
    return fused


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _ints(value: ir.Value | None) -> list[int] | None:
    """A constant int input's values (an initializer or a Constant node's), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is None or node.op_type != "Constant" or "value" not in node.attributes:
            return None
        tensor = node.attributes["value"].as_tensor()
    return [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _even_width(value: ir.Value) -> int | None:
    """The static, even length of `value`'s last axis, else None."""
    shape = value.shape
    return shape[-1] if shape is not None and isinstance(shape[-1], int) and not shape[-1] % 2 else None


def _half(node: ir.Node | None) -> tuple[ir.Value, int, bool] | None:
    """For a Slice taking one half of its input's last axis (of static even length h): (its input, which half: 0
    or 1, strided). Strided halves are the even and the odd elements (`x[..., 0::2]`, `x[..., 1::2]`), contiguous
    ones `x[..., :h/2]` and `x[..., h/2:]`. None for any other node."""
    if node is None or len(node.inputs) < 3 or node.inputs[0] is None:
        return None
    data = node.inputs[0]
    width = _even_width(data)
    if width is None:
        return None
    rank = len(data.shape)
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(rank))
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or len(axes) != 1 or len(steps) != 1:
        return None
    if axes[0] not in (-1, rank - 1):
        return None
    start, end, step, half = starts[0], min(ends[0], width), steps[0], width // 2
    if step == 2 and start in (0, 1) and end >= width - 1:
        return data, start, True
    if step == 1 and (start, end) == (0, half):
        return data, 0, False
    if step == 1 and (start, end) == (half, width):
        return data, 1, False
    return None


def _split_half(value: ir.Value | None) -> tuple[ir.Value, int, bool] | None:
    """For an output of a Split of its input's last axis (of static even length) into two equal halves, as the
    trace spells `x[..., :h/2]` and `x[..., h/2:]`: (its input, which half, False). None otherwise."""
    node = _producer(value, "Split")
    if node is None or len(node.outputs) != 2 or node.inputs[0] is None:
        return None
    data = node.inputs[0]
    width = _even_width(data)
    if width is None or node.attributes.get_int("axis", 0) not in (-1, len(data.shape) - 1):
        return None
    sizes = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is not None and sizes != [width // 2] * 2:
        return None
    if sizes is None and node.attributes.get_int("num_outputs", 2) != 2:
        return None
    return data, node.outputs.index(value), False


def _match(concat: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, int, bool] | None:
    """(x, cos, sin, heads, strided) of a rotate-half site ending at `concat`, where cos and sin are `[batch, seq,
    h/2]`, x is `[batch, seq, h]` (heads 0) or `[batch, seq, heads, h]`, and strided says its halves are the even and
    odd elements; None when `concat` is no such site."""
    if len(concat.inputs) != 2 or len(concat.outputs) != 1:
        return None
    sub, add = _producer(concat.inputs[0], "Sub"), _producer(concat.inputs[1], "Add")
    if sub is None or add is None:
        return None
    products = [_producer(v, "Mul") for v in (*sub.inputs, *add.inputs)]
    if any(p is None or len(p.inputs) != 2 for p in products):
        return None
    # Each product is (half of x) * (cos or sin), operands in either order.
    halves: list[tuple[int, ir.Value]] = []
    x: ir.Value | None = None
    kinds = set()
    for product in products:
        found = None
        for i in (0, 1):
            half = _half(_producer(product.inputs[i], "Slice")) or _split_half(product.inputs[i])
            if half is not None:
                found = (half, product.inputs[1 - i])
                break
        if found is None:
            return None
        (data, which, strided), factor = found
        kinds.add(strided)
        if x is None:
            x = data
        elif data is not x:
            return None
        halves.append((which, factor))
    # sub = x1*cos - x2*sin; add = x2*cos + x1*sin
    (a, cos), (b, sin), (c, cos2), (d, sin2) = halves
    if (a, b, c, d) != (0, 1, 1, 0) or cos is not cos2 or sin is not sin2 or cos is sin or len(kinds) != 1:
        return None
    shape = x.shape
    if concat.attributes.get_int("axis", 0) not in (-1, len(shape) - 1):  # x's width is even: _half checked it
        return None
    if len(shape) == 3:
        heads = 0
    elif len(shape) == 4 and isinstance(shape[2], int):
        heads = shape[2]
        cos, sin = _squeezed(cos), _squeezed(sin)  # the query's broadcast over heads
        if cos is None or sin is None:
            return None
    else:
        return None
    if any(v.shape is None or len(v.shape) != 3 or v.shape[-1] != shape[-1] // 2 for v in (cos, sin)):
        return None
    return x, cos, sin, heads, kinds.pop()


def _squeezed(value: ir.Value) -> ir.Value | None:
    """The 3-D tensor an Unsqueeze at axis 2 made `value` `[batch, seq, 1, h/2]` from, else None."""
    node = _producer(value, "Unsqueeze")
    if node is None or _ints(node.inputs[1] if len(node.inputs) > 1 else None) not in ([2], [-2]):
        return None
    return node.inputs[0]


def _rewrite(concat: ir.Node, x: ir.Value, cos: ir.Value, sin: ir.Value, heads: int, strided: bool) -> None:
    tape = Tape()
    width = x.shape[-1]
    if strided:  # even elements then odd ones: the halves the site rotates, in the order it concatenates them
        order = np.concatenate([np.arange(0, width, 2), np.arange(1, width, 2)]).astype(np.int64)
        x = tape.op("Gather", [x, constant(tape, order)], {"axis": -1})
    if heads:
        flat = tape.op("Reshape", [x, constant(tape, [0, 0, heads * width], np.int64)])
        rotated = tape.op("RotaryEmbedding", [flat, cos, sin], {"num_heads": heads, "interleaved": 0})
        out = tape.op("Reshape", [rotated, constant(tape, [0, 0, heads, width], np.int64)])
    else:
        out = tape.op("RotaryEmbedding", [x, cos, sin], {"num_heads": 1, "interleaved": 0})
    dead = [concat.inputs[0].producer(), concat.inputs[1].producer()]
    replace_node(concat, tape.nodes, out)
    _remove_dead(dead)


def _remove_dead(nodes: list[ir.Node | None]) -> None:
    """Remove `nodes` and, transitively, their producers that nothing reads any more (the site's Sub, Add,
    Muls and Slices; the query's Unsqueezes once the last site reading them is gone). Not onnx_ir's
    RemoveUnusedNodesPass: it also drops every unused initializer of the graph, which is not this rewrite's to do."""
    pending = [n for n in nodes if n is not None]
    while pending:
        node = pending.pop()
        if node.graph is None or any(out.uses() or out.is_graph_output() for out in node.outputs):
            continue
        producers = [v.producer() for v in node.inputs if v is not None]
        node.graph.remove(node, safe=True)
        pending.extend(p for p in producers if p is not None)
