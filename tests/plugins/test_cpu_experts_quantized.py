"""moetrt's CPU expert kernel on int8 and int4 weights, against float64 numpy experts on the dequantized weights.

The kernel quantizes each token row entering a matrix to int8 per block of g inputs (llama.cpp's Q8_0 scheme),
so it matches the float reference to within that rounding: a row's inputs move by up to half a step
(max|x| / 254) each, which moves the experts' output by 1-2% of its largest value here (measured 1.0-1.8%
over these cases); the tolerance is 4% of the output's largest value. `experts(..., group)` applies the same
activation rounding in float64, which pins the layout and the integer arithmetic to float accumulation error
(1e-5 of the largest value).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.export.ort.lower import interleave_gate_up
from moetrt.plugins.cpu_experts import CpuExperts, pack_quantized, supported_quantized
from moetrt.quantization import QuantScheme, dequantize_blocks, quantize_blocks


def quantize(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    return quantize_blocks(w, QuantScheme(bits, group))


def quantize_activation(v: np.ndarray, group: int) -> np.ndarray:
    """The kernel's rounding of a token row: int8 per block of `group`, d = max|v| / 127, back to float64."""
    blocks = v.astype(np.float32).reshape(-1, group)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.clip(np.rint(blocks * inverse), -127, 127)
    return (q.astype(np.float64) * (amax / np.float32(127))).reshape(v.shape)


def experts(x, ids, weights, w_gate_up, w_down, group=None):
    """y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])) in float64, gate rows then up rows per
    expert; with `group`, each matrix input rounded as the kernel rounds it (`quantize_activation`)."""
    def rounded(v):
        return v if group is None else quantize_activation(v, group)

    inter = w_down.shape[2]
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        row = rounded(x[t])
        for j in range(ids.shape[1]):
            e = ids[t, j]
            gate_up = w_gate_up[e].astype(np.float64) @ row
            gate, up = gate_up[:inter], gate_up[inter:]
            act = weights[t, j] * (gate / (1 + np.exp(-gate)) * up)
            y[t] += w_down[e].astype(np.float64) @ rounded(act.astype(np.float32))
    return y


def make(rng, num_experts, hidden, inter, slices, bits, group, threads=2, library=None):
    """A quantized kernel and the dequantized float weights it holds (gate rows then up rows)."""
    w_gate_up = (rng.standard_normal((num_experts, 2 * inter, hidden)) / np.sqrt(hidden)).astype(np.float32)
    w_down = (rng.standard_normal((num_experts, hidden, inter)) / np.sqrt(inter)).astype(np.float32)
    (gate_up_q, gate_up_d), (down_q, down_d) = quantize(w_gate_up, bits, group), quantize(w_down, bits, group)
    packed = pack_quantized(interleave_gate_up(gate_up_q), interleave_gate_up(gate_up_d), down_q, down_d, bits,
                            group, slices)
    kernel = CpuExperts(*packed, num_experts, hidden, inter, slices, threads, library, bits=bits, group_size=group)
    return kernel, dequantize_blocks(gate_up_q, gate_up_d, group), dequantize_blocks(down_q, down_d, group)


def routing(rng, tokens, num_experts, k):
    ids = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    return ids, rng.random((tokens, k)).astype(np.float32)


def check(kernel, w_gate_up, w_down, x, ids, weights, group):
    got = kernel(x, ids, weights)
    scale = np.abs(experts(x, ids, weights, w_gate_up, w_down)).max()
    np.testing.assert_allclose(got, experts(x, ids, weights, w_gate_up, w_down, group), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got, experts(x, ids, weights, w_gate_up, w_down), rtol=0, atol=4e-2 * scale)
    return got


