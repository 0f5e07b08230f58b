"""moetrt's CPU expert kernel against a float64 numpy reference of the routed SwiGLU experts."""

from __future__ import annotations

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.export.ort.lower import interleave_gate_up
from moetrt.plugins.cpu_experts import CpuExperts, pack_down, pack_gate_up, supported


def reference(x, ids, weights, w_gate_up, w_down):
    """y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), gate rows then up rows per expert."""
    inter = w_down.shape[2]
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            gate_up = w_gate_up[e].astype(np.float64) @ x[t]
            gate, up = gate_up[:inter], gate_up[inter:]
            y[t] += weights[t, j] * (w_down[e].astype(np.float64) @ (gate / (1 + np.exp(-gate)) * up))
    return y


def make(rng, experts, hidden, inter, slices, threads=None):
    w_gate_up = (rng.standard_normal((experts, 2 * inter, hidden)) / np.sqrt(hidden)).astype(np.float32)
    w_down = (rng.standard_normal((experts, hidden, inter)) / np.sqrt(inter)).astype(np.float32)
    fc1 = interleave_gate_up(w_gate_up)
    kernel = CpuExperts(pack_gate_up(fc1, slices), pack_down(w_down, slices), experts, hidden, inter, slices, threads)
    return kernel, w_gate_up, w_down


CASES = [  # tokens, experts, k, hidden, inter, slices, threads
    (1, 8, 2, 96, 64, 2, 2),  # tiny-r1's shape
    (8, 64, 6, 64, 32, 2, 2),  # ds-mini's routing at batch 8, small weights
    (5, 4, 4, 16, 16, 1, 1),  # every token on every expert: 5 rows per expert
    (37, 16, 3, 40, 48, 3, 2),  # three slices on two threads, rows past the register block
    (300, 32, 8, 24, 64, 8, 4),  # a prefill chunk, more threads than cores
    (2, 8, 1, 8, 8, 1, 3),  # more threads than slices
]


@pytest.mark.parametrize("tokens,experts,k,hidden,inter,slices,threads", CASES)
def test_matches_the_reference(tokens, experts, k, hidden, inter, slices, threads):
    rng = np.random.default_rng(tokens * 1000 + experts)
    kernel, w_gate_up, w_down = make(rng, experts, hidden, inter, slices, threads)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.random((tokens, k)).astype(np.float32)
    got = kernel(x, ids, weights)
    want = reference(x, ids, weights, w_gate_up, w_down)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.array_equal(kernel(x, ids, weights), got), "the same call must give the same bits"


def test_results_do_not_depend_on_how_tokens_are_batched():
    """A token's output is its own: computing it alone or among others routed to the same experts agrees."""
    rng = np.random.default_rng(7)
    kernel, _, _ = make(rng, 8, 32, 16, 2)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    ids = np.tile(np.array([[1, 5]], np.int32), (6, 1))
    weights = rng.random((6, 2)).astype(np.float32)
    together = kernel(x, ids, weights)
    alone = np.concatenate([kernel(x[t:t + 1], ids[t:t + 1], weights[t:t + 1]) for t in range(6)])
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)


def test_zero_tokens_and_bad_ids():
    rng = np.random.default_rng(3)
    kernel, _, _ = make(rng, 4, 16, 8, 1)
    assert kernel(np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32)).shape == (0, 16)
    with pytest.raises(MoetrtError, match="out of range"):
        kernel(np.ones((1, 16), np.float32), np.array([[0, 4]], np.int32), np.ones((1, 2), np.float32))
    with pytest.raises(MoetrtError, match="x \\[T, 16\\]"):
        kernel(np.ones((1, 15), np.float32), np.array([[0, 1]], np.int32), np.ones((1, 2), np.float32))


def test_shapes_the_layout_cannot_hold_are_refused():
    assert supported(96, 64, 2) is None
    assert "hidden size 20" in supported(20, 64, 2)
    assert "expert width 64 / 16" in supported(96, 64, 16)
    with pytest.raises(MoetrtError, match="cannot run these experts"):
        CpuExperts(np.zeros(1, np.float32), np.zeros(1, np.float32), 1, 20, 8, 1)


