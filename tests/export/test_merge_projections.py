"""The ort lowering's merged projections (export/ort/merge.py): MatMuls of one input by plain or block-quantized
2-D weights become one MatMul and a Split, computing what the separate MatMuls computed (ONNX Runtime runs both
graphs); other MatMuls are left alone."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from moetrt.export.ort.merge import merge_sibling_projections

H = 64  # input width; widths of the projections differ on purpose


def _initializer(graph_inits: list, array: np.ndarray, name: str, dtype=None) -> ir.Value:
    tensor = ir.tensor(array, name=name) if dtype is None else ir.Tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph_inits.append(value)
    return value


def projections_graph(bits: int | None, seed: int = 0) -> ir.Model:
    """x `[B, S, H]` through three projections of x (widths 48, 80 split in 64 + 16, 32) and one of another input
    (y); with `bits`, each weight is int8/int4 values `[H, N]` and float32 scales `[H / 16, N]` behind a block-wise
    DequantizeLinear, as export/quantized.py writes them. A 3-D weight (the absorbed attention products) reads x
    too."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", H]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", H]))
    inits, nodes, outputs = [], [], []
    for index, (source, width) in enumerate(((x, 48), (x, 80), (x, 32), (y, 40))):
        if bits is None:
            weight = _initializer(inits, rng.standard_normal((H, width)).astype(np.float32), f"w{index}")
        else:
            limit = 2 ** (bits - 1)
            q = rng.integers(-limit, limit, size=(H, width)).astype(np.int8)
            values = _initializer(inits, q, f"q{index}", ir.DataType.INT4 if bits == 4 else None)
            scales = _initializer(inits, (rng.random((H // 16, width)) * 0.1).astype(np.float32), f"s{index}")
            dequantize = ir.node("DequantizeLinear", [values, scales], {"axis": 0, "block_size": 16})
            nodes.append(dequantize)
            weight = dequantize.outputs[0]
        matmul = ir.node("MatMul", [source, weight])
        matmul.outputs[0].name = f"out{index}"
        nodes.append(matmul)
        if width == 80:  # split as kv_a's output is (latent, rope key): the merged Split takes its place
            sizes = _initializer(inits, np.array([64, 16], dtype=np.int64), "sizes")
            split = ir.node("Split", [matmul.outputs[0], sizes], {"axis": -1}, num_outputs=2)
            for part, value in zip("ab", split.outputs):
                value.name = f"out{index}{part}"
            nodes.append(split)
            outputs.extend(split.outputs)
        else:
            outputs.append(matmul.outputs[0])
    batched = _initializer(inits, rng.standard_normal((3, H, 8)).astype(np.float32), "batched")
    nodes.append(ir.node("MatMul", [x, batched]))  # [B, S, H] @ [3, H, 8]: B must be 3
    nodes[-1].outputs[0].name = "out_batched"
    outputs.append(nodes[-1].outputs[0])
    for value in outputs:
        value.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x, y], outputs, nodes=nodes, initializers=inits, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


NAMES = ["out0", "out1a", "out1b", "out2", "out3", "out_batched"]


def run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # MatMulNBits where it fuses
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_projections_of_one_input_become_one_matmul_with_the_same_outputs(bits):
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 5, H)).astype(np.float32),
             "y": rng.standard_normal((3, 5, H)).astype(np.float32)}
    expected = run(projections_graph(bits), feeds)
    model = projections_graph(bits)
    assert merge_sibling_projections(model) == 2  # three of x's projections -> one; y's and the 3-D one stay
    matmuls = [node for node in model.graph if node.op_type == "MatMul"]
    assert len(matmuls) == 3
    assert sum(node.op_type == "Split" for node in model.graph) == 1  # the 80-wide output's Split absorbed
    assert [value.name for value in model.graph.outputs] == NAMES
    unused = {"w0", "w1", "w2", "q0", "q1", "q2", "s0", "s1", "s2", "sizes"} & set(model.graph.initializers)
    assert not unused, f"the merged projections' own initializers stay in the graph: {unused}"
    got = run(model, feeds)
    for name, want, have in zip(NAMES, expected, got):
        assert have.shape == want.shape, name
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_projections_of_different_kinds_are_not_merged():
    """A float32 weight and a quantized one reading the same input stay two MatMuls."""
    plain, quantized = projections_graph(None), projections_graph(8)
    merged_graph = quantized.graph
    x = merged_graph.inputs[0]
    weight = plain.graph.initializers["w0"]
    plain.graph.initializers.pop("w0")
    copy = ir.Value(name="w_plain", shape=weight.shape, type=weight.type, const_value=weight.const_value)
    merged_graph.register_initializer(copy)
    extra = ir.node("MatMul", [x, copy])
    extra.outputs[0].name, extra.outputs[0].type = "out_plain", ir.TensorType(ir.DataType.FLOAT)
    merged_graph.append(extra)
    merged_graph.outputs.append(extra.outputs[0])
    assert merge_sibling_projections(quantized) == 2  # the three int8 projections only
    assert any(node.op_type == "MatMul" and node.inputs[1] is copy for node in merged_graph)
