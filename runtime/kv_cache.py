"""The MLA latent KV cache, owned by the runtime, in the layout the exported graph fixed.

Per layer one preallocated `[max_context, slots, latent_dim]` buffer (position-major), plus the attention
mask `[slots, max_context]`. A step passes the first `length` positions as zero-copy views and the graph's
new rows land directly in `[length, length + S)`: nothing copies the cache per step. Slots (batch rows) keep
their own lengths through the mask: a row's padding and finished positions are masked out.
"""

from __future__ import annotations

import numpy as np

from moetrt.errors import MoetrtError


class LatentKVCache:
    def __init__(self, num_layers: int, latent_dim: int, slots: int, max_context: int, dtype=np.float32):
        self.max_context = max_context
        self.slots = slots
        # np.empty leaves untouched pages unallocated, so a long max_context costs only what is used.
        self.layers = [np.empty((max_context, slots, latent_dim), dtype=dtype) for _ in range(num_layers)]
        self.mask = np.zeros((slots, max_context), dtype=np.int64)
        self.length = 0

    def past(self) -> list[np.ndarray]:
        """Per layer the filled prefix `[length, slots, D]` (a contiguous view)."""
        return [layer[: self.length] for layer in self.layers]

    def reserve(self, steps: int) -> list[np.ndarray]:
        """Per layer the `[steps, slots, D]` view the next call writes its new rows into."""
        if self.length + steps > self.max_context:
            raise MoetrtError(
                f"sequence of {self.length + steps} tokens exceeds the engine's context of {self.max_context}; "
                "shorten the prompt or max_new_tokens, or rebuild with a larger --max-context"
            )
        return [layer[self.length : self.length + steps] for layer in self.layers]

    def attention_mask(self, steps: int, valid: np.ndarray) -> np.ndarray:
        """Mark the next `steps` positions (valid `[slots, steps]`, 1 for real tokens) and return the mask
        `[slots, length + steps]` for the call that fills them."""
        self.mask[:, self.length : self.length + steps] = valid
        return np.ascontiguousarray(self.mask[:, : self.length + steps])

    def advance(self, steps: int) -> None:
        self.length += steps
