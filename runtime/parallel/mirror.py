"""Rank 0's session and caches under expert parallelism, and the loop the other ranks run.

Rank 0 runs the command as in one process, through `MirroredSession` and its `MirroredCache`s, which keep the
Session and LatentCache protocols (runtime/session.py): the generation loop and the scheduler do not know. Each
cache move is applied on rank 0 and queued; each graph call broadcasts the queued moves and the call's host inputs
(ids, positions, mask, logit positions) to the other ranks, which replay them on their own copies of the caches
and run the same call. Inside the call every MoE layer combines the ranks' expert outputs (group.py), so all ranks
hold the same hidden states and latent rows.

The messages are raw bytes (no pickle): per record an int64 header (op, cache id, int count, array count), the
ints, then per array an int64 dtype code, its dimensions, and its bytes padded to 8.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
import time
import weakref
from typing import Any

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.parallel.group import ExpertGroup

OP_NEW, OP_DROP, OP_MASK, OP_ADVANCE, OP_RESIZE, OP_EXTEND, OP_PLACE, OP_FREE, OP_RESET, OP_COMPACT, OP_RUN, \
    OP_HEARTBEAT, OP_STOP = range(1, 14)
DTYPES = (np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32))
STARTUP_TIMEOUT = 600.0  # seconds the ranks wait for each other to load the engine
Record = tuple[int, int, list[int], list[np.ndarray]]


def encode(records: list[Record]) -> np.ndarray:
    """Records (op, cache id, ints, arrays) as one uint8 buffer."""
    parts: list[bytes] = []
    for op, cache, ints, arrays in records:
        parts.append(np.array([op, cache, len(ints), len(arrays), *ints], dtype=np.int64).tobytes())
        for array in arrays:
            array = np.ascontiguousarray(array)
            parts.append(np.array([DTYPES.index(array.dtype), array.ndim, *array.shape], dtype=np.int64).tobytes())
            data = array.tobytes()
            parts.append(data + b"\0" * (-len(data) % 8))
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def decode(buffer: np.ndarray) -> list[Record]:
    """The records `encode` wrote (the arrays are copies)."""
    data, at, records = buffer.tobytes(), 0, []

    def ints(count: int) -> list[int]:
        nonlocal at
        values = np.frombuffer(data, dtype=np.int64, count=count, offset=at).tolist()
        at += 8 * count
        return values

    while at < len(data):
        op, cache, n_ints, n_arrays = ints(4)
        values = ints(n_ints)
        arrays = []
        for _ in range(n_arrays):
            code, ndim = ints(2)
            shape = ints(ndim)
            dtype = DTYPES[code]
            count = int(np.prod(shape, dtype=np.int64))
            arrays.append(np.frombuffer(data, dtype=dtype, count=count, offset=at).reshape(shape).copy())
            at += -(-count * dtype.itemsize // 8) * 8
        records.append((op, cache, values, arrays))
    return records


class _Views(list):
    """A cache's per-layer views, tagged with the cache and the steps they cover (rank 0 tells the other ranks
    which cache a call reads and writes)."""

    cache: MirroredCache
    steps: int


class MirroredCache:
    """A LatentCache on rank 0 whose every move is replayed on the other ranks' copies (runtime/session.py)."""

    def __init__(self, inner, session: MirroredSession, cache_id: int):
        self.inner, self._session, self.cache_id = inner, session, cache_id
        self.last_mask: np.ndarray | None = None  # what attention_mask returned last: the other ranks have it too
        weakref.finalize(self, session.queue, OP_DROP, cache_id)

    slots = property(lambda self: self.inner.slots)
    length = property(lambda self: self.inner.length)
    max_context = property(lambda self: self.inner.max_context)

    def _views(self, views: list) -> _Views:
        tagged = _Views(views)
        tagged.cache, tagged.steps = self, len(views[0]) if views else 0
        return tagged

    def past(self) -> _Views:
        return self._views(self.inner.past())

    def reserve(self, steps: int) -> _Views:
        views = self._views(self.inner.reserve(steps))
        views.steps = steps
        return views

    def attention_mask(self, steps: int, valid):
        mask = self.inner.attention_mask(steps, valid)
        self._session.queue(OP_MASK, self.cache_id, [steps], [np.asarray(valid, dtype=np.int64)])
        self.last_mask = mask
        return mask

    def advance(self, steps: int) -> None:
        self.inner.advance(steps)
        self._session.queue(OP_ADVANCE, self.cache_id, [steps])

    def resize(self, slots: int) -> None:
        self.inner.resize(slots)
        self._session.queue(OP_RESIZE, self.cache_id, [slots])

    def extend_to(self, length: int) -> None:
        self.inner.extend_to(length)
        self._session.queue(OP_EXTEND, self.cache_id, [length])

    def place(self, slot: int, prefilled: MirroredCache) -> None:
        self.inner.place(slot, prefilled.inner)
        self._session.queue(OP_PLACE, self.cache_id, [slot, prefilled.cache_id])

    def free(self, slot: int) -> None:
        self.inner.free(slot)
        self._session.queue(OP_FREE, self.cache_id, [slot])

    def reset(self) -> None:
        self.inner.reset()
        self._session.queue(OP_RESET, self.cache_id)

    def compact(self, slots: list[int]) -> None:
        self.inner.compact(slots)
        self._session.queue(OP_COMPACT, self.cache_id, list(slots))


