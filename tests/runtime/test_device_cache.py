"""The TensorRT device cache's byte arithmetic, without a GPU: the strided copies and memsets its slot operations
issue (runtime/trt/device_cache.py's plans), carried out here on the bytes of a host cache, leave exactly the bytes
the host cache's own numpy operations leave. The device calls themselves run only where TensorRT and a GPU do."""

import numpy as np
import pytest

from moetrt.runtime.kv_cache import LatentKVCache
from moetrt.runtime.trt.device_cache import (
    SlotLayout,
    compaction_plan,
    layer_views,
    place_moves,
    repack_moves,
    runs,
)

LAYERS, D, CONTEXT = 2, 5, 24


def apply(moves, target, source=None):
    """What DeviceLatentCache._apply asks of cudaMemcpy2DAsync / cudaMemset2DAsync, on uint8 buffers."""
    for move in moves:
        into, origin = move.target, move.source
        assert into.height <= 1 or into.width <= into.pitch
        if origin is not None:
            assert (origin.width, origin.height) == (into.width, into.height)
            assert origin.height <= 1 or origin.width <= origin.pitch
        for row in range(into.height):
            out = target[into.offset + row * into.pitch :][: into.width]
            assert len(out) == into.width, "a move runs past its buffer"
            out[:] = 0 if origin is None else source[origin.offset + row * origin.pitch :][: origin.width]


def image(layer):
    """The bytes of one layer, as a device allocation would hold them."""
    return layer.copy().view(np.uint8).reshape(-1)


def host_cache(valid, dtype=np.float16, seed=0):
    """A host cache after one step that wrote random rows under the mask `valid` `[slots, steps]`."""
    cache = LatentKVCache(LAYERS, D, valid.shape[0], CONTEXT, dtype)
    for layer in cache.layers:
        layer[...] = np.random.default_rng(seed).standard_normal(layer.shape)
    cache.attention_mask(valid.shape[1], valid)
    cache.reserve(valid.shape[1])
    cache.advance(valid.shape[1])
    return cache


def layout_of(cache):
    return SlotLayout(cache.slots, D * cache.dtype.itemsize)


def test_slot_layout_offsets_and_pitch_are_numpy_s_strides():
    layer = np.zeros((CONTEXT, 4, D), np.float16)
    layout = SlotLayout(4, D * 2)
    for start, stop, first, last in [(0, 5, 0, 4), (3, 9, 1, 3), (7, 8, 2, 3), (0, CONTEXT, 3, 4)]:
        region = layer[start:stop, first:last]
        strided = layout.block(start, stop, first, last)
        assert strided.offset == region.ctypes.data - layer.ctypes.data
        assert strided.pitch == region.strides[0] and strided.width == region.strides[1] * (last - first)
        assert strided.height == stop - start
    assert layout.column(2, 3, 9) == layout.block(3, 9, 2, 3)


def test_runs_split_columns_where_they_skip():
    assert runs(np.array([0, 1, 2, 5, 6, 9])) == [(0, 3), (5, 7), (9, 10)]
    assert runs(np.array([4])) == [(4, 5)] and runs(np.array([], np.intp)) == []


@pytest.mark.parametrize("seed", range(20))
def test_compaction_moves_what_the_host_cache_moves(seed):
    rng = np.random.default_rng(seed)
    slots, steps = rng.integers(1, 5), rng.integers(1, 16)
    valid = (rng.random((slots, steps)) < rng.random()).astype(np.int64)
    if seed == 0:  # slot 0 moves right, slot 1 left onto itself across a hole
        valid = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 1, 1, 1, 1]])
    cache = host_cache(valid, seed=seed)
    listed = sorted(rng.choice(cache.slots, rng.integers(0, cache.slots + 1), replace=False).tolist())
    kept = {slot: np.flatnonzero(cache.mask[slot, : cache.length]) for slot in listed}
    length = max((len(columns) for columns in kept.values()), default=0)
    plan = compaction_plan(layout_of(cache), kept, length)
    before = [image(layer) for layer in cache.layers]
    cache.compact(listed)
    assert cache.length == length
    for got, layer in zip(before, cache.layers):
        scratch = np.full(plan.scratch_bytes, 0xFF, np.uint8)
        apply(plan.gathers, scratch, got)
        apply(plan.fills, got, scratch)
        assert np.array_equal(got, image(layer))


@pytest.mark.parametrize("start, count", [(0, 6), (4, 2), (9, 1)])
def test_place_copies_what_the_host_cache_copies(start, count):
    cache = host_cache(np.ones((3, start + count), np.int64))
    source = host_cache(np.ones((1, count), np.int64), seed=1)
    before = [image(layer) for layer in cache.layers]
    cache.place(1, source)
    for got, layer, rows in zip(before, cache.layers, source.layers):
        apply(place_moves(layout_of(cache), 1, start, count), got, image(rows))
        assert np.array_equal(got, image(layer))


@pytest.mark.parametrize("old, new", [(3, 5), (5, 2), (1, 1), (4, 0)])
def test_repack_copies_what_the_host_cache_copies(old, new):
    cache = host_cache(np.ones((old, 7), np.int64), dtype=np.float32)
    before, old_layout = [image(layer) for layer in cache.layers], layout_of(cache)
    cache.resize(new)
    new_layout = layout_of(cache)
    for source, layer in zip(before, cache.layers):
        got = np.zeros(CONTEXT * new_layout.pitch, np.uint8)  # a fresh device layer is zero-filled
        apply(repack_moves(old_layout, new_layout, min(old, new), cache.length), got, source)
        used = cache.length * new_layout.pitch  # the host leaves columns past `length` uninitialised
        assert np.array_equal(got[:used], image(layer)[:used])


def test_past_views_start_at_the_layer_allocations_and_new_rows_length_cells_in():
    """past() is what the session binds (its layer's cudaMalloc address, 256-aligned); reserve() is where the new rows
    are copied to, `length` positions in (runtime/trt/bindings.py: not bindable in general)."""
    layout = SlotLayout(3, 576 * 2)
    layers = [0x10000, 0x90000]
    past = layer_views(layers, layout, 100, 0, 37, 2)
    new = layer_views(layers, layout, 100, 37, 1, 2)
    assert [view.pointer for view in past] == layers and past[0].shape == (37, 3, 576)
    assert [view.pointer - base for view, base in zip(new, layers)] == [37 * 3 * 1152] * 2
    assert new[0].capacity == (100 - 37) * layout.pitch and new[0].nbytes == 3 * 1152
