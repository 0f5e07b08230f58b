"""The MLA latent KV cache (runtime/session.py's LatentCache): the bookkeeping every cache shares, and the host
(numpy) cache for ONNX Runtime.

Per layer one preallocated `[max_context, slots, latent_dim]` buffer (position-major), plus the attention
mask `[slots, max_context]`. A step passes the first `length` positions as zero-copy views and the graph's
new rows land directly in `[length, length + S)`: nothing copies the cache per step. Slots (batch rows) keep
their own lengths through the mask: a row's padding and finished positions are masked out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Generic

import numpy as np
import numpy.typing as npt

from moetrt.errors import MoetrtError
from moetrt.runtime.session import LatentCache, Mask, View

if TYPE_CHECKING:
    from typing_extensions import Self

HostRows = npt.NDArray[Any]  # one layer, or a view of it, in the engine's dtype (float32 or float16)
Columns = npt.NDArray[np.intp]  # column indices, ascending


class MaskedLatentCache(ABC, Generic[View]):
    """LatentCache's host-side state and slot operations, written once for every cache: the mask, `length` (P) and
    the context limit live here; subclasses hold the rows (per layer `[max_context, slots, D]`) and implement the
    five moves below, each keeping columns [0, P) finite (fresh columns are zeroed)."""

    def __init__(self, slots: int, max_context: int, draft_mask: bool = False):
        self.slots = slots
        self.max_context = max_context
        self.mask: Mask = np.zeros((slots, max_context), dtype=np.int64)
        # With an MTP module (an --mtp engine) its layer, the last, has a mask of its own: a row of it is valid only
        # when the token it read was the one that followed (runtime/speculative.py). It moves with `mask`.
        self.draft_mask: Mask | None = np.zeros((slots, max_context), dtype=np.int64) if draft_mask else None
        self.length = 0

    # -- the rows: what a subclass implements -----------------------------------------------------------------

    @abstractmethod
    def _views(self, start: int, steps: int) -> list[View]:
        """Per layer the rows `[steps, slots, D]` from column `start`, without a copy."""

    @abstractmethod
    def _repack(self, slots: int, keep: int, used: int) -> None:
        """New rows for `slots` slots (self.slots is still the old count): columns [0, used) of the first `keep`
        slots copied, those of the others zero."""

    @abstractmethod
    def _zero_columns(self, start: int, stop: int) -> None:
        """Zero columns [start, stop) of every slot."""

    @abstractmethod
    def _place_rows(self, slot: int, prefilled: Self, start: int) -> None:
        """`slot`'s columns [start, start + prefilled.length) from the prefilled cache's slot 0; [0, start) zero."""

    @abstractmethod
    def _move_columns(self, kept: dict[int, Columns], length: int) -> None:
        """Each slot's `kept` columns, in order, to [length - len(columns), length); its columns before them zero.
        A move may overlap itself."""

    # -- LatentCache ------------------------------------------------------------------------------------------

    def past(self) -> list[View]:
        return self._views(0, self.length)

    def reserve(self, steps: int) -> list[View]:
        self._check_room(self.length + steps)
        return self._views(self.length, steps)

    def attention_mask(self, steps: int, valid: Mask) -> Mask:
        self.mask[:, self.length : self.length + steps] = valid
        if self.draft_mask is not None:  # the MTP layer's rows count once a speculative call computes them
            self.draft_mask[:, self.length : self.length + steps] = 0
        return np.ascontiguousarray(self.mask[:, : self.length + steps])

    def draft_attention_mask(self, steps: int, valid: Mask | None = None) -> Mask:
        """The MTP layer's mask `[slots, length + steps]` for a speculative call whose MTP module runs on the next
        `steps` columns, marked with `valid` (`[slots, steps]`) when given."""
        assert self.draft_mask is not None, "a cache without an MTP layer"
        if valid is not None:
            self.draft_mask[:, self.length : self.length + steps] = valid
        return np.ascontiguousarray(self.draft_mask[:, : self.length + steps])

    def invalidate(self, slot: int, column: int, draft_only: bool = False) -> None:
        """Mask one column of `slot`: in the MTP layer only (its row read a token that did not follow), or in
        every layer (a rejected draft token's column). Its rows stay, finite."""
        if self.draft_mask is not None:
            self.draft_mask[slot, column] = 0
        if not draft_only:
            self.mask[slot, column] = 0

    def trim(self) -> None:
        """Give back trailing columns no slot uses (P moves down past them; the next call overwrites them)."""
        while self.length and not self.mask[:, self.length - 1].any():
            self.length -= 1

    def advance(self, steps: int) -> None:
        self.length += steps

    def resize(self, slots: int) -> None:
        keep, used = min(slots, self.slots), self.length
        self._repack(slots, keep, used)
        mask = np.zeros((slots, self.max_context), dtype=np.int64)
        mask[:keep, :used] = self.mask[:keep, :used]
        if self.draft_mask is not None:
            draft = np.zeros((slots, self.max_context), dtype=np.int64)
            draft[:keep, :used] = self.draft_mask[:keep, :used]
            self.draft_mask = draft
        self.slots, self.mask = slots, mask

    def extend_to(self, length: int) -> None:
        start = self.length
        if length <= start:
            return
        self._check_room(length)
        self._zero_columns(start, length)
        self.mask[:, start:length] = 0
        if self.draft_mask is not None:
            self.draft_mask[:, start:length] = 0
        self.length = length

    def place(self, slot: int, prefilled: Self) -> None:
        if prefilled.slots != 1:
            raise ValueError(f"place takes a batch-1 cache, not one of {prefilled.slots} slots")
        count = prefilled.length
        self.extend_to(count)
        end = self.length
        self._place_rows(slot, prefilled, end - count)
        self.mask[slot] = 0
        self.mask[slot, end - count : end] = prefilled.mask[0, :count]
        if self.draft_mask is not None:
            self.draft_mask[slot] = 0
            if prefilled.draft_mask is not None:
                self.draft_mask[slot, end - count : end] = prefilled.draft_mask[0, :count]

    def free(self, slot: int) -> None:
        self.mask[slot] = 0
        if self.draft_mask is not None:
            self.draft_mask[slot] = 0

    def reset(self) -> None:
        self.mask[:] = 0
        if self.draft_mask is not None:
            self.draft_mask[:] = 0
        self.length = 0

    def compact(self, slots: list[int]) -> None:
        end = self.length
        kept = {slot: np.flatnonzero(self.mask[slot, :end]) for slot in slots}
        length = max((len(columns) for columns in kept.values()), default=0)
        self._move_columns(kept, length)
        self.mask[:] = 0
        if self.draft_mask is not None:
            draft = {slot: self.draft_mask[slot, columns] for slot, columns in kept.items()}
            self.draft_mask[:] = 0
            for slot, columns in kept.items():
                self.draft_mask[slot, length - len(columns) : length] = draft[slot]
        for slot, columns in kept.items():
            self.mask[slot, length - len(columns) : length] = 1
        self.length = length

    def _check_room(self, length: int) -> None:
        if length > self.max_context:
            raise MoetrtError(
                f"sequence of {length} tokens exceeds the engine's context of {self.max_context}; "
                "shorten the prompt or max_new_tokens, or rebuild with a larger --max-context"
            )


class LatentKVCache(MaskedLatentCache[HostRows]):
    """The cache in host memory: per layer one numpy array `[max_context, slots, D]` in `dtype`."""

    def __init__(self, num_layers: int, latent_dim: int, slots: int, max_context: int,
                 dtype: npt.DTypeLike = np.float32, draft_mask: bool = False):
        super().__init__(slots, max_context, draft_mask)
        self.num_layers, self.latent_dim, self.dtype = num_layers, latent_dim, np.dtype(dtype)
        self.layers = self._allocate(slots)

    def _allocate(self, slots: int) -> list[HostRows]:
        # np.empty leaves untouched pages unallocated, so a long max_context costs only what is used.
        return [np.empty((self.max_context, slots, self.latent_dim), dtype=self.dtype) for _ in range(self.num_layers)]

    def _views(self, start: int, steps: int) -> list[HostRows]:
        return [layer[start : start + steps] for layer in self.layers]

    def _repack(self, slots: int, keep: int, used: int) -> None:
        layers = self._allocate(slots)
        for source, target in zip(self.layers, layers):
            target[:used, :keep] = source[:used, :keep]
            target[:used, keep:] = 0
        self.layers = layers

    def _zero_columns(self, start: int, stop: int) -> None:
        for layer in self.layers:
            layer[start:stop] = 0

    def _place_rows(self, slot: int, prefilled: Self, start: int) -> None:
        count = prefilled.length
        for layer, source in zip(self.layers, prefilled.layers):
            layer[:start, slot] = 0
            layer[start : start + count, slot] = source[:count, 0]

    def _move_columns(self, kept: dict[int, Columns], length: int) -> None:
        for layer in self.layers:
            for slot, columns in kept.items():
                values = layer[columns, slot]  # fancy indexing copies, so the move may overlap itself
                layer[: length - len(columns), slot] = 0
                layer[length - len(columns) : length, slot] = values


if TYPE_CHECKING:  # mypy (tests/typecheck) proves the host cache is a LatentCache
    _host_cache: type[LatentCache[HostRows]] = LatentKVCache