class MirroredSession:
    """Rank 0's Session: `inner` (the ONNX Runtime session holding rank 0's experts) plus the broadcasts that make
    the other ranks run every call with it. A daemon thread checks the ranks every timeout / 4 seconds while no
    call runs, and `close` (at exit) releases them."""

    def __init__(self, inner, group: ExpertGroup):
        self.inner, self.group = inner, group
        self.backend, self.num_layers = inner.backend, inner.num_layers
        self.latent_dim, self.vocab_size = inner.latent_dim, inner.vocab_size
        self._pending: list[Record] = []
        self._pending_lock = threading.Lock()
        self._next_id = 0
        self._last_sent = time.monotonic()
        self._closed = False
        prints = ready(group, group.describe(inner.fingerprint))
        failed = [rank for rank, other in enumerate(prints) if not other]
        if failed:
            raise MoetrtError(f"expert-parallel rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} "
                              "could not open the engine (the error is above)")
        group.mirrored = True
        atexit.register(self.close)
        threading.Thread(target=self._heartbeat, name="moetrt-ep-heartbeat", daemon=True).start()

    def problem(self) -> str | None:
        """Why the ranks cannot serve now (group.problem), or None."""
        return self.group.problem()

    def queue(self, op: int, cache_id: int, ints: list[int] | None = None, arrays: list[np.ndarray] | None = None):
        """Add a record (op, cache id, ints, arrays) to those the next call or heartbeat broadcasts."""
        with self._pending_lock:
            self._pending.append((op, cache_id, ints or [], arrays or []))

    def new_cache(self, slots: int, max_context: int) -> MirroredCache:
        """Session.new_cache: rank 0's host cache, and the same cache made on every rank (replayed)."""
        cache = self.inner.new_cache(slots, max_context)
        with self._pending_lock:
            self._next_id += 1
            cache_id = self._next_id
            self._pending.append((OP_NEW, cache_id, [slots, max_context], []))
        return MirroredCache(cache, self, cache_id)

    def run(self, input_ids, position_ids, attention_mask, logit_positions, past, new_rows=None):
        """Session.run on every rank: `past` and `new_rows` must be one MirroredCache's past() and reserve(S)
        (the other ranks use their copies of it). Broadcasts the queued cache moves and the host inputs, then runs
        rank 0's share. Raises MoetrtError for views of anything else; a failure inside the call ends the job
        (group.fail), since the other ranks are inside it too."""
        if not isinstance(past, _Views) or not isinstance(new_rows, _Views) or past.cache is not new_rows.cache:
            raise MoetrtError("under expert parallelism a call must read and write one cache's past() and "
                              "reserve() views")
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, position_ids, attention_mask,
                                                                    logit_positions)]
        # The mask the cache just made is on the other ranks already (replayed): send it only when it is another.
        own_mask = attention_mask is past.cache.last_mask
        sent = arrays[:2] + arrays[3:] if own_mask else arrays
        with self.group.lock:
            self.queue(OP_RUN, past.cache.cache_id, [new_rows.steps, int(own_mask)], sent)
            self._send()
            with _interrupts_deferred(self.group):
                try:
                    return self.inner.run(*arrays, list(past), list(new_rows))
                except Exception as error:  # the other ranks are inside this call: the job cannot go on
                    self.group.fail(f"rank 0's step failed ({type(error).__name__}: {error})")
                    raise

    def _send(self) -> None:
        """Broadcast the queued records (the caller holds group.lock)."""
        with self._pending_lock:
            records, self._pending = self._pending, []
        payload = encode(records)
        header = np.array([payload.size], dtype=np.int64)
        self.group.wait(self.group.comm.Ibcast(header, root=0), "rank 0's next step")
        self.group.wait(self.group.comm.Ibcast(payload, root=0), "rank 0's next step")
        self._last_sent = time.monotonic()

    def _heartbeat(self) -> None:
        period = self.group.timeout / 4
        while not self._closed:
            time.sleep(min(period / 4, 0.25))
            if not self.group.lock.acquire(blocking=False):
                continue
            try:
                if self._closed:
                    return
                self.group.answer_pings()  # rank 0 idle between steps still answers a rank asking who is alive
                if time.monotonic() - self._last_sent >= period:
                    self.queue(OP_HEARTBEAT, 0)
                    self._send()
                    check_in(self.group, "a heartbeat")
            finally:
                self.group.lock.release()

    def close(self) -> None:
        """Release the other ranks (they exit); idempotent."""
        with self.group.lock:
            if self._closed:
                return
            self._closed = True
            self.queue(OP_STOP, 0)
            self._send()
            check_in(self.group, "the end of the job")  # a rank that died meanwhile makes this exit 1


