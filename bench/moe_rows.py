"""ONNX Runtime's CPU MoE op alone at ds-mini's expert shape: time per call as the rows per expert grow.

`python -m moetrt.bench.moe_rows` prints, for T tokens routed to the same 6 experts and to random ones, the
time and the expert-weight bytes per second. One row per expert streams at copy bandwidth; two or more rows
take the packed-GEMM path and cost about twice as much per expert (bench/NOTES.md).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

E, H, I, K = 64, 1024, 512, 6  # ds-mini's routed experts


def moe_session(directory: Path, threads: int = 2) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    fc1 = (rng.standard_normal((E, 2 * I, H)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((E, H, I)) * 0.02).astype(np.float32)
    node = helper.make_node("MoE", ["x", "r", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=K,
                            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                            normalize_routing_weights=1, use_sparse_mixer=0)
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["T", E])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])],
        initializer=[numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(directory / "moe.onnx"), save_as_external_data=True, location="moe.data")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(directory / "moe.onnx"), options, providers=["CPUExecutionProvider"])


def main() -> None:
    rng = np.random.default_rng(1)
    per_expert = 3 * H * I * 4
    with tempfile.TemporaryDirectory() as tmp:
        session = moe_session(Path(tmp))
        for same in (True, False):
            for tokens in (1, 2, 4, 8):
                x = rng.standard_normal((tokens, H)).astype(np.float32)
                router = np.full((tokens, E), -np.inf, np.float32)
                for t in range(tokens):
                    router[t, np.arange(K) * 10 if same else rng.choice(E, K, replace=False)] = 0.0
                experts = int(np.isfinite(router).any(0).sum())
                for _ in range(3):
                    session.run(None, {"x": x, "r": router})
                start, calls = time.perf_counter(), 20
                for _ in range(calls):
                    session.run(None, {"x": x, "r": router})
                seconds = (time.perf_counter() - start) / calls
                print(f"{'same' if same else 'random'} experts, T={tokens}: {experts} experts, {seconds * 1e3:.2f} ms, "
                      f"{experts * per_expert / seconds / 1e9:.1f} GB/s of expert weights")


if __name__ == "__main__":
    main()
