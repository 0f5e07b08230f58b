"""What a routed-experts stage's plugin node carries and how its token count is found: pure, no tensorrt or triton.

The `trt` lowering writes the `launch` attribute (static dimensions, dtype, and two block-size configurations:
`StageAttribute`); the TensorRT registration (plugins/trt_plugin.py) reads it back, finds T from the stage's own
inputs (`tokens_input`) and evaluates `moe_launch.stage_geometry` on TensorRT's shape expressions; the tests, on a
GPU and off, evaluate the same geometry on ints.

Decode steps (few rows per expert: weight-bandwidth bound) and long prefill chunks (matrix-rate bound) want
different GEMM tiles. Align lays rows out in blocks of the larger block_m of the two configurations, so the GEMMs of
either read the one layout, and the output shapes do not depend on which runs. Each GEMM stage offers the two as
TensorRT tactics; its autotune function keeps the one for the profile's opt T (`tactic_for`), so the prefill and
the decode profile each run their own tiles. The JIT form picks by the actual T (`config_for`).
"""

from __future__ import annotations

import dataclasses
import json

from moetrt.plugins.moe_launch import (
    ExpertDims,
    ExpertsShape,
    LaunchPlan,
    StageGeometry,
    TileConfig,
    D,
    Minimum,
    plan_launch,
    stage_geometry,
)
from moetrt.plugins.spec import MOE_STAGES

# Where a stage finds T: (input name, divisor of that input's first dimension). combine sees only [T*k, H].
TOKENS_INPUT = {"align": ("topk_ids", False), "gate_up": ("hidden", False), "down": ("topk_weights", False),
                "combine": ("expert_out", True)}
# TensorRT tactics of the GEMM stages (custom tactics are positive; 0 is TensorRT's default, taken as decode).
DECODE_TACTIC, PREFILL_TACTIC = 1, 2
GEMM_STAGES = ("gate_up", "down")


def plugin_string(value: str) -> str:
    """A STRING attribute as the plugin receives it, without the C terminator: TensorRT's ONNX parser copies the
    attribute with its trailing NUL, and tensorrt.plugin's creator decodes those bytes as they are."""
    return value.split("\x00", 1)[0]


@dataclasses.dataclass(frozen=True)
class StageAttribute:
    """The `launch` attribute of a stage node: everything its kernel is compiled for except T. `decode_tiles` serves
    T < prefill_from, `prefill_tiles` the rest."""

    dims: ExpertDims
    dtype: str  # activations, weights and stage outputs: the export casts the whole model to one dtype
    decode_tiles: TileConfig
    prefill_tiles: TileConfig
    prefill_from: int  # token count from which prefill_tiles run

    def __post_init__(self) -> None:
        small, large = sorted((self.decode_tiles.block_m, self.prefill_tiles.block_m))
        if large % small:
            raise ValueError(f"block_m {small} does not divide {large}: the two configurations need one layout")
        if self.prefill_from < 1:
            raise ValueError(f"prefill_from={self.prefill_from} must be at least 1")

    @classmethod
    def uniform(cls, dims: ExpertDims, dtype: str, config: TileConfig) -> StageAttribute:
        """One configuration for every T."""
        return cls(dims, dtype, config, config, 1)

    @classmethod
    def select(cls, dims: ExpertDims, dtype: str, table: dict[str, object] | None = None) -> StageAttribute:
        """The decode and prefill configurations of plugins/moe_configs.json for these dimensions."""
        from moetrt.plugins.moe_configs import engine_configs

        decode, prefill, prefill_from = engine_configs(dims, dtype, table)
        return cls(dims, dtype, decode, prefill, prefill_from)

    @property
    def block_m(self) -> int:
        """Rows per block of the layout align writes: the larger block_m, a multiple of the other."""
        return max(self.decode_tiles.block_m, self.prefill_tiles.block_m)

    def tactic_for(self, tokens: int) -> int:
        return DECODE_TACTIC if tokens < self.prefill_from else PREFILL_TACTIC

    def tactic_config(self, tactic: int) -> TileConfig:
        return self.prefill_tiles if tactic == PREFILL_TACTIC else self.decode_tiles

    def config_for(self, tokens: int) -> TileConfig:
        return self.tactic_config(self.tactic_for(tokens))

    def plan(self, tokens: int, *, tactic: int | None = None, interpret: bool = False) -> LaunchPlan:
        """The four launches at `tokens` tokens, with the tactic's configuration (by default the one for T)."""
        config = self.config_for(tokens) if tactic is None else self.tactic_config(tactic)
        return plan_launch(self.shape(tokens), config, interpret=interpret, align_block=self.block_m)

    def geometry(self, stage: str, tokens: D, minimum: Minimum[D], tactic: int = DECODE_TACTIC) -> StageGeometry[D]:
        """`stage`'s geometry for `tokens` (an int or a TensorRT shape expression) under `tactic`; output shapes do
        not depend on the tactic."""
        return stage_geometry(stage, tokens, self.dims, self.tactic_config(tactic), minimum, self.block_m)

    def encode(self) -> str:
        return json.dumps({**dataclasses.asdict(self.dims), "dtype": self.dtype, "decode": self.decode_tiles.to_dict(),
                           "prefill": self.prefill_tiles.to_dict(), "prefill_from": self.prefill_from},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> StageAttribute:
        """Parse an attribute (a trailing C terminator is dropped); raises ValueError naming what is wrong."""
        text = plugin_string(text)
        try:
            data = json.loads(text)
            dims = ExpertDims(*(int(data[field.name]) for field in dataclasses.fields(ExpertDims)))
            attribute = cls(dims, str(data["dtype"]), TileConfig.from_dict(data["decode"]),
                            TileConfig.from_dict(data["prefill"]), int(data["prefill_from"]))
            attribute.shape(1)  # validates dtype and dimensions
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"bad `launch` attribute {text[:200]!r}: {error}") from None
        return attribute

    def shape(self, num_tokens: int) -> ExpertsShape:
        d = self.dims
        return ExpertsShape(num_tokens, d.hidden, d.inter, d.num_experts, d.top_k, self.dtype, self.dtype)


def tokens_input(stage: str) -> tuple[int, bool]:
    """(index of the stage input whose first dimension gives T, whether that dimension is T*k)."""
    name, per_slot = TOKENS_INPUT[stage]
    return MOE_STAGES[stage].input_names.index(name), per_slot
