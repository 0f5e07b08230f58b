"""export/ort/rope.py: rotate-half rotary embeddings become ONNX RotaryEmbedding nodes computing the same values.

Each graph holds the sites as the trace spells them (tests build them with onnx.helper): a per-head query
`[batch, seq, heads, h]` whose cosines go through an Unsqueeze, and a key `[batch, seq, h]`, in the strided form
(DeepSeek-V3's rope_interleave) and the contiguous one (a Split, as the trace gives it, or two Slices). ONNX
Runtime runs the graph before and after the rewrite on the same inputs; a numpy rotary embedding written from the
formula checks the first.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from moetrt.export.ort.rope import fuse_rotary_embeddings

HEADS, H = 3, 8
BIG = np.iinfo(np.int64).max


def _const(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)],
                                                                             values))


def _site(prefix: str, x: str, cos: str, sin: str, rank: int, form: str, nodes: list, step: int | None = None):
    """Append the trace's nodes rotating `x` (last axis H) to `nodes`; returns the output's name. `form`: the
    halves as strided Slices ("interleaved"), as a Split ("split", what the trace gives without rope_interleave)
    or as contiguous Slices ("halves")."""
    axis = rank - 1
    names = [f"{prefix}x0", f"{prefix}x1"]
    if form == "split":
        nodes += [_const(f"{prefix}sizes", [H // 2, H // 2]),
                  helper.make_node("Split", [x, f"{prefix}sizes"], names, axis=axis)]
    else:
        if form == "interleaved":
            halves = (([0], [BIG], [step or 2]), ([1], [BIG], [step or 2]))
        else:
            halves = (([0], [H // 2], [step or 1]), ([H // 2], [BIG], [step or 1]))
        for i, (start, end, stride) in enumerate(halves):
            for part, values in (("s", start), ("e", end), ("a", [axis]), ("t", stride)):
                nodes.append(_const(f"{prefix}{part}{i}", values))
            nodes.append(helper.make_node("Slice", [x, f"{prefix}s{i}", f"{prefix}e{i}", f"{prefix}a{i}",
                                                    f"{prefix}t{i}"], [names[i]]))
    x1, x2 = names
    nodes += [helper.make_node("Mul", [x1, cos], [f"{prefix}m1"]), helper.make_node("Mul", [x2, sin], [f"{prefix}m2"]),
              helper.make_node("Sub", [f"{prefix}m1", f"{prefix}m2"], [f"{prefix}d"]),
              helper.make_node("Mul", [x2, cos], [f"{prefix}m3"]), helper.make_node("Mul", [sin, x1], [f"{prefix}m4"]),
              helper.make_node("Add", [f"{prefix}m3", f"{prefix}m4"], [f"{prefix}u"]),
              helper.make_node("Concat", [f"{prefix}d", f"{prefix}u"], [f"{prefix}y"], axis=-1)]
    return f"{prefix}y"


def _model(form: str, step: int | None = None) -> onnx.ModelProto:
    nodes = [_const("axis2", [2]), helper.make_node("Unsqueeze", ["cos", "axis2"], ["cos4"]),
             helper.make_node("Unsqueeze", ["sin", "axis2"], ["sin4"])]
    q = _site("q", "q", "cos4", "sin4", 4, form, nodes, step)
    k = _site("k", "k", "cos", "sin", 3, form, nodes, step)
    nodes += [helper.make_node("Identity", [q], ["q_out"]), helper.make_node("Identity", [k], ["k_out"])]
    dims = ["batch", "seq"]
    graph = helper.make_graph(nodes, "rope", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [*dims, HEADS, H]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [*dims, H]),
        helper.make_tensor_value_info("cos", TensorProto.FLOAT, [*dims, H // 2]),
        helper.make_tensor_value_info("sin", TensorProto.FLOAT, [*dims, H // 2])], [
        helper.make_tensor_value_info("q_out", TensorProto.FLOAT, [*dims, HEADS, H]),
        helper.make_tensor_value_info("k_out", TensorProto.FLOAT, [*dims, H])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(batch: int = 2, seq: int = 5) -> dict:
    rng = np.random.default_rng(0)
    angles = rng.uniform(-3, 3, (batch, seq, H // 2)).astype(np.float32)
    return {"q": rng.standard_normal((batch, seq, HEADS, H)).astype(np.float32),
            "k": rng.standard_normal((batch, seq, H)).astype(np.float32),
            "cos": np.cos(angles), "sin": np.sin(angles)}


def _numpy_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, strided: bool) -> np.ndarray:
    """DeepSeek-V3's apply_rotary_pos_emb on a rope part (interleaved: de-interleave, then rotate half)."""
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if strided else (x[..., : H // 2], x[..., H // 2 :])
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("form", ["interleaved", "split", "halves"])
def test_each_site_becomes_one_rotary_embedding_computing_the_same(form):
    strided = form == "interleaved"
    model = _model(form)
    feeds = _feeds()
    before = _run(model, feeds)
    np.testing.assert_allclose(before[0], _numpy_rope(feeds["q"], feeds["cos"][:, :, None], feeds["sin"][:, :, None],
                                                      strided), atol=1e-6)
    np.testing.assert_allclose(before[1], _numpy_rope(feeds["k"], feeds["cos"], feeds["sin"], strided), atol=1e-6)

    graph = ir.from_proto(model)
    assert fuse_rotary_embeddings(graph) == 2
    fused = ir.to_proto(graph)
    ops = [node.op_type for node in fused.graph.node]
    assert ops.count("RotaryEmbedding") == 2
    assert not {"Slice", "Split", "Sub", "Add", "Mul", "Concat", "Unsqueeze"} & set(ops), ops
    assert ops.count("Gather") == (2 if strided else 0)
    assert {o.domain: o.version for o in fused.opset_import}[""] == 23
    after = _run(fused, feeds)
    for got, want in zip(after, before):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    one = {name: value[:1, :1] for name, value in feeds.items()}  # batch 1, one position (a decode step)
    for got, want in zip(_run(fused, one), _run(model, one)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_other_slicing_is_left_as_it_is():
    model = _model("interleaved", step=3)  # every third element: not a rotary embedding
    graph = ir.from_proto(model)
    assert fuse_rotary_embeddings(graph) == 0
    assert [n.op_type for n in ir.to_proto(graph).graph.node] == [n.op_type for n in model.graph.node]
    assert {o.domain: o.version for o in ir.to_proto(graph).opset_import}[""] == 21


def test_the_engines_graph_holds_two_per_layer(tiny_r1_quantized):
    """tiny-r1's engine: a query and a key site in each of its 4 layers, none left in rotate-half form."""
    import json

    engine = tiny_r1_quantized("none")
    manifest = json.loads((engine / "manifest.json").read_text())
    graph = onnx.load(str(engine / manifest["ort"]["model"]), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("RotaryEmbedding") == 2 * 4
    assert "Sub" not in ops
