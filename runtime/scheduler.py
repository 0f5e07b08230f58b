"""Continuous batching: concurrent requests share one session through a running batch of decode steps.

One thread owns the session and the batch's latent cache (runtime/session.py's LatentCache, host or device):
slot i is batch row i of every decode step. A joining request is prefilled on its own batch-1 cache, its first
token sampled from the prefill logits, and its latent rows placed into the lowest free slot; each step then
decodes every occupied slot together, and a finished or cancelled request leaves at once. The cache copies
rows only when membership changes, never per step: a joiner's rows into its slot, the used columns when the
width changes (ONNX Runtime needs the `[P, width, D]` past C-contiguous) or when rows are moved left. Per-row
sampling, text, stops and reasoning are generate.py's `RowState`, so a request gets the same tokens alone or
batched (masked columns weigh exactly 0 in attention and rows never mix elsewhere).

Chunked prefill (as vLLM and SGLang schedule it): each loop iteration runs one decode step of the running batch
and at most `prefill_budget` prompt tokens of joiners' prefill, so a long prompt arriving never stalls the
running streams for more than a budget's worth of compute per token. While no request decodes, nothing can
stall, and joiners prefill whole.

Parallel sampling (`n` > 1, OpenAI's `n`): the prompt is prefilled once and its cache placed into n slots, one
per choice; choice i samples with seed `seed + i` when the request has a seed (as `generate` seeds a batch's
rows), so it gives exactly the tokens of a single request with that seed. Metrics count each choice as a
sequence (time to first token, tokens, outcome, end-to-end latency), and the prompt and its queue time once.

Speculative decoding (`speculative="mtp"`, an engine built with --mtp): prefills feed the MTP module the prompts'
true next tokens, and each step is runtime/speculative.py's `draft_step` over the slots, every choice verifying
its own draft, so rows accept different numbers of tokens; rejected drafts' columns are masked (holes that `trim`
and the usual compaction reclaim). The metrics count drafts proposed and accepted.
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
                                    finite_rows, prefill_part, prefill_part_drafting)
from moetrt.runtime import speculative as spec
from moetrt.runtime.metrics import Metrics
from moetrt.runtime.requests import RequestError, validate_request
from moetrt.runtime.session import LatentCache, Session

log = logging.getLogger("moetrt.scheduler")

Sink = Callable[[StreamEvent | BaseException], None]

# Prompt tokens prefilled per decode step while requests run (`Scheduler(prefill_budget=...)`, `moetrt serve
# --max-prefill-tokens`). Small budgets keep streams smoother but delay every joiner's first token, since short
# prompts queue behind the budget too. `moetrt bench serve` on tiny-r1 (2 CPU cores, 64 requests, 1 in 8 of ~320
# tokens, budgets side by side in one run), p99 gap between tokens while a long prompt prefills / outside, and
# median TTFT against whole-prompt prefill: at 8 concurrent, 16: 0.97 and 4.0x, 64: 1.61 and 2.0x, 128: 2.53 and
# 1.4x (whole prompts 2.54); at 32 concurrent, 16: 1.29 and 4.9x, 64: 0.91 and 0.96x, 128: 1.21 and 1.04x (whole
# prompts 2.84). 64 keeps the gap within 2x at both with little TTFT cost. Big models on GPUs, where a decode step
# costs as much as hundreds of prompt tokens, want a larger budget.
DEFAULT_PREFILL_BUDGET = 64


class QueueFull(MoetrtError):
    """The waiting queue is at its limit (the server answers 429)."""


class Ticket:
    """One submitted request and its `n` choices. The scheduler calls `sink` with each StreamEvent (`row` is the
    choice index; each choice's last event has a finish_reason) or once with an exception if the request fails.
    The request is over when all n choices are. `cancel()` frees all its slots before the next step and stops
    its events. `rows` are the choices' RowStates (`row` is choice 0's)."""

    def __init__(self, rows: list[RowState], sink: Sink | None):
        self.rows = rows
        self.row = rows[0]
        self.prompt = self.row.prompt
        self.n = len(rows)
        self.arrived = time.perf_counter()
        self.choices = [_Choice(self, index, row) for index, row in enumerate(rows)]
        self._queue: queue.SimpleQueue | None = None
        if sink is None:
            self._queue = queue.SimpleQueue()
            sink = self._queue.put
        self.sink: Sink = sink
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def live(self) -> list[_Choice]:
        """The choices still generating."""
        return [choice for choice in self.choices if not choice.over]

    def events(self) -> Iterator[StreamEvent]:
        """The events of all choices as they come, blocking, until each choice's last (only for tickets
        submitted without a sink)."""
        if self._queue is None:
            raise MoetrtError("this ticket delivers its events to its sink")
        finished = 0
        while finished < self.n:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            finished += item.finish_reason is not None


class _Choice:
    """One of a ticket's sequences: its RowState, the slot it decodes in once seated, the token it feeds next."""

    def __init__(self, ticket: Ticket, index: int, row: RowState):
        self.ticket, self.index, self.row = ticket, index, row
        self.slot: int | None = None
        self.next_token = 0  # sampled, fed to the graph at the next decode step
        self.draft = spec.NO_DRAFT  # speculative decoding: the MTP module's draft fed after next_token
        self.draft_policy = spec.DraftPolicy()  # whether this sequence's drafts pay (its own acceptance)
        self.draft_row_valid = True  # whether the MTP row of its first token's column read that token
        self.last_token_at = 0.0  # when its latest token was generated (inter-token latency)
        self.over = False  # finished, cancelled or failed

    @property
    def columns(self) -> int:
        """Cache columns this sequence holds: its prompt and every generated token fed back so far."""
        return len(self.row.prompt) + len(self.row.generated) - 1


