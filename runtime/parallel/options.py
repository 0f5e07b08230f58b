"""The options of expert parallelism (the `--expert-parallel` family of CLI options and `Engine.load`'s
`expert_parallel` keyword), importable without MPI."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

COMBINE_CHOICES = ("allreduce", "alltoallv")
DEFAULT_TIMEOUT = 20.0


@dataclasses.dataclass(frozen=True)
class ExpertParallelOptions:
    """How ranks split and combine the routed experts.

    placement: a routing-counts file (`--record-routing` writes one; moetrt/formats.py RoutingCounts) to balance
        the measured load over the ranks as DeepSeek's EPLB does (without its replication); None: round-robin,
        expert e on rank e mod N.
    combine: "allreduce" (an MPI Allreduce of every rank's partial [T, H] output; the default, see
        bench/NOTES.md "Expert parallelism" for the measurement) or "alltoallv" (each rank sends only the rows of
        the tokens it computed an expert for, and every rank sums them in rank order).
    timeout: seconds a rank waits for the others at any step before it exits with an error naming the ranks that
        did not arrive (a dead or hung process); an idle rank 0 checks the others every timeout / 4 seconds.
    record_routing: rank 0 counts each MoE layer's routed tokens per expert and writes them there at exit.
    """

    placement: Path | None = None
    combine: Literal["allreduce", "alltoallv"] = "allreduce"
    timeout: float = DEFAULT_TIMEOUT
    record_routing: Path | None = None

    def __post_init__(self):
        from moetrt.errors import MoetrtError

        if self.combine not in COMBINE_CHOICES:
            raise MoetrtError(f"expert-parallel combine must be one of {', '.join(COMBINE_CHOICES)}, not "
                              f"{self.combine!r}")
        if not (isinstance(self.timeout, (int, float)) and self.timeout >= 1):
            raise MoetrtError(f"--ep-timeout must be at least 1 second, got {self.timeout!r}")
