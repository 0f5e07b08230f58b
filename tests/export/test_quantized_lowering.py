"""The ort lowering of quantized routed experts (int8/int4 values, float16 scales per group of inputs): ONNX
Runtime's QMoE and moetrt's CPU kernel, each against the experts computed in numpy from the dequantized weights,
on small shapes; the kernel plan for quantized experts; the trt and onnx targets' refusals."""

import numpy as np
import onnx_ir as ir
import pytest

from moetrt.errors import MoetrtError
from moetrt.export.lowering import LoweringPlan, lower
from moetrt.quantization import QuantScheme, dequantize_blocks, quantize_blocks

E, H, I, K = 8, 64, 128, 2  # experts, hidden, expert width, active experts per token


def quantized_experts_graph(bits: int, group: int, seed: int = 0):
    """One quantized routed-experts node as the export writes it (plugins/spec.py, export/quantized.py): returns
    the onnx_ir model and the (q, d) of gate/up `[E, 2I, H]` (gate rows then up rows) and down `[E, H, I]`."""
    rng = np.random.default_rng(seed)
    scheme = QuantScheme(bits, group)
    gate_up = quantize_blocks(rng.standard_normal((E, 2 * I, H)).astype(np.float32) * 0.1, scheme)
    down = quantize_blocks(rng.standard_normal((E, H, I)).astype(np.float32) * 0.1, scheme)
    inputs = [ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["T", H])),
              ir.Value(name="topk_ids", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["T", K])),
              ir.Value(name="topk_weights", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["T", K]))]
    weights = []
    for array, name in ((gate_up[0], "gate_up_q"), (down[0], "down_q"), (gate_up[1], "gate_up_scale"),
                        (down[1], "down_scale")):
        tensor = ir.tensor(array, name=name)
        weights.append(ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor))
    node = ir.Node("moetrt", "RoutedExperts", [*inputs, *weights], name="experts0", attributes=[
        ir.AttrString("activation", "silu"), ir.AttrInt64s("block_size", [1, group]), ir.AttrInt64("bits", bits)])
    out = node.outputs[0]
    out.name, out.type, out.shape = "output", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["T", H])
    graph = ir.Graph(inputs, [out], nodes=[node], initializers=weights, opset_imports={"": 21, "moetrt": 1})
    return ir.Model(graph, ir_version=10), gate_up, down


def routing(tokens: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = (rng.random((tokens, K)) * 2).astype(np.float32)  # DeepSeek's weights need not sum to 1
    return x, ids, weights


def int8_activations(v: np.ndarray, block: int) -> np.ndarray:
    """v `[n]` rounded as both kernels quantize activations: int8 per `block` values, scale max|v| / 127."""
    blocks = v.reshape(-1, block)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.rint(blocks / scale) * scale).reshape(-1)


def reference(x, ids, weights, gate_up, down, group, activation_block=None):
    """sum_k w * down(silu(gate x) * up x) with the dequantized float32 weights; with `activation_block`, each
    matrix product's input rounded to int8 blocks first (llama.cpp's Q8_0 activations)."""
    w1, w2 = dequantize_blocks(*gate_up, group), dequantize_blocks(*down, group)
    rounded = (lambda v: v) if activation_block is None else (lambda v: int8_activations(v, activation_block))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for expert, weight in zip(ids[t], weights[t]):
            h = w1[expert] @ rounded(x[t])
            act = h[:I] / (1 + np.exp(-h[:I])) * h[I:]
            out[t] += weight * (w2[expert] @ rounded(act))
    return out


