"""Generation over a Session: chunked prefill, then decode steps, sampling, stops and R1 reasoning.

`prefill` and `decode_one_token` drive the graph over the latent cache; `generate_stream` runs a batch of
prompts to completion and yields per-row text increments; `generate` collects them. Logits that are about to be
sampled must be finite (`require_finite`): a NaN is an error, never a token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.reasoning import ReasoningSplitter, ThinkTags, prompt_opens_thinking
from moetrt.runtime.requests import GenerationOptions, RequestError, validate_request
from moetrt.runtime.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    log_softmax,
    select_token,
    select_with_draft,
    top_logprobs,
)
from moetrt.runtime import speculative as spec
from moetrt.runtime.session import LatentCache, Session
from moetrt.runtime.text import IncrementalDetokenizer, StopMatcher


@dataclasses.dataclass
class TokenLogprob:
    """A generated token's log-probability and the `top` k most likely (token id, logprob) pairs at its step,
    most likely first (the chosen token among them when it ranks). The values are the float64 log-softmax of the
    model's raw float32 logits at that step, before penalties, logit bias, temperature, top-k/top-p and any
    response-format constraint (vLLM's default), so they describe the model, not the sampler."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class StreamEvent:
    """One row's increment: new tokens and the text they completed, split into reasoning and answer; with
    `options.logprobs` set, `logprobs` holds one TokenLogprob per token in `token_ids`."""

    row: int
    token_ids: list[int]
    reasoning: str = ""
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" on the row's last event
    logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class GenerationResult:
    text: str  # the answer: what follows </think> when the output reasons, else everything
    reasoning: str | None  # the thinking, None when the output has none
    token_ids: list[int]  # new tokens (a stop token included)
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, with options.logprobs set

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, valid mask and position_ids `[B, W]` for left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    valid = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        valid[row, width - len(prompt) :] = 1
    return ids, valid, np.maximum(valid.cumsum(-1) - 1, 0)


def prefill(session: Session, cache: LatentCache, prompts: list[list[int]], chunk: int) -> np.ndarray:
    """Run the prompts through the graph at most `chunk` positions per call; logits `[B, vocab]` of each
    prompt's last token. Only the last call computes logits, so long prompts never materialise more."""
    ids, valid, positions = left_pad(prompts)
    return require_finite(_prefill_columns(session, cache, ids, valid, positions, chunk, logits_at_end=True)[0])


def prefill_drafting(session: Session, cache: LatentCache, prompts: list[list[int]],
                     chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """`prefill` on an --mtp engine for speculative decoding: the MTP module reads each prompt's true next tokens
    (the main model's greedy pick after the last). Returns the logits `[B, vocab]` of each prompt's last token and
    the MTP module's draft `[B]` for the token after the first generated one."""
    ids, valid, positions = left_pad(prompts)
    logits, drafts = _prefill_columns(session, cache, ids, valid, positions, chunk, logits_at_end=True,
                                      following=following_tokens(ids))
    return require_finite(logits), drafts[:, -1].astype(np.int64)


def prefill_part_drafting(session: Session, cache: LatentCache, prompt: list[int], start: int, stop: int,
                          chunk: int) -> tuple[np.ndarray | None, int]:
    """`prefill_part` on an --mtp engine for speculative decoding (as `prefill_drafting`): the logits `[vocab]` and
    the draft once `stop` reaches the prompt's end, else (None, -1)."""
    return _prefill_part(session, cache, prompt, start, stop, chunk, drafting=True)


def following_tokens(ids: np.ndarray, last: int = -1) -> np.ndarray:
    """What an MTP module reads beside each column of ids `[B, W]`: the next column's token; `last` for the last
    column (-1: the main model's greedy pick there). int64 `[B, W]`."""
    following = np.empty_like(ids)
    following[:, :-1] = ids[:, 1:]
    following[:, -1] = last
    return following


def prefill_part(session: Session, cache: LatentCache, prompt: list[int], start: int, stop: int,
                 chunk: int) -> np.ndarray | None:
    """Resume one prompt's prefill: run its positions [start, stop) on its batch-1 `cache` (which holds
    [0, start)), at most `chunk` per call. Returns the logits `[vocab]` of the prompt's last token once `stop`
    reaches `len(prompt)`, else None. Positions and calls as `prefill`'s, so a prompt prefilled in any split
    gives its tokens; the serving scheduler interleaves the parts with decode steps (chunked prefill)."""
    logits, _ = _prefill_part(session, cache, prompt, start, stop, chunk, drafting=False)
    return logits


def _prefill_part(session: Session, cache: LatentCache, prompt: list[int], start: int, stop: int, chunk: int,
                  drafting: bool) -> tuple[np.ndarray | None, int]:
    """prefill_part; with `drafting` (an --mtp engine's speculative decoding) the MTP module reads the prompt's
    true next tokens and the draft for the token after the first generated one comes back too (else -1)."""
    ids = np.asarray([prompt[start:stop]], dtype=np.int64)
    positions = np.arange(start, stop, dtype=np.int64)[None]
    last = stop == len(prompt)
    following = following_tokens(ids, prompt[stop] if not last else -1) if drafting else None
    logits, drafts = _prefill_columns(session, cache, ids, np.ones_like(ids), positions, chunk, logits_at_end=last,
                                      following=following)
    if not last:
        return None, -1
    return require_finite(logits)[0], (int(drafts[0, -1]) if drafts is not None else -1)


def _prefill_columns(session: Session, cache: LatentCache, ids: np.ndarray, valid: np.ndarray,
                     positions: np.ndarray, chunk: int, logits_at_end: bool,
                     following: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Feed the columns of `ids` `[B, W]` (with `valid` and `positions`) at most `chunk` per call; logits
    `[B, vocab]` of the last column when `logits_at_end` (only that call computes any), else None. With
    `following` (`[B, W]`, following_tokens) the calls are speculative ones, which also return the last call's
    drafts `[B, N]` (N 1 when it computed logits)."""
    batch, width = ids.shape
    logits = drafts = None
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        last = end == width and logits_at_end
        logit_positions = np.full((batch, 1 if last else 0), end - start - 1, dtype=np.int64)
        mask = cache.attention_mask(end - start, valid[:, start:end])
        if following is None:
            logits, _ = session.run(ids[:, start:end], positions[:, start:end], mask, logit_positions,
                                    cache.past(), cache.reserve(end - start))
        else:  # the MTP module on every column; a draft where the logits are
            logits, drafts = session.run_speculative(  # type: ignore[attr-defined]
                ids[:, start:end], positions[:, start:end], mask, logit_positions, cache.past(),
                cache.reserve(end - start), following[:, start:end],
                cache.draft_attention_mask(end - start, valid[:, start:end]), logit_positions)
        cache.advance(end - start)
    return (logits[:, -1] if logits_at_end else None), drafts


def decode_one_token(session: Session, cache: LatentCache, tokens: np.ndarray, positions: np.ndarray,
                     active: np.ndarray) -> np.ndarray:
    """Feed one token per row; finished rows ride along masked out. Returns logits `[B, vocab]`."""
    mask = cache.attention_mask(1, active[:, None].astype(np.int64))
    logits, _ = session.run(tokens[:, None], positions[:, None], mask, np.zeros((len(tokens), 1), np.int64),
                            cache.past(), cache.reserve(1))
    cache.advance(1)
    return logits[:, -1]


class NonFiniteLogits(MoetrtError):
    """The engine returned NaN or inf logits for rows about to be sampled (`rows`: their batch indices)."""

    def __init__(self, rows: list[int], dtype: np.dtype):
        self.rows = rows
        super().__init__(f"the engine returned NaN or inf {dtype} logits, so no token can be sampled: its "
                         "arithmetic overflowed or its weights are not finite; rebuild it in float32 (build-engine "
                         "--dtype float32) and compare it with its checkpoint (moetrt verify ENGINE CHECKPOINT)")


def finite_rows(logits: np.ndarray) -> np.ndarray:
    """`[B]` bool: which rows of logits `[B, vocab]` hold no NaN or inf."""
    if logits.dtype == np.float16:  # numpy's float16 isfinite is scalar code, 10x slower than testing the exponent
        return ((logits.view(np.uint16) & 0x7C00) != 0x7C00).all(axis=-1)
    return np.isfinite(logits).all(axis=-1)


def require_finite(logits: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """`logits` `[B, vocab]`, or NonFiniteLogits if any of `rows` (`[B]` bool, default all) holds NaN or inf."""
    bad = ~finite_rows(logits)
    if rows is not None:
        bad &= rows
    if bad.any():
        raise NonFiniteLogits(np.flatnonzero(bad).tolist(), logits.dtype)
    return logits


class RowState:
    """One sequence's generation state, shared by `generate_stream` and the serving scheduler: the next
    token (`</think>` once the thinking budget is spent, else sampled with the row's own seeded rng), then the
    text it completes (detokenised, split into reasoning and answer, stop strings cut) and whether the row is done.

    `split_reasoning=False` routes all text to the answer (raw completions keep their `<think>` tags).
    `in_reasoning`: whether the chat template's generation prompt opened the thinking (reasoning.py's
    `chat_opens_thinking`); None infers it from the prompt's last tokens (`prompt_opens_thinking`). Stop
    strings end the answer, and the thinking too with `options.stop_in_reasoning`.

    `choose` runs the logits processors the options ask for (repetition, presence and frequency penalties, logit
    bias; sampling.py) and, with `options.response_format`, masks the answer's tokens with structured.py's
    constraint: from the first token, or from the token after `</think>` when the row reasons, so the thinking is
    free but for the stop tokens (it cannot end the row before the answer); once the constraint is finished only
    the stop tokens remain. With `options.logprobs`, the event of the
    chosen token carries its `TokenLogprob`.
    """

    def __init__(self, prompt: list[int], options: GenerationOptions, tokenizer=None, seed: int | None = None,
                 split_reasoning: bool = True, in_reasoning: bool | None = None):
        self.prompt = list(prompt)
        self.options = options
        self.rng = np.random.default_rng(seed)
        self.detokenizer = IncrementalDetokenizer(tokenizer.decode, self.prompt[-4:]) if tokenizer is not None else None
        self.splitter = _splitter(tokenizer, self.prompt, in_reasoning) if split_reasoning else None
        self.stops = StopMatcher(options.stop)
        self.reasoning_stops = (StopMatcher(options.stop) if options.stop_in_reasoning and self.splitter is not None
                                else None)
        self.stop_ids = frozenset(options.stop_token_ids)
        self.constraint = _constraint(options, tokenizer)
        self.generated: list[int] = []
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self._pending_logprob: TokenLogprob | None = None  # the chosen token's, until advance reports it
        self._masked = False  # whether the chosen token was picked under the constraint's mask

    @property
    def thought(self) -> bool:
        """Whether the output has a thinking part (possibly empty)."""
        return self.splitter is not None and self.splitter.thought

    def choose(self, logits: np.ndarray, greedy_pick: int | None = None) -> int:
        """The next token from this row's raw logits `[vocab]`; `greedy_pick` is the batch's argmax for this row,
        computed once for all rows when sampling is plain greedy (ignored when the options process the logits).
        Call `advance` with the token before the next `choose`."""
        return self.choose_draft(logits, -1, greedy_pick)[0]

    def choose_draft(self, logits: np.ndarray, draft: int, greedy_pick: int | None = None) -> tuple[int, bool]:
        """`choose`, verifying a draft token (-1: none): returns the token and whether it is the draft accepted.
        Greedy rows accept a draft equal to their pick; sampled rows follow sampling.py's `select_with_draft`, so
        the token's distribution is the one `choose` samples from."""
        token, accepted = self._pick(logits, greedy_pick, draft)
        self._note_logprob(logits, token)
        return token, accepted

    def _note_logprob(self, logits: np.ndarray, token: int) -> None:
        if self.options.logprobs is not None:
            logprobs = log_softmax(logits)
            self._pending_logprob = TokenLogprob(token, float(logprobs[token]),
                                                 top_logprobs(logprobs, self.options.logprobs))

    def _pick(self, logits: np.ndarray, greedy_pick: int | None, draft: int = -1) -> tuple[int, bool]:
        self._masked = False
        budget = self.options.max_reasoning_tokens
        if budget is not None and self.splitter is not None and self.splitter.in_reasoning \
                and self.reasoning_tokens >= budget:
            return self.splitter.tags.end, self.splitter.tags.end == draft
        options = self.options
        if greedy_pick is not None and not options.processes_logits:
            return greedy_pick, greedy_pick == draft
        sampling = options.sampling
        if sampling.repetition_penalty != 1.0:
            seen = np.asarray(self.prompt + self.generated, dtype=np.int64)
            logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
        if options.presence_penalty or options.frequency_penalty:
            logits = apply_presence_frequency_penalties(logits, np.asarray(self.generated, dtype=np.int64),
                                                        options.presence_penalty, options.frequency_penalty)
        logits = apply_logit_bias(logits, options.logit_bias)
        if self.constraint is not None:
            if self.splitter is not None and self.splitter.in_reasoning:
                logits = self._without_stops(logits)
            else:
                logits = self._mask(logits)
                self._masked = True
        if draft < 0:
            return select_token(logits, sampling, self.rng, np.empty(0, dtype=np.int64)), False
        return select_with_draft(logits, sampling, self.rng, draft)

    def _without_stops(self, logits: np.ndarray) -> np.ndarray:
        """Logits with the stop tokens at -inf: a constrained row may not end inside its thinking, so that a
        "stop" always comes with the answer the format asks for."""
        ends = [t for t in self.stop_ids if 0 <= t < len(logits)]
        if not ends:
            return logits
        logits = np.array(logits, dtype=np.float32)
        logits[ends] = -np.inf
        return logits

    def _mask(self, logits: np.ndarray) -> np.ndarray:
        """Logits with what the constraint forbids at -inf; once it is finished, everything but the stop tokens."""
        ends = [t for t in self.stop_ids if 0 <= t < len(logits)]
        if self.constraint.finished and ends:
            allowed = np.full(logits.shape, -np.inf, dtype=np.float32)
            allowed[ends] = logits[ends]
            return allowed
        return self.constraint.mask(np.array(logits, dtype=np.float32))  # a copy: the mask may write in place

    def advance(self, token: int, index: int = 0) -> StreamEvent:
        """Append `token`; returns the row's event (`index` names the row in it)."""
        self.generated.append(token)
        if self._masked and not self.constraint.finished and token not in self.stop_ids:
            self.constraint.accept(token)
        self._masked = False
        logprob, self._pending_logprob = self._pending_logprob, None
        if self.options.logprobs is not None and (logprob is None or logprob.token_id != token):
            raise RuntimeError("RowState.advance got a token its last choose did not pick, so it has no logprob for "
                               "it; call choose before each advance")
        finish = "stop" if token in self.stop_ids else None
        if finish is None and len(self.generated) >= self.options.max_new_tokens:
            finish = "length"
        text = self.detokenizer.push(token) if self.detokenizer is not None and finish != "stop" else ""
        if self.splitter is None:
            reasoning, content = "", text
        else:
            if self.splitter.in_reasoning and token not in (self.splitter.tags.start, self.splitter.tags.end):
                self.reasoning_tokens += 1  # a thinking token; the tags themselves are not
            reasoning, content = self.splitter.feed(token, text)
        reasoning, content, stopped = self._cut_at_stops(reasoning, content, final=finish is not None)
        if stopped:
            finish = "stop"
        self.finish_reason = finish
        return StreamEvent(index, [token], reasoning, content, finish, None if logprob is None else [logprob])

    def _cut_at_stops(self, reasoning: str, content: str, final: bool) -> tuple[str, str, bool]:
        """Cut at the first stop string: in the answer, and in the thinking when `reasoning_stops` watches it."""
        if self.reasoning_stops is not None:
            reasoning, stopped = self.reasoning_stops.feed(reasoning, final=final or not self.splitter.in_reasoning)
            if stopped:
                return reasoning, "", True
        content, stopped = self.stops.feed(content, final=final)
        return reasoning, content, stopped


def _constraint(options: GenerationOptions, tokenizer):
    """structured.py's constraint for the options' response_format, or None without one (or for `{"type":
    "text"}`). It also checks the object (RequestError, param "response_format"): RowState is made before any
    compute, by generate_stream and the scheduler's submit alike. The import is lazy: the grammar library loads only
    for requests that name a format, and structured.py imports requests.py, which therefore cannot call it."""
    if options.response_format is None:
        return None
    from moetrt.runtime import structured

    eos_ids = tuple(options.stop_token_ids) or tuple(getattr(tokenizer, "eos_ids", ()))
    return structured.constraint_for(options.response_format, tokenizer, eos_ids)


def _splitter(tokenizer, prompt: list[int], in_reasoning: bool | None) -> ReasoningSplitter | None:
    tags = ThinkTags.of(tokenizer) if tokenizer is not None else None
    if tags is None:
        return None
    return ReasoningSplitter(tags, prompt_opens_thinking(tokenizer, prompt) if in_reasoning is None else in_reasoning)


def generate_stream(
    session: Session,
    prompts: list[list[int]],
    options: GenerationOptions,
    tokenizer=None,
    max_context: int | None = None,
    in_reasoning: bool | None = None,
) -> Iterator[StreamEvent]:
    """Generate for a batch of token-id prompts; yields one event per row per generated token (text may be
    empty while a character is incomplete). `tokenizer` (ChatTokenizer) enables text, stop strings and the
    reasoning split; `in_reasoning` as RowState's, for every prompt. Raises RequestError (see
    `validate_request`) before any compute, and MoetrtError for `options.speculative` on an engine without the MTP
    module."""
    rows = _start_rows(session, prompts, options, tokenizer, max_context, in_reasoning)
    if options.speculative is not None:
        spec.check_session(session)
    return _stream_batch(session, rows, options)


def _start_rows(session: Session, prompts: list[list[int]], options: GenerationOptions, tokenizer,
                max_context: int | None, in_reasoning: bool | None) -> list[RowState]:
    """Validate the batch (RequestError before any compute) and start one RowState per prompt."""
    if not prompts:
        raise RequestError("no prompts given: pass at least one", param="prompt")
    for prompt in prompts:
        validate_request(prompt, options, vocab_size=session.vocab_size, max_context=max_context,
                         has_tokenizer=tokenizer is not None)
    seed = options.sampling.seed
    return [RowState(prompt, options, tokenizer, None if seed is None else seed + i, in_reasoning=in_reasoning)
            for i, prompt in enumerate(prompts)]


def _stream_batch(session: Session, rows: list[RowState], options: GenerationOptions) -> Iterator[StreamEvent]:
    """generate_stream's loop over a validated batch: prefill, then one decode step per token (or, with
    options.speculative, runtime/speculative.py's steps)."""
    if options.speculative is not None:
        yield from stream_speculative(session, rows, options)
        return
    longest = max(len(r.prompt) for r in rows)
    cache = session.new_cache(len(rows), longest + options.max_new_tokens)
    logits = prefill(session, cache, [r.prompt for r in rows], options.prefill_chunk)
    positions = np.array([len(r.prompt) for r in rows], dtype=np.int64)

    plain_greedy = options.sampling.greedy and not options.processes_logits
    for _ in range(options.max_new_tokens):
        tokens = np.zeros(len(rows), dtype=np.int64)
        picks = logits.argmax(-1).tolist() if plain_greedy else [None] * len(rows)  # one call for the batch
        for i, row in enumerate(rows):
            if row.finish_reason is None:
                tokens[i] = row.choose(logits[i], picks[i])
                yield row.advance(int(tokens[i]), i)
        active = np.array([r.finish_reason is None for r in rows])
        if not active.any():
            return
        logits = require_finite(decode_one_token(session, cache, tokens, positions, active), active)
        positions += 1


def stream_speculative(session: Session, rows: list[RowState], options: GenerationOptions,
                       counts: spec.StepCounts | None = None,
                       policy: spec.DraftPolicy | None = None) -> Iterator[StreamEvent]:
    """`_stream_batch` with MTP drafts (runtime/speculative.py): prefill, then `draft_step`s until every row is
    done; yields one event per row per token, as the plain loop does. `counts` (if given) accumulates drafts and
    steps; `policy`, shared by the rows, decides which steps draft (default: a DraftPolicy per row following the
    session's DraftHistory, and a step runs the MTP module when any row's asks for drafts)."""
    spec.check_session(session)
    counts = counts if counts is not None else spec.StepCounts()
    history = spec.history_for(session)
    policies = [policy] * len(rows) if policy is not None else [spec.DraftPolicy(history=history) for _ in rows]
    batch = len(rows)
    longest = max(len(r.prompt) for r in rows)
    # Rejected drafts leave masked columns: room for some before a compaction is needed.
    cache = session.new_cache(batch, longest + options.max_new_tokens + max(8, options.max_new_tokens // 2))
    logits, proposals = prefill_drafting(session, cache, [r.prompt for r in rows], options.prefill_chunk)
    greedy = options.sampling.greedy and not options.processes_logits
    tokens = np.zeros(batch, dtype=np.int64)
    drafts = np.full(batch, spec.NO_DRAFT, dtype=np.int64)
    picks = logits.argmax(-1)
    for i, row in enumerate(rows):
        tokens[i] = row.choose(logits[i], int(picks[i]) if greedy else None)
        drafts[i] = spec.first_draft(cache, i, logits[i], int(tokens[i]), int(proposals[i]))
        yield row.advance(int(tokens[i]), i)
    pending: list[StreamEvent] = []

    def emitter(index: int) -> Callable[[int], bool]:
        def emit(token: int) -> bool:
            event = rows[index].advance(token, index)
            pending.append(event)
            return event.finish_reason is not None
        return emit

    emits = [emitter(i) for i in range(batch)]  # made once, not per row per step

    while True:
        active = np.array([r.finish_reason is None for r in rows])
        if not active.any():
            return
        if cache.length + 2 > cache.max_context:
            cache.compact([i for i in range(batch) if active[i]])
        positions = np.array([len(r.prompt) + len(r.generated) - 1 for r in rows], dtype=np.int64)
        if policy is not None:
            wants = [policy.propose()] * batch
        else:
            wants = [bool(active[i]) and policies[i].propose() for i in range(batch)]
        step_logits, step_proposals, start = spec.draft_step(session, cache, tokens, positions, active, drafts,
                                                        any(wants))
        counts.steps += 1
        counts.row_steps += int(active.sum())
        require_finite(step_logits[:, 0], active)
        for i, row in enumerate(rows):
            if not active[i]:
                continue
            draft = int(drafts[i])
            counts.proposed += draft >= 0
            if draft >= 0:
                require_finite(step_logits[i, 1:2])
            token, drafts[i], accepted = spec.settle(row, cache, i, start, step_logits[i], draft, step_proposals[i],
                                                emits[i], greedy)
            counts.accepted += accepted
            policies[i].record(int(draft >= 0), accepted)
            if not wants[i]:
                drafts[i] = spec.NO_DRAFT
            if token is not None:
                tokens[i] = token
            yield from pending
            pending.clear()
        cache.trim()


def generate(
    session: Session,
    prompts: list[list[int]],
    options: GenerationOptions,
    tokenizer=None,
    max_context: int | None = None,
    in_reasoning: bool | None = None,
) -> list[GenerationResult]:
    """Run `generate_stream` to the end and assemble one result per prompt."""
    rows = _start_rows(session, prompts, options, tokenizer, max_context, in_reasoning)
    reasoning = [[] for _ in prompts]
    text = [[] for _ in prompts]
    tokens = [[] for _ in prompts]
    logprobs = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    for event in _stream_batch(session, rows, options):
        tokens[event.row].extend(event.token_ids)
        logprobs[event.row].extend(event.logprobs or ())
        reasoning[event.row].append(event.reasoning)
        text[event.row].append(event.text)
        if event.finish_reason:
            finish[event.row] = event.finish_reason
    results = []
    for i, prompt in enumerate(prompts):
        results.append(GenerationResult(
            text="".join(text[i]).rstrip() if tokenizer is not None else "",
            reasoning="".join(reasoning[i]).strip() if rows[i].thought else None,
            token_ids=tokens[i],
            finish_reason=finish[i],
            prompt_tokens=len(prompt),
            logprobs=logprobs[i] if options.logprobs is not None else None,
        ))
    return results


def continuation_logits(session: Session, prompts: list[list[int]], continuations: list[list[int]]) -> list[np.ndarray]:
    """The logits `[len(continuation), vocab]` each continuation token was chosen from, by one scoring call
    over the left-padded prompt + continuation rows (the session must take them in one call, as the torch
    reference does). Verify and the tests read the reference's top-2 margins from them."""
    sequences = [prompt + continuation[:-1] for prompt, continuation in zip(prompts, continuations)]
    ids, valid, positions = left_pad(sequences)
    batch, width = ids.shape
    steps = np.arange(max(len(c) for c in continuations))
    # row r's step j is predicted at padded column width - len(continuation) + j; columns past it repeat the last
    first = width - np.array([len(c) for c in continuations])
    logit_positions = np.minimum(first[:, None] + steps[None, :], width - 1).astype(np.int64)
    cache = session.new_cache(batch, width)
    mask = cache.attention_mask(width, valid)
    logits, _ = session.run(ids, positions, mask, logit_positions, cache.past(), cache.reserve(width))
    return [logits[row, : len(c)] for row, c in enumerate(continuations)]
