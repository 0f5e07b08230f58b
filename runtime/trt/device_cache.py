"""The MLA latent cache in device memory, for TensorRT sessions: runtime/session.py's LatentCache over device buffers.

Per layer one zero-filled `[max_context, slots, latent_dim]` allocation (position-major, as the graph expects).
`past()` returns DeviceArray views the engine reads in place: each starts at its layer's allocation, so it is
256-byte aligned as TensorRT requires. `reserve(steps)` returns the views the new rows are copied to: they start
`length` cells in, which is not aligned in general (runtime/trt/bindings.py), so the session never binds them. The
mask, length and context limit are the host-side bookkeeping every cache shares (kv_cache.MaskedLatentCache). The slot operations are
strided device copies on the session's stream: one slot's consecutive columns lie `slots * latent_dim * itemsize`
bytes apart, so a slot's column range is one 2D copy (cudaMemcpy2DAsync) or memset. What to copy where is pure
arithmetic (`SlotLayout` and the `*_moves` / `compaction_plan` functions), tested without a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from moetrt.runtime.kv_cache import Columns, MaskedLatentCache
from moetrt.runtime.trt import cuda_memory as cuda
from moetrt.runtime.trt.cuda_memory import DeviceArray, DeviceBuffer

if TYPE_CHECKING:
    from typing_extensions import Self

    from moetrt.runtime.session import LatentCache


@dataclasses.dataclass(frozen=True)
class Strided:
    """`height` rows of `width` bytes, each `pitch` bytes after the one before, from `offset` bytes into a buffer."""

    offset: int
    pitch: int
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Move:
    """One strided copy from `source` into `target`, of equal width and height, or a zero fill where `source` is
    None. Which buffers the two regions lie in is the caller's: the plans below say."""

    target: Strided
    source: Strided | None = None


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Byte positions in one layer `[positions, slots, D]`: a cell (one position of one slot) is `cell` bytes
    (D * itemsize); position p of slot s starts at (p * slots + s) * cell."""

    slots: int
    cell: int

    @property
    def pitch(self) -> int:
        """Bytes from one position to the next (a whole row of slots)."""
        return self.slots * self.cell

    def block(self, start: int, stop: int, first: int = 0, last: int | None = None) -> Strided:
        """Positions [start, stop) of slots [first, last) (every slot by default)."""
        last = self.slots if last is None else last
        return Strided((start * self.slots + first) * self.cell, self.pitch, (last - first) * self.cell, stop - start)

    def column(self, slot: int, start: int, stop: int) -> Strided:
        """Positions [start, stop) of one slot."""
        return self.block(start, stop, slot, slot + 1)


def repack_moves(old: SlotLayout, new: SlotLayout, keep: int, used: int) -> list[Move]:
    """MaskedLatentCache._repack into a zero-filled layer: new layer <- old layer."""
    return [Move(new.block(0, used, 0, keep), old.block(0, used, 0, keep))]


def place_moves(layout: SlotLayout, slot: int, start: int, count: int) -> list[Move]:
    """MaskedLatentCache._place_rows: layer <- the prefilled batch-1 layer's `count` rows."""
    source = SlotLayout(1, layout.cell)
    return [Move(layout.column(slot, 0, start)),
            Move(layout.column(slot, start, start + count), source.column(0, 0, count))]


def runs(columns: Columns) -> list[tuple[int, int]]:
    """Ascending column indices as [start, stop) runs of consecutive columns."""
    breaks = np.flatnonzero(np.diff(columns) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(columns, breaks) if len(run)]


@dataclasses.dataclass(frozen=True)
class CompactionPlan:
    """MaskedLatentCache._move_columns on one layer. A slot's columns may move right as well as left and
    cudaMemcpy2D must not overlap, so every kept column first goes to a scratch buffer of `scratch_bytes`, cell
    after cell (`gathers`: scratch <- layer), then comes back to its new column (`fills`: layer <- scratch, and the
    zeroed columns before it)."""

    gathers: list[Move]
    fills: list[Move]
    scratch_bytes: int


def compaction_plan(layout: SlotLayout, kept: dict[int, Columns], length: int) -> CompactionPlan:
    gathers, fills = [], []
    packed = 0  # cells gathered so far
    for slot, columns in kept.items():
        count, first = len(columns), packed
        for start, stop in runs(columns):
            gathers.append(Move(Strided(packed * layout.cell, layout.cell, layout.cell, stop - start),
                                layout.column(slot, start, stop)))
            packed += stop - start
        fills += [Move(layout.column(slot, 0, length - count)),
                  Move(layout.column(slot, length - count, length),
                       Strided(first * layout.cell, layout.cell, layout.cell, count))]
    return CompactionPlan(gathers, fills, packed * layout.cell)