def test_growing_the_thread_pool_between_calls():
    """Workers started by a later call must wait for the next job, not rerun the last one (a use-after-return)."""
    rng = np.random.default_rng(11)
    kernel, w_gate_up, w_down = make(rng, 8, 32, 64, 8, threads=1)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(4)]).astype(np.int32)
    weights = rng.random((4, 2)).astype(np.float32)
    want = reference(x, ids, weights, w_gate_up, w_down)
    for threads in (1, 2, 3, 5, 8, 2):
        kernel.threads = threads
        for _ in range(3):
            np.testing.assert_allclose(kernel(x, ids, weights), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_every_level_compiles_and_the_ones_this_cpu_runs_match_the_reference(tmp_path):
    """The builds an engine carries (plugins/cpu_experts.py TARGETS): each compiles with this compiler, and each
    this CPU can run computes the same experts (x86-64-v2 has no AVX: its vectors are split in two)."""
    from moetrt import hardware
    from moetrt.plugins.cpu_experts import compile_kernel, load_library, targets

    levels = targets(hardware.cpu_arch())
    if not levels:
        pytest.skip(f"no kernel levels for {hardware.cpu_arch()}")
    rng = np.random.default_rng(5)
    w_gate_up = (rng.standard_normal((8, 128, 40)) / 7).astype(np.float32)
    w_down = (rng.standard_normal((8, 40, 64)) / 8).astype(np.float32)
    packed = pack_gate_up(interleave_gate_up(w_gate_up), 2), pack_down(w_down, 2)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(5)]).astype(np.int32)
    weights = rng.random((5, 2)).astype(np.float32)
    want = reference(x, ids, weights, w_gate_up, w_down)
    ran = []
    for target in levels:
        path = tmp_path / f"{target.name}.so"
        compile_kernel(path, target.compiler_flags)
        assert path.stat().st_size > 0 and not list(tmp_path.glob(".cpu_experts-*"))
        if target.cpu_flags is None or set(target.cpu_flags) <= set(hardware.cpu_flags()):
            kernel = CpuExperts(*packed, 8, 40, 64, 2, threads=2, library=load_library(path))
            np.testing.assert_allclose(kernel(x, ids, weights), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
            ran.append(target.name)
    assert ran, f"this CPU runs none of {[target.name for target in levels]}"


def test_the_best_carried_build_this_cpu_runs_is_chosen():
    from moetrt.formats import CpuKernel
    from moetrt.plugins.cpu_experts import X86_64_V2, X86_64_V3, X86_64_V4, choose

    carried = [CpuKernel(name, f"kernels/{name}.so", flags)
               for name, flags in (("x86-64-v4", X86_64_V4), ("x86-64-v3", X86_64_V3), ("x86-64-v2", X86_64_V2))]
    assert choose(carried, (*X86_64_V4, "amx_tile")).target == "x86-64-v4"
    assert choose(carried, X86_64_V3).target == "x86-64-v3"  # an AVX2 server runs what an AVX-512 one built
    assert choose(carried, [flag for flag in X86_64_V4 if flag != "avx512bw"]).target == "x86-64-v3"
    assert choose(carried, [flag for flag in X86_64_V3 if flag != "fma"]).target == "x86-64-v2"
    assert choose(carried, ("sse4_2", "popcnt")) is None
    assert choose((), X86_64_V4) is None


RUN_CACHED_KERNEL = """
import numpy as np
from moetrt.plugins.cpu_experts import CpuExperts
gate_up, down = np.zeros(8 * 2 * 8 * 8, np.float32), np.zeros(8 * 8 * 8, np.float32)  # 8 experts, H = I = 8
kernel = CpuExperts(gate_up, down, 8, 8, 8, 1, threads=1)
print(kernel(np.ones((2, 8)), np.zeros((2, 1)), np.ones((2, 1))).sum())
"""


def test_damaged_kernel_in_the_cache_is_compiled_again_not_run(tmp_path):
    """The build compiled for this machine is cached with its sha256 beside it; a cached library whose bytes
    changed (same size) is rebuilt before it is loaded, instead of crashing the process that runs it."""
    import os
    import subprocess
    import sys

    from moetrt.formats import file_sha256
    from moetrt.plugins.cpu_experts import find_compiler

    if find_compiler() is None:
        pytest.skip("needs a C compiler")
    env = {**os.environ, "MOETRT_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-c", RUN_CACHED_KERNEL]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and first.stdout.strip() == "0.0", first.stderr
    (library,) = tmp_path.glob("cpu_experts-*.so")
    record = library.with_name(f"{library.name}.sha256")
    assert file_sha256(library) == record.read_text().strip()
    data = bytearray(library.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2048] = bytes(byte ^ 0xFF for byte in data[middle:middle + 2048])
    library.write_bytes(bytes(data))
    damaged = file_sha256(library)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout.strip() == "0.0", (second.returncode, second.stderr)
    assert file_sha256(library) == record.read_text().strip() != damaged
