"""ONNX Runtime's telemetry is turned off wherever moetrt creates a session: the build's optimisation, the runtime."""

import onnxruntime
import pytest


@pytest.fixture
def telemetry_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append("off"))
    return calls


def test_loading_an_engine_turns_onnxruntime_telemetry_off(chat_engine_dir, telemetry_calls):
    from moetrt.runtime.engine import Engine

    Engine.load(chat_engine_dir)
    assert telemetry_calls


def test_the_builds_offline_optimisation_turns_onnxruntime_telemetry_off(tmp_path, telemetry_calls):
    import onnx
    from onnx import TensorProto, helper

    from moetrt.export.ort.build import _optimize

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _optimize(model.SerializeToString(), tmp_path / "model.onnx", "model.onnx.data", "CPUExecutionProvider")
    assert telemetry_calls and onnx.load(str(tmp_path / "model.onnx")).graph.node[0].op_type == "Relu"
