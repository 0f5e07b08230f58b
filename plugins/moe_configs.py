"""Block sizes per routed-experts shape, from the small table in plugins/moe_configs.json.

The table holds untuned defaults for decode-sized and prefill-sized problems, and per-shape entries that
`bench/tune_moe.py` measures on a GPU. Pure Python: the TensorRT lowering reads it too.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from moetrt.plugins.moe_launch import ExpertsShape, TileConfig

TABLE_PATH = Path(__file__).with_name("moe_configs.json")


@functools.lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> dict:
    return json.loads(Path(path).read_text())


def shape_key(shape: ExpertsShape) -> str:
    """The table key: everything but T, which indexes inside an entry."""
    return f"E={shape.num_experts},H={shape.hidden},I={shape.inter},k={shape.top_k},dtype={shape.compute_dtype}"


def regime(shape: ExpertsShape, table: dict) -> str:
    """'decode' while experts see few rows each (weight-bandwidth bound), else 'prefill' (matrix-rate bound)."""
    rows_per_expert = shape.num_slots / shape.num_experts
    return "decode" if rows_per_expert <= table["decode_max_rows_per_expert"] else "prefill"


def select_config(shape: ExpertsShape, table: dict | None = None) -> TileConfig:
    """The tuned entry for this shape at the nearest measured T (log scale), else the regime's default."""
    table = load_table() if table is None else table
    tuned = table.get("tuned", {}).get(shape_key(shape))
    if tuned:
        by_tokens = {int(tokens): config for tokens, config in tuned["configs"].items()}
        nearest = min(by_tokens, key=lambda tokens: (abs(math.log2(tokens / shape.num_tokens)), tokens))
        return TileConfig.from_dict(by_tokens[nearest])
    family = "float32" if shape.compute_dtype == "float32" else "16-bit"
    return TileConfig.from_dict(table["defaults"][family][regime(shape, table)])
