"""The options of expert parallelism (the `--expert-parallel` family of CLI options and `Engine.load`'s
`expert_parallel` keyword), importable without MPI."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

COMBINE_CHOICES = ("allreduce", "alltoallv")
DEFAULT_TIMEOUT = 20.0
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 86400.0  # a day: a rank that waits longer is lost


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
    record_routing: rank 0 counts each MoE layer's routed tokens per expert and writes them there at exit (the
        path is checked for writing when the job starts).
    Raises MoetrtError for a combine not in COMBINE_CHOICES or a timeout outside [MIN_TIMEOUT, MAX_TIMEOUT].
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
        if not (isinstance(self.timeout, (int, float)) and MIN_TIMEOUT <= self.timeout <= MAX_TIMEOUT):
            raise MoetrtError(f"--ep-timeout must lie in [{MIN_TIMEOUT:g}, {MAX_TIMEOUT:g}] seconds, got "
                              f"{self.timeout!r}")