def layer_views(layers: list[int], layout: SlotLayout, max_context: int, start: int, steps: int,
                itemsize: int) -> list[DeviceArray]:
    """Positions [start, start + steps) of every layer allocated at `layers`: the views past() (start 0) and
    reserve() (start = length) hand out."""
    latent_dim = layout.cell // itemsize
    capacity = (max_context - start) * layout.pitch
    return [DeviceArray(pointer + start * layout.pitch, (steps, layout.slots, latent_dim), itemsize, capacity)
            for pointer in layers]


class DeviceLatentCache(MaskedLatentCache[DeviceArray]):
    def __init__(self, num_layers: int, latent_dim: int, slots: int, max_context: int, itemsize: int, stream: int):
        super().__init__(slots, max_context)
        self.latent_dim, self.itemsize, self.stream = latent_dim, itemsize, stream
        self.layout = SlotLayout(slots, latent_dim * itemsize)
        self.layers = [self._allocate(self.layout) for _ in range(num_layers)]
        self.scratch = DeviceBuffer()  # compaction's staging, allocated on first use

    def _allocate(self, layout: SlotLayout) -> int:
        pointer = cuda.malloc(self.max_context * layout.pitch)
        # Zeros, not garbage: a decode step padded to a CUDA-graph bucket reads (masked) rows past `length`,
        # and masked NaNs would still poison an additive mask.
        cuda.memset(pointer, self.max_context * layout.pitch, self.stream)
        return pointer

    def _views(self, start: int, steps: int) -> list[DeviceArray]:
        return layer_views(self.layers, self.layout, self.max_context, start, steps, self.itemsize)

    # -- the slot operations, as strided copies and memsets on the stream ----------------------------------------

    def _apply(self, moves: list[Move], target: int, source: int = 0) -> None:
        """Run `moves` with their targets in the buffer at `target` and sources in the one at `source`."""
        for move in moves:  # cuda_memory skips empty regions
            into, origin = move.target, move.source
            if origin is None:
                cuda.memset_2d(target + into.offset, into.pitch, into.width, into.height, self.stream)
            else:
                cuda.copy_2d(target + into.offset, into.pitch, source + origin.offset, origin.pitch, into.width,
                             into.height, self.stream)

    def _repack(self, slots: int, keep: int, used: int) -> None:
        layout = SlotLayout(slots, self.layout.cell)
        layers = [self._allocate(layout) for _ in self.layers]
        moves = repack_moves(self.layout, layout, keep, used)
        for target, source in zip(layers, self.layers):
            self._apply(moves, target, source)
        cuda.synchronize(self.stream)  # the old buffers are read until here
        self.close()
        self.layers, self.layout = layers, layout

    def _zero_columns(self, start: int, stop: int) -> None:
        moves = [Move(self.layout.block(start, stop))]
        for pointer in self.layers:
            self._apply(moves, pointer)

    def _place_rows(self, slot: int, prefilled: Self, start: int) -> None:
        moves = place_moves(self.layout, slot, start, prefilled.length)
        for target, source in zip(self.layers, prefilled.layers):
            self._apply(moves, target, source)
        cuda.synchronize(self.stream)  # the caller may free the prefilled cache as soon as this returns

    def _move_columns(self, kept: dict[int, Columns], length: int) -> None:
        plan = compaction_plan(self.layout, kept, length)
        scratch = self.scratch.reserve(plan.scratch_bytes)
        for pointer in self.layers:  # one scratch buffer serves every layer: the stream orders its uses
            self._apply(plan.gathers, scratch, pointer)
            self._apply(plan.fills, pointer, scratch)

    def close(self) -> None:
        for pointer in self.layers:
            cuda.free(pointer)
        self.layers = []
        self.scratch.close()

    def __del__(self) -> None:
        # Callers drop caches without closing them: by then a run() (which reads the logits back) or a slot
        # operation that hands buffers back has synchronised the stream.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have unloaded CUDA already
            pass


if TYPE_CHECKING:  # mypy (tests/typecheck) proves the device cache is a LatentCache
    _device_cache: type[LatentCache[DeviceArray]] = DeviceLatentCache
