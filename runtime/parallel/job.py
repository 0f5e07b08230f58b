"""Joining the MPI job: one ExpertGroup per process, made on the first call."""

from __future__ import annotations

import atexit

from moetrt.errors import MoetrtError
from moetrt.runtime.parallel.group import ExpertGroup, import_mpi
from moetrt.runtime.parallel.mirror import release_unused
from moetrt.runtime.parallel.options import ExpertParallelOptions

_group: ExpertGroup | None = None


def join(options: ExpertParallelOptions) -> ExpertGroup:
    """This process's place in the MPI job (MPI starts on the first call, with the loopback transport on one host:
    group.py; later calls return the same group). On rank 0 an exit handler releases the other ranks should the
    command end before it opened the engine. Raises MoetrtError without mpi4py, or when the options differ from
    the first call's."""
    global _group
    if _group is None:
        _group = ExpertGroup(import_mpi(), options)
        if _group.rank == 0:
            atexit.register(release_unused, _group)
    elif _group.options != options:
        raise MoetrtError("expert parallelism was already started with other options")
    return _group
