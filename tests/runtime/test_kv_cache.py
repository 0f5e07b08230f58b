"""The host latent cache against tests/runtime/reference_cache.py: after any sequence of steps and slot operations
(resize, extend_to, place, free, reset, compact) every slot's unmasked rows and the mask are the reference's, and
columns below `length` stay finite even over uninitialised memory."""

import random

import numpy as np
import pytest

from moetrt import MoetrtError
from moetrt.runtime.kv_cache import LatentKVCache
from tests.runtime.reference_cache import ReferenceLatentCache

LAYERS, D, CONTEXT = 2, 3, 40


class GarbageCache(LatentKVCache):
    """A host cache whose fresh buffers hold NaN where np.empty may happen to hold zeros."""

    def _allocate(self, slots):
        return [np.full(layer.shape, np.nan, layer.dtype) for layer in super()._allocate(slots)]


KINDS = {"host": LatentKVCache, "garbage": GarbageCache, "reference": ReferenceLatentCache}


def visible(cache):
    """What a step sees, through the protocol alone: the mask `[slots, P]` and per layer the unmasked rows."""
    mask = cache.attention_mask(0, np.zeros((cache.slots, 0), np.int64))
    past = cache.past()
    assert all(np.isfinite(layer).all() for layer in past), "a column below length is not finite"
    return mask, [layer.transpose(1, 0, 2)[mask == 1] for layer in past]


def assert_same(caches):
    want_mask, want_rows = visible(caches["reference"])
    for name, cache in caches.items():
        assert (cache.slots, cache.length) == (caches["reference"].slots, caches["reference"].length), name
        mask, rows = visible(cache)
        assert np.array_equal(mask, want_mask), name
        for got, want in zip(rows, want_rows):
            assert np.array_equal(got, want), name


def step(caches, valid, rng):
    """One graph call: mark the columns, write random rows into the reserved views, advance."""
    steps = valid.shape[1]
    rows = [rng.standard_normal((steps, valid.shape[0], D)).astype(np.float32) for _ in range(LAYERS)]
    for cache in caches.values():
        cache.attention_mask(steps, valid)
        for view, values in zip(cache.reserve(steps), rows):
            view[...] = values
        cache.advance(steps)


def prefilled(kind, count, rng):
    """A batch-1 cache of `kind` holding `count` prompt rows."""
    cache = KINDS[kind](LAYERS, D, 1, count)
    step({kind: cache}, np.ones((1, count), np.int64), rng)
    return cache


def test_any_sequence_of_slot_operations_keeps_the_reference_rows_and_mask():
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    caches = {kind: make(LAYERS, D, 0, CONTEXT) for kind, make in KINDS.items()}
    operations = ["step", "step", "place", "place", "resize", "extend_to", "free", "compact", "reset"]
    for _ in range(600):
        reference = caches["reference"]
        operation, slots, length = rng.choice(operations), reference.slots, reference.length
        if operation == "step" and slots and length < CONTEXT:
            steps = rng.randint(1, min(3, CONTEXT - length))
            step(caches, (np_rng.random((slots, steps)) < 0.7).astype(np.int64), np_rng)
        elif operation == "place" and slots:
            slot, count = rng.randrange(slots), rng.randint(1, 12)
            if max(length, count) < CONTEXT:
                seed = np_rng.integers(1 << 30)
                for kind, cache in caches.items():  # the same rows for every kind
                    cache.place(slot, prefilled(kind, count, np.random.default_rng(seed)))
        elif operation == "resize":
            width = rng.randint(0, 5)
            for cache in caches.values():
                cache.resize(width)
        elif operation == "extend_to":
            target = rng.randint(0, min(CONTEXT, length + 6))
            for cache in caches.values():
                cache.extend_to(target)
        elif operation == "free" and slots:
            slot = rng.randrange(slots)
            for cache in caches.values():
                cache.free(slot)
        elif operation == "compact" or length > CONTEXT - 4:
            listed = sorted(rng.sample(range(slots), rng.randint(0, slots)))
            for cache in caches.values():
                cache.compact(listed)
        elif operation == "reset":
            for cache in caches.values():
                cache.reset()
        assert_same(caches)


def test_compact_ends_every_listed_slot_at_the_longest_count_even_moving_it_right():
    rng = np.random.default_rng(1)
    caches = {kind: make(LAYERS, D, 2, CONTEXT) for kind, make in KINDS.items()}
    valid = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0],   # 3 columns, moved right to [4, 7)
                      [0, 0, 1, 1, 1, 0, 1, 1, 1, 1]])  # 7 columns with a hole, moved left onto itself
    step(caches, valid, rng)
    for cache in caches.values():
        cache.compact([0, 1])
    assert_same(caches)
    mask, _ = visible(caches["host"])
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]


def test_place_extends_to_the_prompt_and_masks_the_slot_s_earlier_columns():
    rng = np.random.default_rng(2)
    caches = {kind: make(LAYERS, D, 2, CONTEXT) for kind, make in KINDS.items()}
    step(caches, np.ones((2, 4), np.int64), rng)
    seed = 7
    for kind, cache in caches.items():
        cache.place(1, prefilled(kind, 6, np.random.default_rng(seed)))
    assert_same(caches)
    mask, _ = visible(caches["host"])
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


def test_steps_read_and_write_the_host_buffers_in_place():
    cache = LatentKVCache(LAYERS, D, 3, CONTEXT)
    cache.attention_mask(5, np.ones((3, 5), np.int64))
    assert all(np.shares_memory(view, layer) for view, layer in zip(cache.reserve(5), cache.layers))
    cache.advance(5)
    past = cache.past()
    assert all(np.shares_memory(rows, layer) and rows.flags.c_contiguous for rows, layer in zip(past, cache.layers))
    assert past[0].shape == (5, 3, D)


@pytest.mark.parametrize("kind", ["host", "reference"])
def test_the_context_limit_is_a_clear_error(kind):
    cache = KINDS[kind](LAYERS, D, 1, 8)
    cache.extend_to(6)
    with pytest.raises(MoetrtError, match="exceeds the engine's context"):
        cache.reserve(3)
    with pytest.raises(MoetrtError, match="exceeds the engine's context"):
        cache.extend_to(9)
