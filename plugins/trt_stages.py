"""What a routed-experts stage's plugin node carries and how its token count is found: pure, no tensorrt or triton.

The `trt` lowering writes the `launch` attribute (static dimensions, dtypes, block sizes: `StageAttribute`); the
TensorRT registration (plugins/trt_plugin.py) reads it back, finds T from the stage's own inputs (`tokens_input`)
and evaluates `moe_launch.stage_geometry` on TensorRT's shape expressions; the tests, on a GPU and off, evaluate
the same geometry on ints.
"""

from __future__ import annotations

import dataclasses
import json

from moetrt.plugins.moe_launch import ExpertDims, ExpertsShape, TileConfig
from moetrt.plugins.spec import MOE_STAGES

# Where a stage finds T: (input name, divisor of that input's first dimension). combine sees only [T*k, H].
TOKENS_INPUT = {"align": ("topk_ids", False), "gate_up": ("hidden", False), "down": ("topk_weights", False),
                "combine": ("expert_out", True)}


@dataclasses.dataclass(frozen=True)
class StageAttribute:
    """The `launch` attribute of a stage node: everything its kernel is compiled for except T."""

    dims: ExpertDims
    dtype: str  # activations, weights and stage outputs: the export casts the whole model to one dtype
    config: TileConfig

    def encode(self) -> str:
        return json.dumps({**dataclasses.asdict(self.dims), "dtype": self.dtype, "config": self.config.to_dict()},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> StageAttribute:
        """Parse an attribute; raises ValueError naming what is wrong."""
        try:
            data = json.loads(text)
            dims = ExpertDims(*(int(data[field.name]) for field in dataclasses.fields(ExpertDims)))
            attribute = cls(dims, str(data["dtype"]), TileConfig.from_dict(data["config"]))
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
