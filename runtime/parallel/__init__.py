"""Expert parallelism over MPI: the routed experts of every MoE layer split across processes (ranks), everything
else replicated. `mpiexec -n N moetrt generate ENGINE --expert-parallel ...` starts N copies of the command; rank 0
does the command's work (prompts, sampling, HTTP, the scheduler) and the others serve its steps.

- group.py: joining the MPI job (loopback-only transport on one host), the combine of the experts' partial outputs
  (Allreduce, or an Alltoallv of the rows each rank computed), timeouts that name a dead or hung rank.
- placement.py: which rank holds which expert (round-robin, or balanced from measured routing counts).
- mirror.py: rank 0's session and caches, which replay every step and cache move on the other ranks.

The ONNX Runtime session (runtime/ort/session.py) takes the group: it faults in only its own experts' pages of
experts.bin, hands the CPU kernel expert id -1 for the others' pairs, and combines after each MoE layer.
"""

from __future__ import annotations

from moetrt.runtime.parallel.options import ExpertParallelOptions

__all__ = ["ExpertParallelOptions"]
