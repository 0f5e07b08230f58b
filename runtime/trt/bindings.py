"""Where a TensorRT session binds its tensors, as pure arithmetic: TensorRT requires every tensor address to be a
multiple of 256 bytes (cudaMalloc returns such addresses).

The latent cache's past rows start at a layer's own allocation, but the new rows of a step start `length` cells
into it: with DeepSeek-V3's bf16 rows (576 values, 1,152 bytes per slot) that address is 256-aligned only when
length × slots is a multiple of 2 (tiny-r1's fp32 rows, exactly 256 bytes, hide it). So the engine writes new rows
into a staging buffer, each layer at an aligned offset (`StagingLayout`), and the session copies them into the
cache; `step_bindings` lists every address a step binds and `misaligned` names any that is not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from moetrt.runtime.trt.cuda_memory import DeviceArray

ALIGNMENT = 256


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class StagingLayout:
    """Every layer's new latent rows `[seq, batch, latent_dim]` in one buffer, each layer `pitch` bytes (its size
    rounded up to ALIGNMENT) after the one before."""

    num_layers: int
    seq: int
    batch: int
    latent_dim: int
    itemsize: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.seq, self.batch, self.latent_dim

    @property
    def layer_bytes(self) -> int:
        return self.seq * self.batch * self.latent_dim * self.itemsize

    @property
    def pitch(self) -> int:
        return align_up(self.layer_bytes)

    @property
    def nbytes(self) -> int:
        return self.pitch * self.num_layers

    def views(self, base: int) -> list[DeviceArray]:
        """The layers' rows in a buffer at `base` (256-aligned, as cudaMalloc returns)."""
        return [DeviceArray(base + layer * self.pitch, self.shape, self.itemsize, self.layer_bytes)
                for layer in range(self.num_layers)]


def step_bindings(inputs: Mapping[str, int], past: Sequence[tuple[str, DeviceArray]],
                  new: Sequence[tuple[str, DeviceArray]], logits: tuple[str, int]) -> dict[str, int]:
    """`{tensor name: address}` of everything one execution binds: host inputs (copied to their own buffers), the
    past rows, the new rows (staging views) and the logits."""
    addresses = dict(inputs)
    addresses.update({name: rows.pointer for name, rows in (*past, *new)})
    name, pointer = logits
    addresses[name] = pointer
    return addresses


def misaligned(addresses: Mapping[str, int]) -> list[str]:
    """The tensors whose address TensorRT would refuse, as 'name at 0x...'."""
    return [f"{name} at {pointer:#x}" for name, pointer in addresses.items() if pointer % ALIGNMENT]
