"""Continuous batching: concurrent requests share one session through a running batch of decode steps.

One thread owns the session and the batch's latent cache (runtime/session.py's LatentCache, host or device):
slot i is batch row i of every decode step. A joining request is prefilled alone (batch 1, its own cache), its
first token sampled from the prefill logits, and its latent rows placed into the lowest free slot; each step
then decodes every occupied slot together, and a finished or cancelled request leaves at once. The cache copies
rows only when membership changes, never per step: a joiner's rows into its slot, the used columns when the
width changes (ONNX Runtime needs the `[P, width, D]` past C-contiguous) or when rows are moved left. Per-row
sampling, text, stops and reasoning are generate.py's `RowState`, so a request gets the same tokens alone or
batched (masked columns weigh exactly 0 in attention and rows never mix elsewhere).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.generate import (GenerationOptions, NonFiniteLogits, RowState, StreamEvent, decode_one_token,
                                    finite_rows, prefill)
from moetrt.runtime.metrics import Metrics
from moetrt.runtime.requests import validate_request
from moetrt.runtime.session import LatentCache, Session

log = logging.getLogger("moetrt.scheduler")

Sink = Callable[[StreamEvent | BaseException], None]


class QueueFull(MoetrtError):
    """The waiting queue is at its limit (the server answers 429)."""


class Ticket:
    """One submitted request. The scheduler calls `sink` with each StreamEvent (the last one has a
    finish_reason) or with an exception if the request fails. `cancel()` frees its slot before the next step
    and stops its events."""

    def __init__(self, row: RowState, sink: Sink | None):
        self.row = row
        self.prompt = row.prompt
        self.arrived = time.perf_counter()
        self.last_token_at = self.arrived  # when its latest token was generated (inter-token latency)
        self.next_token = 0  # sampled, fed to the graph at the next decode step
        self._queue: queue.SimpleQueue | None = None
        if sink is None:
            self._queue = queue.SimpleQueue()
            sink = self._queue.put
        self.sink: Sink = sink
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def columns(self) -> int:
        """Cache columns this request holds: its prompt and every generated token fed back so far."""
        return len(self.prompt) + len(self.row.generated) - 1

    def events(self) -> Iterator[StreamEvent]:
        """The events, blocking (only for tickets submitted without a sink)."""
        if self._queue is None:
            raise MoetrtError("this ticket delivers its events to its sink")
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class Scheduler:
    """Runs requests (token-id prompts with GenerationOptions) in one continuously batched loop.

    `submit` may be called from any thread; events arrive through each ticket's sink, called on the
    scheduler's thread. At most `max_batch` requests decode together; at most `max_queue` wait for a slot
    (`submit` raises QueueFull beyond that).
    """

    def __init__(self, session: Session, tokenizer=None, *, max_context: int, max_batch: int = 8,
                 max_queue: int = 256, metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 0:
            raise MoetrtError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.session = session
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.metrics.follow_scheduler(max_batch, lambda: len(self._waiting))
        self.cache: LatentCache = session.new_cache(0, max_context)
        self._slots: list[Ticket | None] = []  # by slot; len == cache width
        self._running = 0  # taken from the queue and not yet over (prefilling or in a slot)
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- any thread --------------------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="moetrt-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; requests still waiting or running get an error."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        error = MoetrtError("the scheduler is shutting down")
        for ticket in [*self._waiting, *(t for _, t in self._occupied())]:
            self._finish(ticket, "failed", error)
        self._waiting.clear()
        self._slots = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt: list[int], options: GenerationOptions, sink: Sink | None = None,
               split_reasoning: bool = True, in_reasoning: bool | None = None) -> Ticket:
        """Queue a request. Without a sink, read its events with `ticket.events()`. `split_reasoning` and
        `in_reasoning` as generate.py's RowState takes them. Raises RequestError for a request
        `validate_request` refuses, QueueFull when the queue is at its limit."""
        validate_request(prompt, options, vocab_size=self.session.vocab_size, max_context=self.max_context,
                         has_tokenizer=self.tokenizer is not None)
        row = RowState(prompt, options, self.tokenizer, options.sampling.seed, split_reasoning, in_reasoning)
        ticket = Ticket(row, sink)
        with self._wake:
            if self._closing:
                raise MoetrtError("the scheduler is shutting down")
            # Requests the next step will admit into free slots are not yet "waiting for a slot".
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - self._running):
                self.metrics.count_request("rejected")
                raise QueueFull(f"{self._running} requests are running and {len(self._waiting)} waiting "
                                f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            with self._wake:
                while not self._closing and not self._waiting and not self._occupied():
                    self._wake.wait()
                if self._closing:
                    return
                room = self.max_batch - len(self._occupied())
                joiners = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._running = len(self._occupied()) + len(joiners)
            prefilled = [(ticket, self._start(ticket)) for ticket in joiners]
            self._seat([(ticket, cache) for ticket, cache in prefilled if cache is not None])
            if self._occupied():
                self._step()
            self._running = len(self._occupied())

    def _occupied(self) -> list[tuple[int, Ticket]]:
        return [(slot, ticket) for slot, ticket in enumerate(self._slots) if ticket is not None]

    def _drop_cancelled(self) -> None:
        for slot, ticket in self._occupied():
            if ticket.cancelled:
                self._release(slot)
                self.metrics.count_request("cancelled")
        with self._wake:
            cancelled = [t for t in self._waiting if t.cancelled]
            for ticket in cancelled:
                self._waiting.remove(ticket)
                self.metrics.count_request("cancelled")

    def _start(self, ticket: Ticket) -> LatentCache | None:
        """Prefill alone and emit the first token. When the request goes on to decode, returns its prefilled
        batch-1 cache to place into a slot."""
        if ticket.cancelled:
            self.metrics.count_request("cancelled")
            return None
        self.metrics.queued(time.perf_counter() - ticket.arrived)
        try:
            cache = self.session.new_cache(1, len(ticket.prompt))
            logits = prefill(self.session, cache, [ticket.prompt], ticket.row.options.prefill_chunk)
            token = ticket.row.choose(logits[0])
        except Exception as error:  # a bad request must not stop the loop
            log.exception("prefill failed")
            self._finish(ticket, "failed", error)
            return None
        ticket.last_token_at = time.perf_counter()
        self.metrics.first_token(ticket.last_token_at - ticket.arrived, len(ticket.prompt))
        if self._emit(ticket, token):
            return None
        ticket.next_token = token
        return cache

    def _seat(self, joiners: list[tuple[Ticket, LatentCache]]) -> None:
        """Give joiners the lowest free slots, re-pack if the width changed, and copy their rows in."""
        if not any(self._slots):
            self._slots = []
            self.cache.reset()
        free = [slot for slot, ticket in enumerate(self._slots) if ticket is None]
        free += list(range(len(self._slots), self.max_batch))
        assigned = [(slot, ticket, cache) for slot, (ticket, cache) in zip(free, joiners)]
        for slot, ticket, _ in assigned:
            if slot >= len(self._slots):
                self._slots.extend([None] * (slot + 1 - len(self._slots)))
            self._slots[slot] = ticket
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        if len(self._slots) != self.cache.slots:
            self.cache.resize(len(self._slots))
            self.metrics.cache_resized()
        self.metrics.batch(len(self._occupied()), len(self._slots))
        if joiners:  # P up to the longest joiner first, so every joiner's columns end where the steps begin
            self.cache.extend_to(max(len(ticket.prompt) for ticket, _ in joiners))
        for slot, _, prefilled in assigned:
            self.cache.place(slot, prefilled)

    def _step(self) -> None:
        """One decode step over the occupied slots (holes ride along, fed token 0 at position 0)."""
        occupied = self._occupied()
        longest = max(ticket.columns for _, ticket in occupied)
        if self.cache.length + 1 > self.max_context or self.cache.length > 2 * longest:
            # Out of columns, or over half of each step's attention spent on masked columns: move rows left.
            self.cache.compact([slot for slot, _ in occupied])
            self.metrics.cache_compacted()
        width = self.cache.slots
        tokens = np.zeros(width, dtype=np.int64)
        positions = np.zeros(width, dtype=np.int64)
        for slot, ticket in occupied:
            tokens[slot] = ticket.next_token
            positions[slot] = ticket.columns  # RoPE position of the fed token: the tokens before it
        try:
            logits = decode_one_token(self.session, self.cache, tokens, positions, np.ones(width, dtype=bool))
            finite = finite_rows(logits)
            chosen = [(slot, ticket, ticket.row.choose(logits[slot])) for slot, ticket in occupied if finite[slot]]
        except Exception as error:
            log.exception("decode step failed; failing the running batch")
            for slot, ticket in occupied:
                self._release(slot)
                self._finish(ticket, "failed", error)
            return
        for slot, ticket in occupied:
            if not finite[slot]:  # NaN or inf logits fail this request alone; rows never mix, so the rest go on
                log.error("request in slot %d got NaN or inf logits; failing it", slot)
                self._release(slot)
                self._finish(ticket, "failed", NonFiniteLogits([slot], logits.dtype))
        self.metrics.decode_step(len(occupied))
        now = time.perf_counter()
        self.metrics.next_tokens([now - ticket.last_token_at for _, ticket, _ in chosen])
        for _, ticket, _ in chosen:
            ticket.last_token_at = now
        for slot, ticket, token in chosen:
            if self._emit(ticket, token):
                self._release(slot)
            else:
                ticket.next_token = token

    def _emit(self, ticket: Ticket, token: int) -> bool:
        """Advance the request by `token` and deliver its event; True when the request is over."""
        event = ticket.row.advance(token)
        if ticket.cancelled:
            self.metrics.count_request("cancelled")
            return True
        try:
            ticket.sink(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): treat as a disconnect
            log.exception("a request's sink failed; dropping the request")
            self.metrics.count_request("cancelled")
            return True
        if event.finish_reason is not None:
            self.metrics.finished(event.finish_reason, time.perf_counter() - ticket.arrived)
            return True
        return False

    def _release(self, slot: int) -> None:
        self._slots[slot] = None
        self.cache.free(slot)
        self.metrics.batch(len(self._occupied()), len(self._slots))

    def _finish(self, ticket: Ticket, outcome: str, error: BaseException) -> None:
        self.metrics.count_request(outcome)
        try:
            ticket.sink(error)
        except Exception:
            log.exception("a request's sink failed")
