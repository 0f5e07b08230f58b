"""The CPU expert kernel's id -1 (ABI 5, expert parallelism): a pair whose id is -1 is skipped, so a rank that
holds some experts computes exactly the reference over the pairs of those experts, and the ranks' partial outputs
sum to the whole layer's. The references are float64 numpy SwiGLU expert loops (tests/plugins/test_cpu_experts.py,
and for int8/int4 test_cpu_experts_quantized.py's, which rounds each token row as the kernel does)."""

from __future__ import annotations

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from tests.plugins import test_cpu_experts as fp32
from tests.plugins import test_cpu_experts_quantized as quantized

# tokens, experts, k, hidden, inter, slices, threads
SHAPES = [(1, 8, 2, 96, 64, 2, 2), (9, 16, 4, 64, 64, 2, 2), (37, 16, 6, 128, 96, 3, 2)]
BITS = [32, 8, 4]
GROUP = 32


def make(bits: int, rng, experts: int, hidden: int, inter: int, slices: int, threads: int):
    """(kernel, float gate/up `[E, 2I, H]`, float down `[E, H, I]`) for `bits` 32 (float32) or 8/4."""
    if bits == 32:
        return fp32.make(rng, experts, hidden, inter, slices, threads)
    return quantized.make(rng, experts, hidden, inter, slices, bits, GROUP, threads)


def reference(bits: int, x, ids, weights, w_gate_up, w_down) -> np.ndarray:
    """The layer's output over the pairs with a non-negative id only (float64)."""
    keep = ids >= 0
    safe_ids, kept_weights = np.where(keep, ids, 0), np.where(keep, weights, 0).astype(np.float32)
    if bits == 32:
        return fp32.reference(x, safe_ids, kept_weights, w_gate_up, w_down)
    return quantized.experts(x, safe_ids, kept_weights, w_gate_up, w_down, GROUP)


def routing(rng, tokens: int, experts: int, k: int):
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    return ids, rng.random((tokens, k)).astype(np.float32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("tokens,experts,k,hidden,inter,slices,threads", SHAPES)
def test_pairs_with_id_minus_one_are_skipped(bits, tokens, experts, k, hidden, inter, slices, threads):
    rng = np.random.default_rng(tokens * 100 + experts + bits)
    kernel, w_gate_up, w_down = make(bits, rng, experts, hidden, inter, slices, threads)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids, weights = routing(rng, tokens, experts, k)
    held = rng.random(experts) < 0.5  # this "rank"'s experts
    held[ids[0, 0]], held[ids[0, -1]] = True, False  # at least one pair kept and one skipped
    local = np.where(held[ids], ids, np.int32(-1))
    got = kernel(x, local, weights)
    want = reference(bits, x, local, weights, w_gate_up, w_down)
    full = reference(bits, x, ids, weights, w_gate_up, w_down)
    scale = np.abs(full).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    assert np.abs(want - full).max() > 1e-2 * scale, "the skipped pairs must matter, or the test proves nothing"


@pytest.mark.parametrize("bits", BITS)
def test_a_row_of_only_minus_one_gives_zeros(bits):
    rng = np.random.default_rng(11 + bits)
    kernel, _, _ = make(bits, rng, 8, 64, 64, 2, 2)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ids = np.array([[-1, -1], [2, 5], [-1, -1]], np.int32)
    got = kernel(x, ids, np.ones((3, 2), np.float32))
    assert np.array_equal(got[[0, 2]], np.zeros((2, 64), np.float32))
    assert np.abs(got[1]).max() > 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("ranks", [2, 3])
def test_disjoint_ranks_sum_to_the_whole_layer(bits, ranks):
    """Expert e on rank e mod N (round-robin placement): the N partial outputs add up to one call with every id."""
    rng = np.random.default_rng(ranks * 10 + bits)
    tokens, experts, k = 23, 16, 6
    kernel, _, _ = make(bits, rng, experts, 128, 96, 3, 2)
    x = rng.standard_normal((tokens, 128)).astype(np.float32)
    ids, weights = routing(rng, tokens, experts, k)
    whole = kernel(x, ids, weights)
    parts = [kernel(x, np.where(ids % ranks == rank, ids, np.int32(-1)), weights) for rank in range(ranks)]
    assert all(np.abs(part).max() > 0 for part in parts)
    summed = np.sum(parts, axis=0, dtype=np.float64)
    np.testing.assert_allclose(summed, whole, rtol=0, atol=1e-6 * np.abs(whole).max())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bad", [-2, -100, 8, 9])
def test_ids_below_minus_one_or_past_the_experts_are_still_refused(bits, bad):
    rng = np.random.default_rng(5)
    kernel, _, _ = make(bits, rng, 8, 64, 64, 2, 2)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    ids = np.array([[0, -1], [3, bad]], np.int32)
    with pytest.raises(MoetrtError, match="out of range"):
        kernel(x, ids, np.ones((2, 2), np.float32))
