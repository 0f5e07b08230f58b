"""ONNX Runtime's CPU MoE op and moetrt's CPU expert kernel alone at ds-mini's expert shape, side by side.

`python -m moetrt.bench.moe_rows` prints, for T tokens routed to the same 6 experts and to random ones (a new
draw every call), each one's median time per call (calls interleaved) and the expert-weight bytes it streams per second. ONNX
Runtime's op streams one row per expert near copy bandwidth but takes its packing GEMM path for two or more
rows, about twice as slow per expert; the kernel reads each expert once from a packed layout for all its rows
(bench/NOTES.md).
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
CALLS = 40


def weights() -> tuple[np.ndarray, np.ndarray]:
    """Interleaved gate/up `[E, 2I, H]` and down `[E, H, I]`."""
    rng = np.random.default_rng(0)
    return ((rng.standard_normal((E, 2 * I, H)) * 0.02).astype(np.float32),
            (rng.standard_normal((E, H, I)) * 0.02).astype(np.float32))


def moe_session(directory: Path, fc1: np.ndarray, fc2: np.ndarray, threads: int = 2) -> ort.InferenceSession:
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
    # as the runtime sets it for kernel engines: ONNX Runtime's idle threads must not spin on the kernel's cores
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(directory / "moe.onnx"), options, providers=["CPUExecutionProvider"])


def main() -> None:
    from moetrt.plugins.cpu_experts import CpuExperts, pack_down, pack_gate_up

    rng = np.random.default_rng(1)
    per_expert = 3 * H * I * 4
    fc1, fc2 = weights()
    kernel = CpuExperts(pack_gate_up(fc1, 2), pack_down(fc2, 2), E, H, I, slices=2, threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        session = moe_session(Path(tmp), fc1, fc2)
        for same in (True, False):
            for tokens in (1, 2, 4, 8):
                # a fresh routing for every call, as every layer of every decode step has: repeating one would
                # leave its experts in the 32 MB cache and overstate both
                calls = []
                for _ in range(CALLS):
                    x = rng.standard_normal((tokens, H)).astype(np.float32)
                    shared = rng.choice(E, K, replace=False)
                    ids = np.stack([shared if same else rng.choice(E, K, replace=False)
                                    for _ in range(tokens)]).astype(np.int32)
                    w = rng.random((tokens, K)).astype(np.float32)
                    router = np.full((tokens, E), -np.inf, np.float32)
                    for t in range(tokens):
                        router[t, ids[t]] = np.log(w[t])
                    calls.append((x, ids, w, router))
                systems = {"onnxruntime": lambda x, ids, w, router: session.run(None, {"x": x, "r": router}),
                           "moetrt": lambda x, ids, w, router: kernel(x, ids, w)}
                times: dict[str, list[float]] = {name: [] for name in systems}
                for index, call in enumerate(calls):
                    for name, run in systems.items():
                        start = time.perf_counter()
                        run(*call)
                        if index >= 3:
                            times[name].append(time.perf_counter() - start)
                experts = float(np.mean([len(np.unique(call[1])) for call in calls]))
                line = f"{'same' if same else 'random'} experts, T={tokens}: {experts:.1f} experts"
                for name, seconds in times.items():
                    median = float(np.median(seconds))
                    line += f"; {name} {median * 1e3:.2f} ms, {experts * per_expert / median / 1e9:.1f} GB/s"
                ratio = np.median(times["onnxruntime"]) / np.median(times["moetrt"])
                print(f"{line}; moetrt {ratio:.2f}x", flush=True)

if __name__ == "__main__":
    main()
