"""The MPI side of expert parallelism: joining the job, combining the experts' partial outputs, and never
hanging silently.

Transport. On one host (every rank on this node, which hydra's `MPI_LOCALNRANKS` tells, or a launcher that
forks locally only, such as MPICH's `mpiexec.gforker`) moetrt selects MPICH's shared-memory path before MPI
starts: the ofi netmod with libfabric's `shm` provider. MPICH's default UCX netmod would otherwise open TCP
listeners on the host's network addresses. Variables the user set win (a multi-host job sets its own, see
docs/expert-parallel.md).

Waiting. Every collective is nonblocking and polled: a rank that waits longer than `timeout` seconds for the
others asks who is alive (a small message to every rank, then a grace period) and exits with one line naming
the ranks that did not answer. While a wait lasts more than a quarter of the timeout, `problem()` says so, and the
HTTP server on rank 0 answers 503.
"""

from __future__ import annotations

import atexit
import codecs
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.parallel.options import ExpertParallelOptions

# MPICH reads these at MPI_Init: shared memory between the ranks of one host, no sockets at all.
LOOPBACK_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "shm"}
PING_TAG, PONG_TAG = 7301, 7302  # liveness pings between ranks (wait)
ALIVE_GRACE = 2.0  # seconds a rank diagnosing a stall waits for the others' replies
# After a SIGINT: MPICH's gforker sends SIGINT to the survivors when a rank dies, and SIGQUIT a second later.
INTERRUPT_GRACE = 0.5
STALL_FRACTION = 0.25  # a wait longer than this part of the timeout (at least a second) makes problem() report it
INSTALL_HINT = "pip install 'moetrt[mpi]' (mpi4py and MPICH's wheel), then launch with `mpiexec -n N moetrt ...`"


@dataclass
class CombineStats:
    """Time spent combining routed-expert outputs: `calls` combines (one per MoE layer per step), `seconds` in
    them (the transfer plus waiting for the slowest rank), `bytes` sent by this rank."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0
    per_layer_seconds: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.calls, self.seconds, self.bytes = 0, 0.0, 0
        self.per_layer_seconds = [0.0] * len(self.per_layer_seconds)


def _check_writable(path: Path) -> None:
    """MoetrtError now, not at the end of the job, when `path` cannot be written (a file made for the check is
    removed)."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise MoetrtError(f"cannot write --record-routing {path} ({error.strerror}); give a writable path") from None
    if not existed:
        path.unlink()


def ascii_output_only(environ: dict[str, str]) -> bool:
    """True under a launcher that forwards only ASCII output: MPICH's gforker (it sets PMI_FD but none of hydra's
    MPI_LOCALNRANKS / PMI_HOSTNAME), whose forwarding stops at the first byte above 0x80."""
    return "PMI_FD" in environ and "MPI_LOCALNRANKS" not in environ and "PMI_HOSTNAME" not in environ


ASCII_ESCAPE = "moetrt_ascii_escape"


class _EscapingEncoder(codecs.IncrementalEncoder):
    def encode(self, input: str, final: bool = False) -> bytes:
        return input.encode("ascii", "backslashreplace")


class _AsciiDecoder(codecs.IncrementalDecoder):
    def decode(self, input: bytes, final: bool = False) -> str:
        return bytes(input).decode("ascii", "replace")


def _find_ascii_escape(name: str) -> codecs.CodecInfo | None:
    if name != ASCII_ESCAPE:
        return None
    return codecs.CodecInfo(
        encode=lambda text, errors="strict": (text.encode("ascii", "backslashreplace"), len(text)),
        decode=lambda data, errors="strict": (bytes(data).decode("ascii", "replace"), len(data)),
        incrementalencoder=_EscapingEncoder, incrementaldecoder=_AsciiDecoder, name=ASCII_ESCAPE)


def escape_non_ascii_output() -> None:
    """Write non-ASCII characters on stdout and stderr as Python escapes (`\\u2026`), so a launcher that forwards
    ASCII only (ascii_output_only) loses nothing that follows them. A codec of its own name, not "ascii" with
    errors="backslashreplace": click takes an ASCII stream for a misconfigured one and writes UTF-8 around it."""
    codecs.register(_find_ascii_escape)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(encoding=ASCII_ESCAPE)


