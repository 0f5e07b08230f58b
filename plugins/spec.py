"""The routed-experts plugin spec: the single definition of the custom node every backend agrees on.

The ONNX emitter, the lowering passes, the TensorRT registration and the tests all read `ROUTED_EXPERTS`, and
`MOE_STAGES`: the four single-kernel nodes the `trt` lowering expands it into, one per ahead-of-time kernel.
Shapes use T tokens, H hidden, I expert intermediate size, E experts, k active experts per token, P the
expert-sorted rows padded to blocks, B = P / block_m the blocks.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str, ...]
    dtypes: tuple[str, ...]
    optional: bool = False
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    op_type: str
    domain: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: dict[str, object]

    @property
    def qualified_name(self) -> str:
        """`domain::op_type`, as torch.onnx.ops.symbolic and tensorrt.plugin name it."""
        return f"{self.domain}::{self.op_type}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def required_inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(spec for spec in self.inputs if not spec.optional)


ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_DTYPES = (*ACTIVATION_DTYPES, "float8e4m3fn", "int8")

ROUTED_EXPERTS = PluginSpec(
    op_type="RoutedExperts",
    domain="moetrt",
    version=1,
    inputs=(
        TensorSpec("hidden", ("T", "H"), ACTIVATION_DTYPES, doc="tokens after post-attention norm"),
        TensorSpec("topk_ids", ("T", "k"), ("int32",), doc="chosen expert per token and slot"),
        TensorSpec("topk_weights", ("T", "k"), ("float32",), doc="final routing weights (scaled)"),
        TensorSpec(
            "w_gate_up", ("E", "2*I", "H"), WEIGHT_DTYPES, doc="per expert: gate rows then up rows, [out, in]"
        ),
        TensorSpec("w_down", ("E", "H", "I"), WEIGHT_DTYPES, doc="per expert down projection, [out, in]"),
        TensorSpec(
            "w_gate_up_scale",
            ("E", "ceil(2*I/128)", "ceil(H/128)"),
            ("float32", "float16"),
            optional=True,
            doc="fp8: a 128x128 block's scale; int8/int4: float16 [E, 2I, H/g] (block_size [1, g]); w = q * scale",
        ),
        TensorSpec(
            "w_down_scale", ("E", "ceil(H/128)", "ceil(I/128)"), ("float32", "float16"), optional=True,
            doc="as w_gate_up_scale",
        ),
    ),
    outputs=(TensorSpec("output", ("T", "H"), ACTIVATION_DTYPES, doc="sum_k w[t,k] * expert_k(hidden[t])"),),
    # activation: silu(gate) * up. block_size: the scale blocks ([out, in]): fp8's (128, 128), or (1, g) for
    # int8/int4 weights (moetrt/quantization.py), whose nodes also carry `bits` (QUANTIZED_BITS_ATTRIBUTE: 8 or 4,
    # int4 values held one per int8 byte). Backends without quantized experts refuse nodes that carry it.
    attributes={"activation": "silu", "block_size": (128, 128)},
)


QUANTIZED_BITS_ATTRIBUTE = "bits"


def scale_shape(out_features: int, in_features: int, block_size: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of one expert's fp8 block-scale matrix for an [out, in] weight."""
    return math.ceil(out_features / block_size[0]), math.ceil(in_features / block_size[1])


# The stage nodes carry one string attribute, `launch`: the static dimensions, dtypes and block sizes as JSON
# (plugins/trt_stages.py). One attribute cannot be bound out of order, and it reads whole in a graph viewer.
LAUNCH_ATTRIBUTE = "launch"


def _stage(op_type: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> PluginSpec:
    return PluginSpec(op_type, ROUTED_EXPERTS.domain, ROUTED_EXPERTS.version, inputs, outputs, {LAUNCH_ATTRIBUTE: ""})


def _unquantised(weight: TensorSpec) -> TensorSpec:
    """The Triton stages take weights in an activation dtype (fp8 checkpoints are dequantised on load)."""
    return dataclasses.replace(weight, dtypes=ACTIVATION_DTYPES)


_IDS = TensorSpec("topk_ids", ("T", "k"), ("int32",))
_WEIGHTS = TensorSpec("topk_weights", ("T", "k"), ("float32",))
_SORTED = TensorSpec("sorted_slots", ("P",), ("int32",), doc="slot t*k+j of each expert-sorted row; T*k on padding")
_BLOCKS = TensorSpec("block_experts", ("B",), ("int32",), doc="expert of each block of block_m rows; -1 past the used")
_PADDED = TensorSpec("num_padded", ("1",), ("int32",), doc="rows in use")
_ALIGNED = (_SORTED, _BLOCKS, _PADDED)
_ACT = TensorSpec("act", ("P", "I"), ACTIVATION_DTYPES, doc="silu(x W_gate^T) * (x W_up^T) per sorted row")
_EXPERT_OUT = TensorSpec("expert_out", ("T*k", "H"), ACTIVATION_DTYPES, doc="w[t,j] * expert(x_t) at slot t*k+j")

# align -> gate_up (+SiLU) -> down (+ routing weight) -> combine (sum over k). Weighting in `down` gives it an input
# shaped [T, k], so every stage's outputs follow from its own inputs' shapes, as TensorRT's shape functions need.
MOE_STAGES = {
    "align": _stage("MoeAlign", (_IDS,), _ALIGNED),
    "gate_up": _stage(
        "MoeGateUp", (ROUTED_EXPERTS.inputs[0], _unquantised(ROUTED_EXPERTS.inputs[3]), *_ALIGNED), (_ACT,)
    ),
    "down": _stage("MoeDown", (_ACT, _unquantised(ROUTED_EXPERTS.inputs[4]), _WEIGHTS, *_ALIGNED), (_EXPERT_OUT,)),
    "combine": _stage("MoeCombine", (_EXPERT_OUT,), ROUTED_EXPERTS.outputs),
}
