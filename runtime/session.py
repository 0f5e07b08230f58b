"""The hand-offs between a backend and the code that drives it: a `Session` runs the graph, a `LatentCache` holds
the MLA latent rows it reads and writes. Generation (runtime/generate.py) and the serving scheduler
(runtime/scheduler.py) use only these two protocols, so they work for every backend: host numpy caches for ONNX
Runtime (runtime/kv_cache.py), device caches for TensorRT (runtime/trt/device_cache.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; only mypy reads it here

# One layer's rows as the backend binds them: a numpy array (host) or a DeviceArray (device memory).
View = TypeVar("View")
Mask = npt.NDArray[np.int64]
Logits = npt.NDArray[np.float32] | npt.NDArray[np.float16]


class LatentCache(Protocol[View]):
    """Preallocated latent rows for `slots` sequences (batch rows), per layer `[max_context, slots, D]`
    (position-major, D = kv_lora_rank + qk_rope_head_dim, the engine's dtype), plus the attention mask
    `[slots, max_context]` int64 (1 where a slot's column holds one of its tokens).

    `length` (P) is the column the next call writes for every slot. A slot's tokens are its unmasked columns
    below P; where they sit does not matter (RoPE positions are the caller's). Columns [0, P) of every slot
    always hold finite values: a masked column weighs exactly 0 in attention, but 0 * NaN would not be 0.

    Generation uses `past`, `reserve`, `attention_mask` and `advance`, a step at a time; the scheduler moves
    requests in and out of slots with the rest. Those copy rows only when called, never per step.
    """

    @property
    def slots(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def max_context(self) -> int: ...

    def past(self) -> list[View]:
        """Per layer the filled prefix `[length, slots, D]`, without a copy (C-contiguous)."""
        ...

    def reserve(self, steps: int) -> list[View]:
        """Per layer the `[steps, slots, D]` rows the next call writes in place, at columns [P, P + steps).
        Raises MoetrtError when P + steps exceeds max_context."""
        ...

    def attention_mask(self, steps: int, valid: Mask) -> Mask:
        """Mark the next `steps` columns with `valid` (`[slots, steps]` int64, 1 for real tokens); returns the mask
        `[slots, length + steps]` int64 (C-contiguous) for the call that fills them."""
        ...

    def advance(self, steps: int) -> None:
        """The call wrote its `steps` rows: P grows by `steps`."""
        ...

    def resize(self, slots: int) -> None:
        """Re-pack into `slots` slots: the first min(old, new) keep their columns [0, P) and mask; new slots are
        masked and zeroed. One copy of the used columns."""
        ...

    def extend_to(self, length: int) -> None:
        """Move P up to `length` (no-op when P is already there); the skipped columns are masked and zeroed for
        every slot. Raises MoetrtError past max_context."""
        ...

    def place(self, slot: int, prefilled: Self) -> None:
        """Copy a prefilled batch-1 cache of the same kind (its L = `prefilled.length` rows) into `slot` at columns
        [P - L, P), first extending P to L; the slot's earlier columns are masked and zeroed."""
        ...

    def free(self, slot: int) -> None:
        """Mask all of `slot`'s columns (its rows stay, finite)."""
        ...

    def reset(self) -> None:
        """Mask everything and start over at column 0 (nothing is copied)."""
        ...

    def compact(self, slots: list[int]) -> None:
        """Move each listed slot's unmasked columns, in order, to end at the new P (the longest count among them);
        their earlier columns are zeroed, and every other slot is masked. One copy per listed slot."""
        ...


class Session(Protocol[View]):
    """What a backend offers the generator: one graph call at a time over a latent cache it allocated.

    `new_cache` puts the cache where the backend wants it (host memory for ONNX Runtime on the CPU, device memory
    for TensorRT); `run` receives that cache's `past()` and `reserve(S)` views.
    """

    backend: str
    num_layers: int
    latent_dim: int
    vocab_size: int

    def new_cache(self, slots: int, max_context: int) -> LatentCache[View]:
        ...

    def run(
        self,
        input_ids: npt.NDArray[np.int64],
        position_ids: npt.NDArray[np.int64],
        attention_mask: Mask,
        logit_positions: npt.NDArray[np.int64],
        past: list[View],
        new_rows: list[View] | None = None,
    ) -> tuple[Logits, list[View]]:
        """ids/positions `[B, S]`, mask `[B, P+S]`, logit_positions `[B, N]` (int64), past per layer `[P, B, D]`;
        returns logits `[B, N, vocab]` (numpy) and the new rows `[S, B, D]` per layer (written into `new_rows` when
        given, else into the session's own memory)."""
        ...