def single_host_launch(environ: dict[str, str]) -> bool:
    """True unless the launcher says some ranks run on other hosts (hydra sets MPI_LOCALNRANKS and PMI_SIZE,
    Open MPI OMPI_COMM_WORLD_LOCAL_SIZE and OMPI_COMM_WORLD_SIZE)."""
    for local, total in (("MPI_LOCALNRANKS", "PMI_SIZE"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE")):
        if local in environ and total in environ:
            return environ[local] == environ[total]
    return True


def import_mpi():
    """mpi4py's MPI module, initialised with the loopback transport on one host. MoetrtError naming the extra when
    mpi4py or an MPI library is missing."""
    if single_host_launch(dict(os.environ)):
        for name, value in LOOPBACK_ENV.items():
            os.environ.setdefault(name, value)
    try:
        import mpi4py

        mpi4py.rc.thread_level = "multiple"  # rank 0's heartbeat thread and its generation thread take turns
        from mpi4py import MPI
    except ImportError as error:
        raise MoetrtError(f"--expert-parallel needs mpi4py and an MPI library ({error}): {INSTALL_HINT}") from None
    except RuntimeError as error:  # mpi4py finds no MPI library
        raise MoetrtError(f"--expert-parallel cannot start MPI ({error}): {INSTALL_HINT}") from None
    return MPI


class ExpertGroup:
    """The ranks of one MPI job, each holding a share of every MoE layer's experts.

    `rank`, `size`: this process's rank and the job's size; `local_size`: ranks on this host (they share its
    cores: `default_threads` is this host's cores divided among them). `place` decides `owners` (per MoE layer
    the owner rank of each expert, placement.py) before any combine. Made by job.join, once per process."""

    def __init__(self, mpi, options: ExpertParallelOptions):
        self.MPI = mpi
        self.options = options
        self.comm = mpi.COMM_WORLD.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(mpi.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()
        self.timeout = float(options.timeout)
        self.owners: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self.stats = CombineStats()
        self.lock = threading.RLock()  # a step, a heartbeat or the stop: one at a time (liveness pings aside)
        self._waiting_since: float | None = None
        self._waiting_for = ""
        self._failed: str | None = None
        self._sends: list = []  # liveness messages still in flight (their buffers must live until sent)
        self._sends_lock = threading.Lock()
        self.interrupted = False  # set by SIGINT handlers (mirror.py): look for a dead rank at once
        self.routing_counts: list[np.ndarray] | None = None
        self.mirrored = False  # rank 0 opened its MirroredSession (mirror.py)
        self.readied = False  # this rank took part in the end-of-loading Allgather (mirror.ready)
        self.following = False  # a rank other than 0 entered its loop (mirror.follow)

    # -- placement ------------------------------------------------------------------------------------------

    @property
    def default_threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // max(1, self.local_size))

    def place(self, num_experts: list[int]) -> None:
        """Decide every MoE layer's owners (round-robin, or balanced from options.placement's counts)."""
        from moetrt.formats import read_routing_counts
        from moetrt.runtime.parallel.placement import placement

        if self.size > min(num_experts, default=self.size):
            raise MoetrtError(f"{self.size} ranks but {min(num_experts)} routed experts per layer: every rank must "
                              f"hold at least one; launch at most {min(num_experts)} ranks")
        counts = read_routing_counts(self.options.placement) if self.options.placement else None
        self.owners = placement(num_experts, self.size, counts)
        # global expert id -> position among this rank's experts (its kernel holds only those), -1 elsewhere
        self._positions = []
        for owner in self.owners:
            positions = np.full(len(owner), -1, dtype=np.int32)
            mine = np.flatnonzero(owner == self.rank)
            positions[mine] = np.arange(len(mine), dtype=np.int32)
            self._positions.append(positions)
        self.stats.per_layer_seconds = [0.0] * len(num_experts)
        if self.options.record_routing is not None and self.rank == 0:
            _check_writable(self.options.record_routing)
            self.routing_counts = [np.zeros(experts, dtype=np.int64) for experts in num_experts]
            atexit.register(self._write_routing_counts, max(num_experts, default=0))

    def describe(self, session_fingerprint: str) -> str:
        """`session_fingerprint` plus what this group decided (the combine, a digest of the placement): what every
        rank must agree on (mirror.ready)."""
        import hashlib

        digest = hashlib.sha256(b"".join(owner.tobytes() for owner in self.owners)).hexdigest()[:12]
        return f"{session_fingerprint}; combine {self.options.combine}; placement {digest}"

    def local_experts(self, layer: int) -> np.ndarray:
        """The expert ids of `layer` this rank holds, ascending."""
        return np.flatnonzero(self.owners[layer] == self.rank)

    def local_ids(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """topk ids `[T, k]` int32 (global expert ids) as positions among this rank's experts (`local_experts`
        order, what its kernel holds), -1 for the pairs of other ranks' experts (the kernel skips them)."""
        if self.routing_counts is not None:
            self.routing_counts[layer] += np.bincount(ids.ravel(), minlength=len(self.owners[layer]))
        return self._positions[layer][ids]

    def _write_routing_counts(self, num_experts: int) -> None:
        from moetrt.formats import RoutingCounts, write_routing_counts

        assert self.routing_counts is not None and self.options.record_routing is not None
        counts = RoutingCounts(num_experts, tuple(tuple(int(c) for c in layer) for layer in self.routing_counts))
        try:
            write_routing_counts(self.options.record_routing, counts)
        except OSError as error:
            print(f"error: cannot write the routing counts to {self.options.record_routing} ({error.strerror})",
                  file=sys.stderr)
            return
        print(f"expert parallelism: wrote routing counts to {self.options.record_routing}", file=sys.stderr)

    # -- combine --------------------------------------------------------------------------------------------

    def combine(self, layer: int, out: np.ndarray, ids: np.ndarray) -> None:
        """Sum every rank's partial routed-expert output `out` `[T, H]` float32 in place (each rank computed the
        pairs of its own experts; `ids` `[T, k]` are the layer's global topk ids, the same on every rank)."""
        start = time.perf_counter()
        if self.options.combine == "allreduce":
            self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM), f"MoE layer {layer}")
            self.stats.bytes += out.nbytes
        else:
            self._alltoallv(layer, out, ids)
        spent = time.perf_counter() - start
        self.stats.calls += 1
        self.stats.seconds += spent
        self.stats.per_layer_seconds[layer] += spent

    def _alltoallv(self, layer: int, out: np.ndarray, ids: np.ndarray) -> None:
        """Each rank sends the rows of the tokens it computed an expert for (every rank knows which those are from
        the ids and the placement) to every other rank; then all sum the rows in rank order."""
        hidden = out.shape[1]
        computed = [np.flatnonzero((self.owners[layer][ids] == rank).any(axis=1)) for rank in range(self.size)]
        mine = np.ascontiguousarray(out[computed[self.rank]])
        send_counts = [0 if rank == self.rank else mine.size for rank in range(self.size)]
        recv_counts = [0 if rank == self.rank else len(rows) * hidden for rank, rows in enumerate(computed)]
        recv_displs = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]).astype(int).tolist()
        received = np.empty(sum(recv_counts), dtype=np.float32)
        self.wait(self.comm.Ialltoallv([mine, (send_counts, [0] * self.size), self.MPI.FLOAT],
                                       [received, (recv_counts, recv_displs), self.MPI.FLOAT]),
                  f"MoE layer {layer}")
        self.stats.bytes += mine.nbytes * (self.size - 1)
        out[:] = 0
        for rank, rows in enumerate(computed):
            if rank == self.rank:
                out[rows] += mine
            else:
                out[rows] += received[recv_displs[rank]: recv_displs[rank] + recv_counts[rank]].reshape(-1, hidden)

    # -- waiting --------------------------------------------------------------------------------------------

    def wait(self, request, what: str, timeout: float | None = None, check_on_interrupt: bool = True) -> None:
        """Complete a nonblocking MPI request, spinning for the first millisecond, then polling every 0.2 ms and
        answering other ranks' liveness pings. After `timeout` seconds (default options.timeout), or as soon as
        `interrupted` is set (SIGINT: the launcher stops the survivors when a rank dies), the rank asks who is
        alive and exits (`fail`) naming the ranks that did not answer; after an interruption with every rank alive
        it goes on waiting (`check_on_interrupt` False: an interrupt changes nothing here)."""
        limit = self.timeout if timeout is None else timeout
        if request.Test():
            return
        start = time.monotonic()
        self._waiting_since, self._waiting_for = start, what
        try:
            while not request.Test():
                waited = time.monotonic() - start
                if waited > limit:
                    missing = self._missing_ranks(what) or f"the ranks answer but did not all reach {what}"
                    self.fail(f"{missing} within {limit:g}s")
                if self.interrupted and check_on_interrupt:
                    self.interrupted = False
                    missing = self._missing_ranks(what, grace=INTERRUPT_GRACE)
                    if missing:
                        self.fail(f"{missing} (found on an interrupt)")
                if waited > 1e-3:
                    self.answer_pings()
                    time.sleep(2e-4)
        finally:
            self._waiting_since = None

    def problem(self) -> str | None:
        """None while the group works; else why it does not (a wait past a quarter of the timeout, or a failure)."""
        if self._failed:
            return self._failed
        since = self._waiting_since
        if since is not None and time.monotonic() - since > max(1.0, STALL_FRACTION * self.timeout):
            return (f"expert-parallel ranks have not answered for {time.monotonic() - since:.0f}s "
                    f"({self._waiting_for})")
        return None

    def answer_pings(self) -> None:
        """Reply to every liveness ping waiting for this rank (another rank is diagnosing a stall)."""
        status = self.MPI.Status()
        with self._sends_lock:
            while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=PING_TAG, status=status):
                ping = np.empty(1, dtype=np.int64)
                self.comm.Recv(ping, source=status.Get_source(), tag=PING_TAG)
                self._sends.append(self.comm.Isend(ping, dest=status.Get_source(), tag=PONG_TAG))
            self._sends = [send for send in self._sends if not send.Test()]

    def _missing_ranks(self, what: str, grace: float = ALIVE_GRACE) -> str:
        """Ping every other rank and collect the replies for `grace` seconds (answering their pings meanwhile:
        ranks waiting in the same step answer, a dead or stopped one cannot). Returns "rank 2 (of 4) did not reach
        <what> (dead or hung)", or "" when every rank answered."""
        with self._sends_lock:
            for rank in range(self.size):
                if rank != self.rank:
                    self._sends.append(self.comm.Isend(np.array([self.rank], dtype=np.int64), dest=rank,
                                                       tag=PING_TAG))
        heard = {self.rank}
        deadline = time.monotonic() + grace
        status = self.MPI.Status()
        while time.monotonic() < deadline and len(heard) < self.size:
            self.answer_pings()
            while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=PONG_TAG, status=status):
                pong = np.empty(1, dtype=np.int64)
                self.comm.Recv(pong, source=status.Get_source(), tag=PONG_TAG)
                heard.add(status.Get_source())
            time.sleep(0.01)
        missing = [rank for rank in range(self.size) if rank not in heard]
        if not missing:
            return ""
        names = ", ".join(map(str, missing))
        return f"rank{'s' if len(missing) > 1 else ''} {names} (of {self.size}) did not reach {what} (dead or hung)"

    def stopped_by_launcher(self, number: int, _frame=None) -> None:
        """SIGQUIT handler: MPICH's gforker sends it a second after SIGINT when a rank has died; end with status 1
        (dying of the signal would let gforker exit 0). Names the ranks that no longer answer when half a second
        tells."""
        missing = self._missing_ranks("the launcher's stop", grace=INTERRUPT_GRACE)
        self.fail(f"{missing}: stopped by the launcher (signal {number})" if missing else
                  f"stopped by the launcher (signal {number}), which does so when another rank exits")

    def fail(self, reason: str) -> None:
        """Exit this process at once with one line on stderr (exit status 1): MPI cannot recover a job that lost a
        rank, and a clean shutdown would wait on it."""
        self._failed = f"expert parallelism: {reason}"
        print(f"error: {self._failed}; rank {self.rank} exits", file=sys.stderr, flush=True)
        os._exit(1)
