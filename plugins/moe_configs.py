"""Block sizes per routed-experts shape, from the small table in plugins/moe_configs.json.

The table holds untuned defaults for decode-sized and prefill-sized problems, and per-shape entries that
`bench/tune_moe.py` measures on a GPU. Every entry is checked as it loads (TileConfig refuses block sizes that are
not powers of two, and tiles under 16, which tl.dot cannot take). Pure Python: the TensorRT lowering reads it too.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from moetrt.plugins.moe_launch import ExpertDims, ExpertsShape, TileConfig

TABLE_PATH = Path(__file__).with_name("moe_configs.json")
# The T at which an engine's decode and prefill configurations are looked up, each kept inside its regime.
DECODE_TOKENS, PREFILL_TOKENS = 64, 4096


@functools.lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> dict:
    table = json.loads(Path(path).read_text())
    check_table(table, path)
    return table


def check_table(table: dict, source: object = "the table") -> None:
    """Raise ValueError naming the first entry of `table` that is not a valid TileConfig."""
    entries = [(f"defaults/{family}/{regime}", config) for family, regimes in table["defaults"].items()
               for regime, config in regimes.items()]
    entries += [(f"tuned/{key}/{tokens}", config) for key, entry in table.get("tuned", {}).items()
                for tokens, config in entry["configs"].items()]
    for name, config in entries:
        try:
            TileConfig.from_dict(config)
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"{source}: {name} is not a usable block-size configuration: {error}") from None


def shape_key(shape: ExpertsShape) -> str:
    """The table key: everything but T, which indexes inside an entry."""
    return f"E={shape.num_experts},H={shape.hidden},I={shape.inter},k={shape.top_k},dtype={shape.compute_dtype}"


def engine_configs(dims: ExpertDims, dtype: str, table: dict | None = None) -> tuple[TileConfig, TileConfig, int]:
    """(decode configuration, prefill configuration, T from which the prefill one runs) for an engine's stage
    kernels, which serve every T of its profiles: the regime boundary of `regime`, each configuration looked up
    at a T inside its regime."""
    table = load_table() if table is None else table
    # Decode while T * k / E <= decode_max_rows_per_expert.
    prefill_from = max(1, table["decode_max_rows_per_expert"] * dims.num_experts // dims.top_k + 1)

    def at(tokens: int) -> TileConfig:
        shape = ExpertsShape(tokens, dims.hidden, dims.inter, dims.num_experts, dims.top_k, dtype, dtype)
        return select_config(shape, table)

    decode = at(min(DECODE_TOKENS, prefill_from - 1)) if prefill_from > 1 else at(1)
    return decode, at(max(PREFILL_TOKENS, prefill_from)), prefill_from


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
