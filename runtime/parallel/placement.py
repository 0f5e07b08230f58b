"""Which rank holds which routed expert.

Every rank holds ceil(E / N) or floor(E / N) experts of every MoE layer, so each one's resident expert bytes are
about 1/N of the total whatever the placement. Round-robin (expert e on rank e mod N) is the default; with routing
counts measured on a workload, each layer's experts are dealt busiest first to the least-loaded rank that still
has room (the greedy balancing of DeepSeek's EPLB, github.com/deepseek-ai/EPLB, without its replicas of hot
experts, which would cost memory).
"""

from __future__ import annotations

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.formats import RoutingCounts


def round_robin(num_experts: int, ranks: int) -> np.ndarray:
    """owner `[E]` int32: expert e on rank e mod N."""
    return (np.arange(num_experts) % ranks).astype(np.int32)


def balanced(counts: np.ndarray, ranks: int) -> np.ndarray:
    """owner `[E]` int32 for one layer's routed-token counts `[E]`: experts in descending count (ties by id) go to
    the rank with the least load (ties: lowest rank) among those with room: fewer than floor(E / N) experts, or
    exactly that many while fewer than E mod N ranks hold one more."""
    num_experts = len(counts)
    base, extra = divmod(num_experts, ranks)  # every rank holds `base` experts, `extra` of them one more
    held = np.zeros(ranks, dtype=np.int64)
    load = np.zeros(ranks, dtype=np.float64)
    owner = np.empty(num_experts, dtype=np.int32)
    for expert in np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable"):
        open_ranks = np.flatnonzero((held < base) | ((held == base) & (extra > 0)))
        rank = open_ranks[np.argmin(load[open_ranks])]
        if held[rank] == base:
            extra -= 1
        owner[expert] = rank
        load[rank] += counts[expert]
        held[rank] += 1
    return owner


def placement(num_experts: list[int], ranks: int, counts: RoutingCounts | None = None) -> list[np.ndarray]:
    """Per MoE layer (engine order, `num_experts[l]` experts each) the owner array `[E]` int32. Raises MoetrtError
    when `counts` were recorded on an engine of another shape."""
    if counts is None:
        return [round_robin(experts, ranks) for experts in num_experts]
    if len(counts.counts) != len(num_experts) or any(experts != counts.engine_experts for experts in num_experts):
        raise MoetrtError(f"the routing counts describe {len(counts.counts)} MoE layers of {counts.engine_experts} "
                          f"experts, this engine has {len(num_experts)} of {max(num_experts, default=0)}; record "
                          "them on this engine (`--record-routing FILE`)")
    return [balanced(np.asarray(layer), ranks) for layer in counts.counts]


def imbalance(owner: np.ndarray, counts: np.ndarray, ranks: int) -> float:
    """The busiest rank's routed tokens over the mean rank's (1.0: perfectly even), for one layer."""
    load = np.bincount(owner, weights=np.asarray(counts, dtype=np.float64), minlength=ranks)
    return float(load.max() / load.mean()) if load.sum() else 1.0
