"""moetrt's onnxruntime op `moetrt.ort::Experts` (plugins/ort_experts_op.c) in a one-node onnxruntime graph,
against float64 numpy experts and against the kernel called directly (CpuExperts): float32, int8 and int4
weights, one and many rows per expert, one and two intra-op threads, pairs skipped with id -1."""

from __future__ import annotations

import ctypes

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moetrt.plugins import ort_ops
from tests.plugins.test_cpu_experts import make as make_float, reference
from tests.plugins.test_cpu_experts_quantized import experts as quantized_reference, make as make_quantized, routing


def op_session(threads: int) -> ort.InferenceSession:
    """One moetrt.ort::Experts node: x [T, H], ids [T, k] int32, weights [T, k], kernel [10] int64 -> y."""
    node = onnx.helper.make_node(ort_ops.OP, ["x", "ids", "weights", "kernel"], ["y"], domain=ort_ops.DOMAIN)
    graph = onnx.helper.make_graph([node], "experts", [
        onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, None]),
        onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT32, [None, None]),
        onnx.helper.make_tensor_value_info("weights", onnx.TensorProto.FLOAT, [None, None]),
        onnx.helper.make_tensor_value_info("kernel", onnx.TensorProto.INT64, [10]),
    ], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid(ort_ops.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(ort_ops.library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_op(session, kernel, x, ids, weights):
    return session.run(None, {"x": x, "ids": ids, "weights": weights, "kernel": ort_ops.kernel_params(kernel)})[0]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens,experts,k,hidden,inter,slices", [
    (1, 8, 2, 96, 64, 2),  # tiny-r1's shape, one row
    (8, 64, 6, 64, 32, 2),  # ds-mini's routing at batch 8
    (37, 16, 3, 40, 48, 3),  # three slices, many rows per expert
])
def test_float_experts_match_the_reference_and_the_kernel(threads, tokens, experts, k, hidden, inter, slices):
    rng = np.random.default_rng(tokens + experts)
    kernel, w_gate_up, w_down = make_float(rng, experts, hidden, inter, slices, threads)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids, weights = routing(rng, tokens, experts, k)
    got = run_op(op_session(threads), kernel, x, ids, weights)
    want = reference(x, ids, weights, w_gate_up, w_down)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, kernel(x, ids, weights))  # the same slices summed in the same order


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [1, 9])
def test_quantized_experts_match_the_reference_and_the_kernel(bits, tokens):
    rng = np.random.default_rng(bits * 10 + tokens)
    kernel, w_gate_up, w_down = make_quantized(rng, 16, 64, 64, 2, bits, 32)
    x = rng.standard_normal((tokens, 64)).astype(np.float32)
    ids, weights = routing(rng, tokens, 16, 4)
    ids[0, 1] = -1  # a pair another rank computes: skipped
    got = run_op(op_session(2), kernel, x, ids, weights)
    kept = ids.copy()
    kept[0, 1] = 0
    kept_weights = weights.copy()
    kept_weights[0, 1] = 0.0
    want = quantized_reference(x, kept, kept_weights, w_gate_up, w_down, 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, kernel(x, ids, weights))


def test_bad_inputs_fail_the_run_with_a_message():
    rng = np.random.default_rng(0)
    kernel, _, _ = make_float(rng, 8, 16, 16, 1, 1)
    session = op_session(1)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    ids, weights = routing(rng, 3, 8, 2)
    with pytest.raises(Exception, match="moetrt.ort::Experts: input shapes do not match the layer"):
        run_op(session, kernel, x[:, :8].copy(), ids, weights)
    ids[1, 0] = 8  # no such expert
    with pytest.raises(Exception, match="expert id out of range"):
        run_op(session, kernel, x, ids, weights)


def test_a_kernel_build_without_the_entry_point_is_not_joined(monkeypatch):
    """Engines built before `moetrt_experts_on` carry kernel builds without it: they run segment by segment."""
    class OldBuild:
        moetrt_experts = None

    def reason(build):
        return ort_ops.segmented_reason(hasattr(build, "moetrt_experts_on"), carried=False)

    assert "predates" in reason(OldBuild())
    from moetrt.plugins.cpu_experts import native_library

    assert reason(native_library()) is None
    monkeypatch.setenv(ort_ops.DISABLE_ENV, "1")
    assert ort_ops.DISABLE_ENV in reason(native_library())
    assert isinstance(ctypes.cast(native_library().moetrt_experts_on, ctypes.c_void_p).value, int)
