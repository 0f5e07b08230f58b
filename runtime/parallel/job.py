"""Joining the MPI job: one ExpertGroup per process, made on the first call."""

from __future__ import annotations

import atexit
import os
import signal
import threading

from moetrt.errors import MoetrtError
from moetrt.runtime.parallel.group import ExpertGroup, ascii_output_only, escape_non_ascii_output, import_mpi
from moetrt.runtime.parallel.mirror import leave_unused, release_unused
from moetrt.runtime.parallel.options import ExpertParallelOptions

_group: ExpertGroup | None = None


def join(options: ExpertParallelOptions) -> ExpertGroup:
    """This process's place in the MPI job (MPI starts on the first call, with the loopback transport on one host:
    group.py; later calls return the same group). Exit handlers keep the ranks in step should one end before it
    opened the engine (mirror.py release_unused, leave_unused); SIGQUIT (the launcher ending the job) exits with
    status 1 and one line. Under a launcher that forwards ASCII only (MPICH's gforker) stdout and stderr escape
    other characters. Raises MoetrtError without mpi4py, or when the options differ from
    the first call's."""
    global _group
    if _group is None:
        if ascii_output_only(dict(os.environ)):
            escape_non_ascii_output()
        _group = ExpertGroup(import_mpi(), options)
        atexit.register(release_unused if _group.rank == 0 else leave_unused, _group)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGQUIT, _group.stopped_by_launcher)
    elif _group.options != options:
        raise MoetrtError("expert parallelism was already started with other options")
    return _group