CASES = [  # tokens, experts, k, hidden, inter, slices, threads, group
    (1, 8, 2, 96, 64, 2, 2, 32),  # tiny-r1's shape: 3 groups per row
    (8, 64, 6, 64, 64, 2, 2, 32),  # ds-mini's routing at batch 8
    (5, 4, 4, 64, 64, 1, 1, 64),  # every token on every expert: 5 rows per expert, past the register block
    (37, 16, 3, 128, 96, 3, 2, 32),  # three slices on two threads
    (3, 8, 1, 128, 256, 2, 3, 128),  # top-1, more threads than slices
    (12, 8, 5, 256, 128, 1, 2, 128),  # one slice, two threads: one idles
    (2, 16, 6, 96, 192, 3, 2, 32),  # top-6 of 16, 3 slices
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens,num_experts,k,hidden,inter,slices,threads,group", CASES)
def test_matches_the_reference(bits, tokens, num_experts, k, hidden, inter, slices, threads, group):
    rng = np.random.default_rng(tokens * 1000 + num_experts + bits)
    kernel, w_gate_up, w_down = make(rng, num_experts, hidden, inter, slices, bits, group, threads)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids, weights = routing(rng, tokens, num_experts, k)
    got = check(kernel, w_gate_up, w_down, x, ids, weights, group)
    assert np.array_equal(kernel(x, ids, weights), got), "the same call must give the same bits"


@pytest.mark.parametrize("bits", [8, 4])
def test_a_token_gives_the_same_bits_alone_or_batched(bits):
    """A token's output is its own: its activations are quantized per row, and sums run in a fixed order."""
    rng = np.random.default_rng(7)
    kernel, _, _ = make(rng, 8, 64, 64, 2, bits, 32)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    ids = np.tile(np.array([[1, 5]], np.int32), (6, 1))
    weights = rng.random((6, 2)).astype(np.float32)
    together = kernel(x, ids, weights)
    alone = np.concatenate([kernel(x[t:t + 1], ids[t:t + 1], weights[t:t + 1]) for t in range(6)])
    assert np.array_equal(together, alone)


def test_extreme_values_do_not_overflow_the_integer_sums():
    """Every int8 weight at -127/127 (and int4 at -8, whose nibble is 0, or 7, whose nibble is 15) against inputs
    at the block maximum, of mixed signs and of one sign: the largest pair sums maddubs forms (2 * 127 * 127 <
    2^15) and the int16 sums of a chunk's eight int4 products (8 * 2 * 15 * 127 = 30480 < 2^15) stay exact."""
    rng = np.random.default_rng(13)
    for bits, value in ((8, 127), (8, -127), (4, -8), (4, 7)):
        hidden, inter, group = 64, 32, 32
        gate_up_q = np.full((2, 2 * inter, hidden), value, np.int8)
        down_q = np.full((2, hidden, inter), value, np.int8)
        gate_up_d = np.full((2, 2 * inter, hidden // group), 1e-3, np.float16)
        down_d = np.full((2, hidden, inter // group), 1e-2, np.float16)
        packed = pack_quantized(interleave_gate_up(gate_up_q), interleave_gate_up(gate_up_d), down_q, down_d, bits,
                                group, 1)
        kernel = CpuExperts(*packed, 2, hidden, inter, 1, 1, bits=bits, group_size=group)
        x = np.where(rng.random((3, hidden)) < 0.5, -50.0, 50.0).astype(np.float32)
        x[1], x[2] = 50.0, -50.0
        ids, weights = np.array([[0, 1]] * 3, np.int32), np.ones((3, 2), np.float32)
        w_gate_up, w_down = dequantize_blocks(gate_up_q, gate_up_d, group), dequantize_blocks(down_q, down_d, group)
        got = kernel(x, ids, weights)
        want = experts(x, ids, weights, w_gate_up, w_down, group)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_packed_bytes_hold_values_and_float16_scales_in_the_documented_order():
    """Per group of G rows (int8: 4, int4: 8) and block of g inputs: the G float16 scales, then per chunk of 32
    inputs the rows' values (int8: rows a, b's inputs 0-15, then their 16-31, then rows c, d; int4: four 32-byte
    pieces j, byte 4a + i of piece j holding row a's input 4j + i in its low nibble and 16 + 4j + i in its high
    one, as q + 8); blocks follow each other along the row."""
    hidden, inter, group = 96, 32, 32
    rng = np.random.default_rng(17)
    down_q, down_d = np.zeros((1, hidden, inter), np.int8), np.zeros((1, hidden, 1), np.float16)
    fc1_d = rng.random((1, 2 * inter, 3)).astype(np.float16)
    for bits, low, high, rows in ((8, -127, 128, 4), (4, -8, 8, 8)):
        fc1_q = rng.integers(low, high, (1, 2 * inter, hidden), dtype=np.int8)
        gate_up, _ = pack_quantized(fc1_q, fc1_d, down_q, down_d, bits, group, 1)
        block = rows * (2 + group * bits // 8)
        for first in range(0, 2 * inter, rows):  # every group of rows
            for b in range(3):
                at = (first // rows * 3 + b) * block
                assert gate_up[at:at + 2 * rows].view(np.float16).tolist() == fc1_d[0, first:first + rows, b].tolist()
                values = at + 2 * rows
                for a in range(rows):
                    q = fc1_q[0, first + a, b * group:(b + 1) * group]
                    if bits == 8:
                        lo = values + 64 * (a // 2) + 16 * (a % 2)
                        data, want = np.concatenate([gate_up[lo:lo + 16], gate_up[lo + 32:lo + 48]]), q.view(np.uint8)
                    else:
                        data = np.concatenate([gate_up[values + 32 * j + 4 * a:][:4] for j in range(4)])
                        want = ((q[:16] + 8) | ((q[16:] + 8) << 4)).view(np.uint8)
                    assert data.tolist() == want.tolist()
        assert gate_up.size == 2 * inter * (hidden * bits // 8 + hidden // group * 2)


def test_shapes_and_values_the_layout_cannot_hold_are_refused():
    assert supported_quantized(96, 64, 2, 8, 32) is None
    assert supported_quantized(1024, 512, 2, 4, 128) is None
    assert "group size 16" in supported_quantized(96, 64, 2, 8, 16)
    assert "group size 48" in supported_quantized(96, 96, 1, 8, 48)
    assert "hidden size 96" in supported_quantized(96, 128, 1, 4, 64)
    assert "expert width 64 / 3" in supported_quantized(96, 64, 3, 8, 32)
    assert "6-bit" in supported_quantized(96, 64, 2, 6, 32)
    q, d = np.zeros((1, 64, 32), np.int8), np.zeros((1, 64, 1), np.float16)
    with pytest.raises(MoetrtError, match="cannot run these experts: hidden size 32"):
        pack_quantized(q, d, np.zeros((1, 32, 32), np.int8), d[:, :32], 8, 64, 1)
    with pytest.raises(MoetrtError, match=r"int4 expert values must lie in \[-8, 7\]"):
        pack_quantized(q + 9, d, np.zeros((1, 32, 32), np.int8), d[:, :32], 4, 32, 1)
    with pytest.raises(MoetrtError, match="do not fit together"):
        pack_quantized(q, d[:, :, :0], np.zeros((1, 32, 32), np.int8), d[:, :32], 8, 32, 1)
    gate_up, down = pack_quantized(q, d, np.zeros((1, 32, 32), np.int8), d[:, :32], 8, 32, 1)
    with pytest.raises(MoetrtError, match="do not match the recorded expert shape"):
        CpuExperts(gate_up[:-1], down, 1, 32, 32, 1, bits=8, group_size=32)
    with pytest.raises(MoetrtError, match="contiguous uint8"):
        CpuExperts(gate_up.view(np.int8), down, 1, 32, 32, 1, bits=8, group_size=32)
    with pytest.raises(MoetrtError, match="group size 16"):
        CpuExperts(gate_up, down, 1, 32, 32, 1, bits=8, group_size=16)


def test_every_level_compiles_and_the_ones_this_cpu_runs_match_the_reference(tmp_path):
    """Each build an engine carries (plugins/cpu_experts.py TARGETS: AVX-512 VNNI, AVX-VNNI, AVX2 and the plain
    C path of x86-64-v2) compiles with this compiler, and each this CPU can run computes the quantized experts
    to float accumulation error. VNNI builds compile here even where the CPU cannot run them."""
    from moetrt import hardware
    from moetrt.plugins.cpu_experts import compile_kernel, load_library, targets

    levels = targets(hardware.cpu_arch())
    if not levels:
        pytest.skip(f"no kernel levels for {hardware.cpu_arch()}")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    ids, weights = routing(rng, 5, 8, 3)
    with ThreadPoolExecutor(2) as pool:  # the compilers run as processes: two at a time
        list(pool.map(lambda target: compile_kernel(tmp_path / f"{target.name}.so", target.compiler_flags), levels))
    ran = []
    for target in levels:
        if target.cpu_flags is None or set(target.cpu_flags) <= set(hardware.cpu_flags()):
            library = load_library(tmp_path / f"{target.name}.so")
            for bits in (8, 4):
                kernel, w_gate_up, w_down = make(np.random.default_rng(bits), 8, 96, 64, 2, bits, 32, 2, library)
                check(kernel, w_gate_up, w_down, x, ids, weights, 32)
            ran.append(target.name)
    assert ran, f"this CPU runs none of {[target.name for target in levels]}"
    if hardware.cpu_arch() == "x86_64":
        assert "x86-64-v2" in ran  # the plain C path runs on every x86-64 CPU


def test_the_avx512_builds_row_blocking_computes_the_same_on_avx2(tmp_path):
    """x86-64-v4 builds pass four token rows at a time over a row group (QROW_BLOCK 4), AVX2 builds two; the
    four-row code is compiled for AVX2 here so CPUs without AVX-512 check it too (rows 1-9 per expert)."""
    from moetrt import hardware
    from moetrt.plugins.cpu_experts import X86_64_V3, compile_kernel, load_library

    if hardware.cpu_arch() != "x86_64" or not set(X86_64_V3) <= set(hardware.cpu_flags()):
        pytest.skip("needs an x86-64-v3 CPU")
    path = tmp_path / "rows4.so"
    compile_kernel(path, ("-march=x86-64-v3", "-DQROW_BLOCK=4"))
    library = load_library(path)
    rng = np.random.default_rng(23)
    for bits in (8, 4):
        kernel, w_gate_up, w_down = make(rng, 4, 64, 64, 2, bits, 32, 2, library)
        x = rng.standard_normal((9, 64)).astype(np.float32)
        for ids in ([[0, 3]] * 5 + [[1, 3]] * 4, [[0, 3]] * 7 + [[1, 2]] * 2):  # rows 5, 4, 9; then 7, 2
            check(kernel, w_gate_up, w_down, x, np.array(ids, np.int32), rng.random((9, 2)).astype(np.float32), 32)