class _Prefill:
    """A request taken from the queue whose prompt is being prefilled: its batch-1 cache (made when the first
    part runs) and the prompt positions done so far."""

    def __init__(self, ticket: Ticket):
        self.ticket = ticket
        self.cache: LatentCache | None = None
        self.done = 0
        self.draft = spec.NO_DRAFT  # the MTP module's draft at the prompt's end (speculative decoding)


class Scheduler:
    """Runs requests (token-id prompts with GenerationOptions) in one continuously batched loop.

    `submit` may be called from any thread; events arrive through each ticket's sink, called on the
    scheduler's thread. At most `max_batch` sequences decode together (a request with n choices holds n slots);
    at most `max_queue` requests wait for slots (`submit` raises QueueFull beyond that). While requests decode,
    each decode step is accompanied by at most `prefill_budget` prompt tokens of prefill (chunked prefill);
    None prefills every joiner's whole prompt before the step. `speculative` "mtp" decodes with the engine's MTP
    module drafting (raises MoetrtError for an engine built without --mtp).
    """

    def __init__(self, session: Session, tokenizer=None, *, max_context: int, max_batch: int = 8,
                 max_queue: int = 256, metrics: Metrics | None = None,
                 prefill_budget: int | None = DEFAULT_PREFILL_BUDGET, speculative: str | None = None):
        if speculative not in (None, "mtp"):
            raise MoetrtError(f"speculative must be None or 'mtp', got {speculative!r}")
        if speculative is not None:
            spec.check_session(session)
        self.speculative = speculative
        if max_batch < 1 or max_queue < 0:
            raise MoetrtError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if prefill_budget is not None and prefill_budget < 1:
            raise MoetrtError(f"the prefill budget must be at least 1 token (or off), got {prefill_budget}")
        self.session = session
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        self.metrics = metrics or Metrics()
        self.metrics.follow_scheduler(max_batch, lambda: len(self._waiting))
        self.cache: LatentCache = session.new_cache(0, max_context)
        self._slots: list[_Choice | None] = []  # by slot; len == cache width
        self._prefilling: list[_Prefill] = []  # taken from the queue, in arrival order
        self._running = 0  # slots held by requests taken from the queue (prefilling or seated)
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
        tickets = [*self._waiting, *(part.ticket for part in self._prefilling),
                   *(choice.ticket for _, choice in self._occupied())]
        for ticket in dict.fromkeys(tickets):
            self._end(ticket, "failed", error)
        self._waiting.clear()
        self._prefilling = []
        self._slots = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt: list[int], options: GenerationOptions, sink: Sink | None = None, *,
               split_reasoning: bool = True, in_reasoning: bool | None = None, n: int = 1) -> Ticket:
        """Queue a request for `n` choices (OpenAI's `n`: one prefill, n sequences; choice i seeded with
        `seed + i` when options carry a seed). Without a sink, read its events with `ticket.events()`.
        `split_reasoning` and `in_reasoning` as generate.py's RowState takes them. Raises RequestError for a
        request `validate_request` refuses or an n outside [1, max_batch], QueueFull when the queue is full."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_batch:
            raise RequestError(f"n must be an integer in [1, {self.max_batch}]: this server decodes at most "
                               f"{self.max_batch} sequences together (--max-batch); got {n!r}", param="n")
        validate_request(prompt, options, vocab_size=self.session.vocab_size, max_context=self.max_context,
                         has_tokenizer=self.tokenizer is not None)
        seed = options.sampling.seed
        rows = [RowState(prompt, options, self.tokenizer, None if seed is None else seed + i, split_reasoning,
                         in_reasoning) for i in range(n)]
        ticket = Ticket(rows, sink)
        if self.speculative:  # a new sequence drafts as the engine's recent ones found worth it, until judged
            history = spec.history_for(self.session)
            for choice in ticket.choices:
                choice.draft_policy.history = history
        with self._wake:
            if self._closing:
                raise MoetrtError("the scheduler is shutting down")
            # Requests the next step will admit into free slots are not yet "waiting for a slot".
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - self._running):
                self.metrics.count_request("rejected")
                running = {choice.ticket for choice in list(self._slots) if choice is not None}
                running.update(part.ticket for part in list(self._prefilling))  # requests, not their n choices
                raise QueueFull(f"{len(running)} requests are running and {len(self._waiting)} waiting "
                                f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            with self._wake:
                while not self._closing and not self._waiting and not self._prefilling and not self._occupied():
                    self._wake.wait()
                if self._closing:
                    return
                self._admit()
            self._seat(self._prefill_some())
            if self._occupied():
                self._step()
            self._running = self._slots_held()

    def _occupied(self) -> list[tuple[int, _Choice]]:
        return [(slot, choice) for slot, choice in enumerate(self._slots) if choice is not None]

    def _slots_held(self) -> int:
        """Slots taken: seated choices and the choices of requests being prefilled."""
        return len(self._occupied()) + sum(len(part.ticket.live) for part in self._prefilling)

    def _admit(self) -> None:
        """Take requests from the queue, in order, while their choices fit in the free slots (holding `_wake`)."""
        room = self.max_batch - self._slots_held()
        while self._waiting and self._waiting[0].n <= room:
            ticket = self._waiting.popleft()
            self._prefilling.append(_Prefill(ticket))
            room -= ticket.n
        self._running = self.max_batch - room

    def _drop_cancelled(self) -> None:
        for _, choice in self._occupied():
            if choice.ticket.cancelled:
                self._end(choice.ticket, "cancelled")
        for part in [part for part in self._prefilling if part.ticket.cancelled]:
            self._prefilling.remove(part)
            self._end(part.ticket, "cancelled")
        with self._wake:
            cancelled = [t for t in self._waiting if t.cancelled]
            for ticket in cancelled:
                self._waiting.remove(ticket)
                self._end(ticket, "cancelled")

    def _prefill_some(self) -> list[tuple[Ticket, LatentCache]]:
        """This iteration's prefill work, in arrival order: at most `prefill_budget` prompt tokens while requests
        decode, else (nothing to stall) whole prompts until one request is ready to decode. Returns the requests
        whose prompts are done and whose choices go on to decode, with their prefilled caches."""
        budget = self.prefill_budget or 0
        ready: list[tuple[Ticket, LatentCache]] = []
        for part in list(self._prefilling):
            unlimited = self.prefill_budget is None or not (self._occupied() or ready)
            if not unlimited and budget <= 0:
                break
            remaining = len(part.ticket.prompt) - part.done
            take = remaining if unlimited else min(remaining, budget)
            if not unlimited:
                budget -= take
            try:
                logits = self._prefill(part, take)
            except Exception as error:  # a bad request must not stop the loop
                log.exception("prefill failed")
                self._prefilling.remove(part)
                self._end(part.ticket, "failed", error)
                continue
            if logits is not None:
                self._prefilling.remove(part)
                if self._first_tokens(part.ticket, logits, part.draft) and part.cache is not None:
                    ready.append((part.ticket, part.cache))
        return ready

    def _prefill(self, part: _Prefill, tokens: int) -> np.ndarray | None:
        """Prefill the next `tokens` positions of the request's prompt; its last token's logits once done."""
        ticket = part.ticket
        if part.cache is None:
            self.metrics.queued(time.perf_counter() - ticket.arrived)
            part.cache = self.session.new_cache(1, len(ticket.prompt))
        start, part.done = part.done, part.done + tokens
        if self.speculative:
            logits, part.draft = prefill_part_drafting(self.session, part.cache, ticket.prompt, start, part.done,
                                                       ticket.row.options.prefill_chunk)
            return logits
        return prefill_part(self.session, part.cache, ticket.prompt, start, part.done,
                            ticket.row.options.prefill_chunk)

    def _first_tokens(self, ticket: Ticket, logits: np.ndarray, draft: int = spec.NO_DRAFT) -> bool:
        """Sample and emit each choice's first token from the prompt's logits; True when some go on to decode.
        Speculative decoding: a choice whose token is the greedy pick the MTP module read keeps `draft`."""
        try:
            tokens = [choice.row.choose(logits) for choice in ticket.choices]
        except Exception as error:
            log.exception("sampling the first token failed")
            self._end(ticket, "failed", error)
            return False
        now = time.perf_counter()
        for choice, token in zip(ticket.choices, tokens):
            choice.last_token_at = now
            self.metrics.first_token(now - ticket.arrived, len(ticket.prompt) if choice.index == 0 else 0)
            if self._emit(choice, token):
                choice.over = True
            else:
                choice.next_token = token
                choice.draft_row_valid = token == int(np.argmax(logits))
                choice.draft = draft if choice.draft_row_valid else spec.NO_DRAFT
        return bool(ticket.live)

    def _seat(self, joiners: list[tuple[Ticket, LatentCache]]) -> None:
        """Give the joiners' live choices the lowest free slots, re-pack if the width changed, and copy each
        joiner's prefilled rows into its choices' slots."""
        if not any(self._slots):
            self._slots = []
            self.cache.reset()
        free = [slot for slot, choice in enumerate(self._slots) if choice is None]
        free += list(range(len(self._slots), self.max_batch))
        seated = [(choice, prefilled) for ticket, prefilled in joiners for choice in ticket.live]
        assigned = list(zip(free, seated))  # _admit kept a slot for every choice
        for slot, (choice, _) in assigned:
            if slot >= len(self._slots):
                self._slots.extend([None] * (slot + 1 - len(self._slots)))
            self._slots[slot] = choice
            choice.slot = slot
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        if len(self._slots) != self.cache.slots:
            self.cache.resize(len(self._slots))
            self.metrics.cache_resized()
        self.metrics.batch(len(self._occupied()), len(self._slots))
        if joiners:  # P up to the longest joiner first, so every joiner's columns end where the steps begin
            self.cache.extend_to(max(len(ticket.prompt) for ticket, _ in joiners))
        for slot, (choice, prefilled) in assigned:
            self.cache.place(slot, prefilled)
            if self.speculative and not choice.draft_row_valid:
                self.cache.invalidate(slot, self.cache.length - 1, draft_only=True)

    def _step(self) -> None:
        """One decode step over the occupied slots (holes ride along, fed token 0 at position 0)."""
        if self.speculative:
            self._draft_step()
            return
        occupied = self._occupied()
        self._make_room(occupied, 1)
        width = self.cache.slots
        tokens = np.zeros(width, dtype=np.int64)
        positions = np.zeros(width, dtype=np.int64)
        for slot, choice in occupied:
            tokens[slot] = choice.next_token
            positions[slot] = choice.columns  # RoPE position of the fed token: the tokens before it
        try:
            logits = decode_one_token(self.session, self.cache, tokens, positions, np.ones(width, dtype=bool))
            finite = finite_rows(logits)
            chosen = [(choice, choice.row.choose(logits[slot])) for slot, choice in occupied if finite[slot]]
        except Exception as error:
            log.exception("decode step failed; failing the running batch")
            for ticket in dict.fromkeys(choice.ticket for _, choice in occupied):
                self._end(ticket, "failed", error)
            return
        for slot, choice in occupied:
            if not finite[slot] and not choice.over:  # NaN or inf logits fail this request alone; rows never mix
                log.error("request in slot %d got NaN or inf logits; failing it", slot)
                self._end(choice.ticket, "failed", NonFiniteLogits([slot], logits.dtype))
        chosen = [(choice, token) for choice, token in chosen if not choice.over]
        self.metrics.decode_step(len(occupied))
        now = time.perf_counter()
        self.metrics.next_tokens([now - choice.last_token_at for choice, _ in chosen])
        for choice, _ in chosen:
            choice.last_token_at = now
        for choice, token in chosen:
            if self._emit(choice, token):
                self._retire(choice)
            else:
                choice.next_token = token

    def _make_room(self, occupied: list[tuple[int, _Choice]], steps: int) -> None:
        """Compact the cache when the next `steps` columns would not fit, or when over half of each step's attention
        would go to masked columns (finished rows' and rejected drafts' holes): rows move left."""
        longest = max(choice.columns for _, choice in occupied)
        if self.cache.length + steps > self.max_context or self.cache.length > 2 * longest:
            self.cache.compact([slot for slot, _ in occupied])
            self.metrics.cache_compacted()

    def _draft_step(self) -> None:
        """`_step` with MTP drafts: each occupied slot feeds its token and draft; each choice keeps one or two
        tokens (runtime/speculative.py `settle`)."""
        occupied = self._occupied()
        self._make_room(occupied, 2)
        width = self.cache.slots
        tokens = np.zeros(width, dtype=np.int64)
        positions = np.zeros(width, dtype=np.int64)
        drafts = np.full(width, spec.NO_DRAFT, dtype=np.int64)
        wants = {}
        for slot, choice in occupied:
            tokens[slot], positions[slot], drafts[slot] = choice.next_token, choice.columns, choice.draft
            wants[slot] = choice.draft_policy.propose()
        try:
            logits, proposals, start = spec.draft_step(self.session, self.cache, tokens, positions,
                                                       np.ones(width, dtype=bool), drafts, any(wants.values()))
        except Exception as error:
            log.exception("decode step failed; failing the running batch")
            for ticket in dict.fromkeys(choice.ticket for _, choice in occupied):
                self._end(ticket, "failed", error)
            return
        self.metrics.decode_step(len(occupied))
        proposed = accepted = 0
        for slot, choice in occupied:
            if choice.over:
                continue
            fed = 2 if choice.draft >= 0 else 1
            if not finite_rows(logits[slot, :fed]).all():  # NaN or inf logits fail this request alone
                log.error("request in slot %d got NaN or inf logits; failing it", slot)
                self._end(choice.ticket, "failed", NonFiniteLogits([slot], logits.dtype))
                continue
            greedy = choice.row.options.sampling.greedy and not choice.row.options.processes_logits
            try:
                token, choice.draft, took = spec.settle(choice.row, self.cache, slot, start, logits[slot],
                                                        choice.draft, proposals[slot], self._emitter(choice), greedy)
            except Exception as error:
                log.exception("sampling failed; failing the request")
                self._end(choice.ticket, "failed", error)
                continue
            proposed += fed - 1
            accepted += took
            choice.draft_policy.record(fed - 1, took)
            if not wants[slot]:
                choice.draft = spec.NO_DRAFT
            if token is None:
                self._retire(choice)
            else:
                choice.next_token = token
        self.metrics.drafts(proposed, accepted)
        self.cache.trim()

    def _emitter(self, choice: _Choice) -> Callable[[int], bool]:
        """`settle`'s emit for a choice: time the token (inter-token latency) and `_emit` it."""
        def emit(token: int) -> bool:
            now = time.perf_counter()
            self.metrics.next_tokens([now - choice.last_token_at])
            choice.last_token_at = now
            return self._emit(choice, token)
        return emit

    def _emit(self, choice: _Choice, token: int) -> bool:
        """Advance the choice by `token` and deliver its event; True when the choice is over."""
        ticket = choice.ticket
        event = choice.row.advance(token, choice.index)
        if ticket.cancelled:
            self.metrics.count_request("cancelled")
            return True
        try:
            ticket.sink(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): treat as a disconnect
            log.exception("a request's sink failed; dropping the request")
            ticket.cancel()  # its other choices leave before the next step
            self.metrics.count_request("cancelled")
            return True
        if event.finish_reason is not None:
            self.metrics.finished(event.finish_reason, time.perf_counter() - ticket.arrived)
            return True
        return False

    def _retire(self, choice: _Choice) -> None:
        """The choice is over: free its slot, if it holds one."""
        choice.over = True
        if choice.slot is not None:
            self._slots[choice.slot] = None
            self.cache.free(choice.slot)
            choice.slot = None
            self.metrics.batch(len(self._occupied()), len(self._slots))

    def _end(self, ticket: Ticket, outcome: str, error: BaseException | None = None) -> None:
        """End the request's live choices with `outcome` (cancelled or failed), and deliver `error`, if any."""
        for choice in ticket.live:
            self._retire(choice)
            self.metrics.count_request(outcome)
        if error is None:
            return
        try:
            ticket.sink(error)
        except Exception:
            log.exception("a request's sink failed")