@contextlib.contextmanager
def _interrupts_deferred(group: ExpertGroup):
    """Hold a SIGINT (Ctrl-C, or the launcher telling the ranks to stop) that arrives during a step until the step
    ends, then raise KeyboardInterrupt: the other ranks are inside the same step, and abandoning it would leave
    them waiting. Only the main thread receives signals; elsewhere (the server's scheduler) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def held(number, _frame):
        caught.append(number)
        group.interrupted = True

    previous = signal.signal(signal.SIGINT, held)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if caught:
        raise KeyboardInterrupt


def release_unused(group: ExpertGroup) -> None:
    """At rank 0's exit when its session never started (the command failed first, or the ranks disagreed): let
    the other ranks finish loading, then stop them (the end-of-job check included)."""
    if group.mirrored:
        return
    if not group.readied:
        ready(group, "")
    header, payload = np.zeros(1, dtype=np.int64), encode([(OP_STOP, 0, [], [])])
    header[0] = payload.size
    group.wait(group.comm.Ibcast(header, root=0), "the stop message")
    group.wait(group.comm.Ibcast(payload, root=0), "the stop message")
    check_in(group, "the end of the job")


def leave_unused(group: ExpertGroup) -> None:
    """At the exit of a rank other than 0 that never served (it could not open the engine, or differs from rank
    0): take part in the loading barrier if it has not, then wait for rank 0's stop, so rank 0 ends at once with
    an error naming this rank instead of waiting for it."""
    if group.following:
        return
    if not group.readied:
        ready(group, "")
    header = np.zeros(1, dtype=np.int64)
    while True:
        group.wait(group.comm.Ibcast(header, root=0), "rank 0's stop message")
        payload = np.empty(int(header[0]), dtype=np.uint8)
        group.wait(group.comm.Ibcast(payload, root=0), "rank 0's stop message")
        if any(op == OP_STOP for op, *_ in decode(payload)):
            check_in(group, "the end of the job")
            return


FINGERPRINT_BYTES = 512


def ready(group: ExpertGroup, fingerprint: str) -> list[str]:
    """Every rank has loaded its share of the engine: an Allgather (with STARTUP_TIMEOUT) of each rank's session
    fingerprint (onnxruntime version, threads, kernel build, engine), which must agree: ranks whose numerics
    differ could route a token differently, and the combined output would be wrong without any error. Raises
    MoetrtError naming the first rank that differs from rank 0; returns every rank's fingerprint ("" for a rank
    that ends without opening the engine: not compared)."""
    mine = np.zeros(FINGERPRINT_BYTES, dtype=np.uint8)
    data = fingerprint.encode()[:FINGERPRINT_BYTES]
    mine[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    every = np.zeros((group.size, FINGERPRINT_BYTES), dtype=np.uint8)
    group.wait(group.comm.Iallgather(mine, every), "the end of loading the engine",
               timeout=max(STARTUP_TIMEOUT, group.timeout))
    group.readied = True
    prints = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every]
    if not prints[0] or not fingerprint:
        return prints
    for rank, other in enumerate(prints):
        if other and other != prints[0]:
            ours, theirs = prints[0].split("; "), other.split("; ")
            differ = ", ".join(f"{b} (rank 0: {a})" for a, b in zip(ours, theirs) if a != b)
            raise MoetrtError(f"expert-parallel rank {rank} differs from rank 0 in {differ}: every rank must run the "
                              "same engine, onnxruntime, kernel build and threads (pass the same --threads N)")
    return prints


def check_in(group: ExpertGroup, what: str) -> None:
    """A one-integer Allreduce: completes only when every rank is alive and in step."""
    token = np.ones(1, dtype=np.int64)
    group.wait(group.comm.Iallreduce(group.MPI.IN_PLACE, token, op=group.MPI.SUM), what)


def follow(session, group: ExpertGroup) -> None:
    """The loop of ranks other than 0: replay rank 0's cache moves and calls on `session` (their ONNX Runtime
    session, holding their experts) until rank 0 stops; then end the process (exit status 0). SIGINT and SIGTERM
    are ignored here: rank 0 decides when the job ends (a server drains first), and a rank that died is caught by
    the timeouts."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda _number, _frame: setattr(group, "interrupted", True))
    ready(group, group.describe(session.fingerprint))
    try:
        _follow(session, group)
    except Exception as error:  # a failed call (it failed on rank 0 too, most likely) or a broken message
        group.fail(f"rank {group.rank} could not replay rank 0's step ({type(error).__name__}: {error})")


