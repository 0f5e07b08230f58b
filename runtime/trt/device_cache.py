"""The MLA latent cache in device memory, for TensorRT sessions: LatentKVCache's interface over device buffers.

Per layer one zero-filled `[max_context, slots, latent_dim]` allocation (position-major, as the graph expects).
`past()` and `reserve(steps)` return DeviceArray views the engine reads and writes in place; the mask, length and
context limit are LatentKVCache's own host-side bookkeeping (a LatentKVCache with no host layers).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from moetrt.runtime import cuda_memory as cuda
from moetrt.runtime.cuda_memory import DeviceArray
from moetrt.runtime.kv_cache import LatentKVCache


class DeviceLatentCache:
    def __init__(self, num_layers: int, latent_dim: int, slots: int, max_context: int, itemsize: int, stream: int):
        self.host = LatentKVCache(0, latent_dim, slots, max_context)
        self.latent_dim, self.itemsize = latent_dim, itemsize
        self.row_bytes = slots * latent_dim * itemsize  # one position of one layer
        self.layers = [cuda.malloc(max_context * self.row_bytes) for _ in range(num_layers)]
        # Zeros, not garbage: a decode step padded to a CUDA-graph bucket reads (masked) rows past `length`,
        # and masked NaNs would still poison an additive mask.
        for pointer in self.layers:
            cuda.memset(pointer, max_context * self.row_bytes, stream)

    @property
    def length(self) -> int:
        return self.host.length

    @property
    def slots(self) -> int:
        return self.host.slots

    @property
    def max_context(self) -> int:
        return self.host.max_context

    def _view(self, pointer: int, start: int, rows: int) -> DeviceArray:
        capacity = (self.max_context - start) * self.row_bytes
        return DeviceArray(pointer + start * self.row_bytes, (rows, self.slots, self.latent_dim), self.itemsize,
                           capacity)

    def past(self) -> list[DeviceArray]:
        """Per layer the filled prefix `[length, slots, D]`, which starts at the allocation itself."""
        return [self._view(pointer, 0, self.length) for pointer in self.layers]

    def reserve(self, steps: int) -> list[DeviceArray]:
        """Per layer the `[steps, slots, D]` rows the next call writes (raises past the context)."""
        self.host.reserve(steps)
        return [self._view(pointer, self.length, steps) for pointer in self.layers]

    def attention_mask(self, steps: int, valid: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return self.host.attention_mask(steps, valid)

    def advance(self, steps: int) -> None:
        self.host.advance(steps)

    def close(self) -> None:
        for pointer in self.layers:
            cuda.free(pointer)
        self.layers = []

    def __del__(self) -> None:
        # The generator drops caches without closing them; every run() has synchronised by then.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have unloaded CUDA already
            pass
