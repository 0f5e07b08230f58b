"""Weight-only quantization schemes: symmetric block-wise int8 and int4, one scale per group of input channels.

The numbers every consumer shares (the export, moetrt's CPU kernel, ONNX Runtime's QMoE and DequantizeLinear):
one scale `d` per `group_size` consecutive input (reduction) channels of one output row, no zero point.

- int8: d = max|w| / 127 over the group, q = round(w / d) in [-127, 127] (llama.cpp's Q8_0 rule).
- int4: m = the group's value of largest magnitude, signed; d = m / -8, q = round(w / d) clipped to [-8, 7]
  (llama.cpp's Q4_0 rule, ggml-quants.c quantize_row_q4_0_ref: the extreme value lands exactly on -8, so all 16
  levels are used).

`d` is rounded to float16 first and `q` computed against the rounded value, so the dequantized weight is
`q * float(d16)` exactly, wherever it is evaluated. numpy only: the runtime and the kernels' tests use it too.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moetrt.errors import MoetrtError

QUANTIZE_CHOICES = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
BITS = {"int8": 8, "int4": 4}
QMAX = {8: 127, 4: 7}
QMIN = {8: -127, 4: -8}


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """Symmetric block-wise weight quantization: `bits` 8 or 4, one float16 scale per `group_size` input channels
    (a power of two, at least 16: ONNX Runtime's MatMulNBits and QMoE take no other). Raises MoetrtError
    otherwise."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.bits not in QMAX:
            raise MoetrtError(f"quantization bits must be 8 or 4, got {self.bits}")
        size = self.group_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 16 or size & (size - 1):
            raise MoetrtError(f"--group-size must be a power of two of at least 16, got {size!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def fits(self, in_features: int) -> bool:
        """Whether a weight with `in_features` input channels splits into whole groups."""
        return in_features % self.group_size == 0


def scheme_for(quantize: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantScheme | None:
    """The scheme `--quantize` names ("none" -> None). Raises MoetrtError for an unknown name or group size."""
    if quantize not in QUANTIZE_CHOICES:
        raise MoetrtError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    scheme = QuantScheme(BITS.get(quantize, 8), group_size)  # the group size is checked even for "none"
    return None if quantize == "none" else scheme


def quantize_blocks(weight: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """`weight` float `[..., K]` -> (q int8 `[..., K]`, d float16 `[..., K / group_size]`), groups along the last
    axis. Raises MoetrtError when K is not a multiple of the group size. Works in float32 one group row at a time
    per call: memory is a small multiple of the input's."""
    k = weight.shape[-1]
    if not scheme.fits(k):
        raise MoetrtError(f"a weight's {k} input channels are not a multiple of the group size {scheme.group_size}")
    groups = np.asarray(weight, dtype=np.float32).reshape(*weight.shape[:-1], k // scheme.group_size, scheme.group_size)
    if scheme.bits == 8:
        d = np.abs(groups).max(axis=-1) / np.float32(127)
    else:
        at = np.abs(groups).argmax(axis=-1)[..., None]
        d = np.take_along_axis(groups, at, axis=-1)[..., 0] / np.float32(-8)
    d16 = d.astype(np.float16)
    d32 = d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(d32 != 0, np.float32(1) / d32, np.float32(0))
    q = np.rint(groups * inverse[..., None])
    q = np.clip(q, QMIN[scheme.bits], QMAX[scheme.bits]).astype(np.int8)
    return q.reshape(weight.shape), d16


def dequantize_blocks(q: np.ndarray, d: np.ndarray, group_size: int) -> np.ndarray:
    """(q int8 `[..., K]`, d float16/float32 `[..., K / group_size]`) -> float32 `[..., K]` = q * d per group."""
    k = q.shape[-1]
    groups = q.reshape(*q.shape[:-1], k // group_size, group_size).astype(np.float32)
    return (groups * d.astype(np.float32)[..., None]).reshape(q.shape)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values in int8 `[..., K]` (K even) -> uint8 `[..., K / 2]`, two per byte, low nibble first, each as
    its two's-complement nibble (ONNX's INT4 packing: onnx.numpy_helper / the ONNX spec's 4-bit types); values
    already unsigned (0-15, any integer dtype) pack as themselves."""
    if q.shape[-1] % 2:
        raise MoetrtError("int4 packing needs an even number of values per row")
    nibbles = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_int4`: uint8 `[..., K / 2]` -> int8 `[..., K]` in [-8, 7]."""
    low = (packed & 0xF).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    values = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return np.where(values > 7, values - 16, values).astype(np.int8)