def _follow(session, group: ExpertGroup) -> None:
    group.following = True
    caches: dict[int, Any] = {}
    masks: dict[int, np.ndarray] = {}  # per cache, what its last attention_mask returned
    header = np.zeros(1, dtype=np.int64)
    while True:
        # Rank 0 may be busy outside MPI between steps (a chat waiting for its user): an interrupt does not make
        # this wait ask who is alive; rank 0's heartbeats and the timeout cover it.
        group.wait(group.comm.Ibcast(header, root=0), "rank 0's next step", check_on_interrupt=False)
        payload = np.empty(int(header[0]), dtype=np.uint8)
        group.wait(group.comm.Ibcast(payload, root=0), "rank 0's next step")
        for op, cache_id, ints, arrays in decode(payload):
            if op == OP_STOP:
                check_in(group, "the end of the job")
                raise SystemExit(0)
            if op == OP_HEARTBEAT:
                check_in(group, "a heartbeat")
            elif op == OP_NEW:
                caches[cache_id] = session.new_cache(*ints)
            elif op == OP_DROP:
                caches.pop(cache_id, None)
                masks.pop(cache_id, None)
            elif op == OP_RUN:
                cache = caches[cache_id]
                if ints[1]:  # the cache's own mask
                    arrays.insert(2, masks[cache_id])
                session.run(*arrays, cache.past(), cache.reserve(ints[0]))
            elif op == OP_MASK:
                masks[cache_id] = caches[cache_id].attention_mask(ints[0], arrays[0])
            else:
                _replay(caches[cache_id], op, ints, arrays, caches)


def _replay(cache, op: int, ints: list[int], arrays: list[np.ndarray], caches: dict[int, Any]) -> None:
    if op == OP_ADVANCE:
        cache.advance(ints[0])
    elif op == OP_RESIZE:
        cache.resize(ints[0])
    elif op == OP_EXTEND:
        cache.extend_to(ints[0])
    elif op == OP_PLACE:
        cache.place(ints[0], caches[ints[1]])
    elif op == OP_FREE:
        cache.free(ints[0])
    elif op == OP_RESET:
        cache.reset()
    elif op == OP_COMPACT:
        cache.compact(ints)
    else:
        raise MoetrtError(f"expert parallelism: unknown message {op} from rank 0 (ranks of different moetrt "
                          "versions?)")