def run_qmoe(model, x, ids, weights):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 2  # QMoE warns when it falls back from its integer kernels: keep that visible
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"hidden": x, "topk_ids": ids, "topk_weights": weights})[0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("slices", [1, 2])
def test_qmoe_lowering_computes_the_dequantized_experts(bits, slices):
    """QMoE quantizes the activations to int8 per group (accuracy level 4); with that rounding applied to the
    reference, the rest is float32 arithmetic. Against the unrounded reference: within that rounding."""
    model, gate_up, down = quantized_experts_graph(bits, 32)
    lower(model, LoweringPlan("ort", expert_slices=slices, moe_kernel="onnxruntime"))
    qmoe = [node for node in model.graph if node.op_type == "QMoE"]
    assert len(qmoe) == 1 and qmoe[0].domain == "com.microsoft"
    assert qmoe[0].attributes["expert_weight_bits"].value == bits and qmoe[0].attributes["block_size"].value == 32
    assert qmoe[0].attributes["normalize_routing_weights"].value == 0
    assert {value.dtype for value in (qmoe[0].inputs[3], qmoe[0].inputs[6])} == {ir.DataType.FLOAT}
    assert not set(model.graph.initializers) & {"gate_up_q", "down_q", "gate_up_scale", "down_scale"}
    x, ids, weights = routing(5)
    y = run_qmoe(model, x, ids, weights)
    np.testing.assert_allclose(y, reference(x, ids, weights, gate_up, down, 32, activation_block=32),
                               rtol=1e-5, atol=1e-5)
    exact = reference(x, ids, weights, gate_up, down, 32)
    assert np.abs(y - exact).max() <= 0.05 * np.abs(exact).max()


def test_qmoe_stores_values_unsigned_with_its_implicit_zero_point():
    from moetrt.export.ort.lower import qmoe_weights

    q = np.array([[-8, 7, 0, -1]], np.int8)
    assert qmoe_weights(q, 4).tolist() == [[0xF0, 0x78]]  # (-8 + 8) | (7 + 8) << 4, (0 + 8) | (-1 + 8) << 4
    assert qmoe_weights(np.array([[-127, 0, 127]], np.int8), 8).tolist() == [[1, 128, 255]]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("slices", [1, 2])
def test_kernel_lowering_packs_what_the_kernel_computes_as_the_dequantized_experts(bits, slices):
    from moetrt.plugins.cpu_experts import CpuExperts

    model, gate_up, down = quantized_experts_graph(bits, 32, seed=bits + slices)
    lower(model, LoweringPlan("ort", expert_slices=slices, moe_kernel="moetrt"))
    (node,) = [node for node in model.graph if node.op_type == "Experts"]
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    assert attributes == {"num_experts": E, "hidden_size": H, "intermediate_size": I, "slices": slices,
                          "bits": bits, "group_size": 32}
    packed = [value.const_value.numpy() for value in node.inputs[3:5]]
    assert all(array.dtype == np.uint8 and array.ndim == 1 for array in packed)
    kernel = CpuExperts(*packed, E, H, I, slices, bits=bits, group_size=32)
    x, ids, weights = routing(4)
    y = kernel(x, ids, weights)
    np.testing.assert_allclose(y, reference(x, ids, weights, gate_up, down, 32, activation_block=32),
                               rtol=1e-5, atol=1e-5)


def test_slices_that_cut_a_group_are_refused_in_one_line():
    model, _, _ = quantized_experts_graph(4, 64)
    with pytest.raises(MoetrtError) as error:
        lower(model, LoweringPlan("ort", expert_slices=4, moe_kernel="onnxruntime"))  # 32 channels per slice
    assert "\n" not in str(error.value) and "not whole groups of 64" in str(error.value)


def test_plan_keeps_quantized_slices_whole_groups_and_counts_expert_weights():
    from moetrt.export.ort.plan import choose_moe_kernel, default_expert_slices, quantized_experts

    assert default_expert_slices(64, threads=16) == 16
    assert default_expert_slices(64, threads=16, unit=32) == 2
    assert default_expert_slices(96, threads=16, unit=64) == 1  # not whole groups at all: experts stay float
    int4 = QuantScheme(4, 32)
    assert quantized_experts(1024, 512, int4) == int4 and quantized_experts(1024, 48, int4) is None
    # ds-mini's experts (1.6M weights) go to the kernel whatever their bits; tiny-r1's (18k) stay in ONNX Runtime
    for scheme in (None, int4, QuantScheme(8, 32)):
        assert choose_moe_kernel("auto", 1024, 512, 2, "float32", True, scheme)[0] == "moetrt"
        assert choose_moe_kernel("auto", 96, 64, 2, "float32", True, scheme)[0] == "onnxruntime"
    with pytest.raises(MoetrtError, match="not a multiple of the group size 64"):
        choose_moe_kernel("moetrt", 1024, 96, 1, "float32", True, QuantScheme(8, 64))


def test_trt_and_onnx_targets_refuse_quantized_experts_in_one_line():
    from moetrt.export.trt import BACKEND
    from moetrt.settings import BuildConfig

    for target, fix in (("trt", "--backend ort"), ("onnx", "--target ort")):
        model, _, _ = quantized_experts_graph(8, 32)
        with pytest.raises(MoetrtError) as error:
            lower(model, LoweringPlan(target))
        assert "\n" not in str(error.value) and "quantized" in str(error.value) and fix in str(error.value)
    with pytest.raises(MoetrtError, match="TensorRT engines are not quantized yet"):
        BACKEND.plan(BuildConfig(quantize="int4"), None, "float32")
