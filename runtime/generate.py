"""Generation over a Session: chunked prefill, then decode steps, sampling, stops and R1 reasoning.

`prefill` and `decode_one_token` drive the graph over the latent cache; `generate_stream` runs a batch of
prompts to completion and yields per-row text increments; `generate` collects them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.requests import GenerationOptions, RequestError, validate_request
from moetrt.runtime.sampling import SamplingParams, select_token
from moetrt.runtime.session import LatentCache, Session
from moetrt.runtime.text import THINK_END, THINK_START, IncrementalDetokenizer, ReasoningSplitter, StopMatcher


@dataclasses.dataclass
class StreamEvent:
    """One row's increment: new tokens and the text they completed, split into reasoning and answer."""

    row: int
    token_ids: list[int]
    reasoning: str = ""
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" on the row's last event


@dataclasses.dataclass
class GenerationResult:
    text: str  # the answer: what follows </think> when the output reasons, else everything
    reasoning: str | None  # the thinking, None when the output has none
    token_ids: list[int]  # new tokens (a stop token included)
    finish_reason: str
    prompt_tokens: int

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
    batch, width = ids.shape
    logits = None
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        last = end == width
        logit_positions = np.full((batch, 1 if last else 0), end - start - 1, dtype=np.int64)
        mask = cache.attention_mask(end - start, valid[:, start:end])
        logits, _ = session.run(ids[:, start:end], positions[:, start:end], mask, logit_positions,
                                cache.past(), cache.reserve(end - start))
        cache.advance(end - start)
    return logits[:, -1]


def decode_one_token(session: Session, cache: LatentCache, tokens: np.ndarray, positions: np.ndarray,
                     active: np.ndarray) -> np.ndarray:
    """Feed one token per row; finished rows ride along masked out. Returns logits `[B, vocab]`."""
    mask = cache.attention_mask(1, active[:, None].astype(np.int64))
    logits, _ = session.run(tokens[:, None], positions[:, None], mask, np.zeros((len(tokens), 1), np.int64),
                            cache.past(), cache.reserve(1))
    cache.advance(1)
    return logits[:, -1]


class RowState:
    """One sequence's generation state, shared by `generate_stream` and the serving scheduler: the next
    token (forced by the thinking budget, else sampled with the row's own seeded rng), then the text it
    completes (detokenised, stop strings cut, split into reasoning and answer) and whether the row is done.

    `split_reasoning=False` routes all text to the answer (raw completions keep their `<think>` tags).
    """

    def __init__(self, prompt: list[int], options: GenerationOptions, tokenizer=None, seed: int | None = None,
                 split_reasoning: bool = True):
        self.prompt = list(prompt)
        self.options = options
        self.rng = np.random.default_rng(seed)
        self.detokenizer = IncrementalDetokenizer(tokenizer.decode, self.prompt[-4:]) if tokenizer is not None else None
        self.splitter = ReasoningSplitter(_prompt_opens_thinking(tokenizer, self.prompt)) if split_reasoning else None
        self.stops = StopMatcher(options.stop)
        self.stop_ids = frozenset(options.stop_token_ids)
        self.think_end = tokenizer.encode(THINK_END) if tokenizer is not None else []
        self.generated: list[int] = []
        self.reasoning_tokens = 0
        self.forced: list[int] = []
        self.finish_reason: str | None = None

    def choose(self, logits: np.ndarray, greedy_pick: int | None = None) -> int:
        """The next token from this row's logits `[vocab]`; `greedy_pick` is the batch's argmax for this row,
        computed once for all rows when sampling is plain greedy."""
        if self.forced:
            return self.forced.pop(0)
        if greedy_pick is not None:
            return greedy_pick
        sampling = self.options.sampling
        seen = self.prompt + self.generated if sampling.repetition_penalty != 1.0 else []
        return select_token(logits, sampling, self.rng, np.asarray(seen, dtype=np.int64))

    def advance(self, token: int, index: int = 0) -> StreamEvent:
        """Append `token`; returns the row's event (`index` names the row in it)."""
        self.generated.append(token)
        finish = "stop" if token in self.stop_ids else None
        if finish is None and len(self.generated) >= self.options.max_new_tokens:
            finish = "length"
        text = self.detokenizer.push(token) if self.detokenizer is not None and finish != "stop" else ""
        text, stopped = self.stops.feed(text, final=finish is not None)
        if stopped:
            finish = "stop"
        if self.splitter is None:
            reasoning, content = "", text
        else:
            reasoning, content = self.splitter.feed(text, final=finish is not None)
            if self.splitter.in_reasoning:
                self.reasoning_tokens += 1
                budget = self.options.max_reasoning_tokens
                if budget is not None and self.reasoning_tokens >= budget and not self.forced and self.think_end:
                    self.forced = list(self.think_end)  # the thinking budget is spent: close the section
        self.finish_reason = finish
        return StreamEvent(index, [token], reasoning, content, finish)


def _prompt_opens_thinking(tokenizer, prompt: list[int]) -> bool:
    if tokenizer is None:
        return False
    text = tokenizer.decode(prompt[-64:])
    return text.rfind(THINK_START) > text.rfind(THINK_END)


def generate_stream(
    session: Session,
    prompts: list[list[int]],
    options: GenerationOptions,
    tokenizer=None,
    max_context: int | None = None,
) -> Iterator[StreamEvent]:
    """Generate for a batch of token-id prompts; yields one event per row per generated token (text may be
    empty while a character or a tag is incomplete). `tokenizer` (decode/encode) enables text, stop
    strings and the reasoning split. Raises RequestError (see `validate_request`) before any compute."""
    if not prompts:
        raise RequestError("no prompts given: pass at least one", param="prompt")
    for prompt in prompts:
        validate_request(prompt, options, vocab_size=session.vocab_size, max_context=max_context,
                         has_tokenizer=tokenizer is not None)
    return _stream_batch(session, prompts, options, tokenizer)


def _stream_batch(session: Session, prompts: list[list[int]], options: GenerationOptions,
               tokenizer) -> Iterator[StreamEvent]:
    """generate_stream's loop over a validated batch: prefill, then one decode step per token."""
    longest = max(len(p) for p in prompts)
    seed = options.sampling.seed
    rows = [RowState(prompt, options, tokenizer, None if seed is None else seed + i)
            for i, prompt in enumerate(prompts)]
    cache = session.new_cache(len(prompts), longest + options.max_new_tokens)
    logits = prefill(session, cache, [r.prompt for r in rows], options.prefill_chunk)
    positions = np.array([len(r.prompt) for r in rows], dtype=np.int64)

    plain_greedy = options.sampling.greedy and options.sampling.repetition_penalty == 1.0
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
        logits = decode_one_token(session, cache, tokens, positions, active)
        positions += 1


def generate(
    session: Session,
    prompts: list[list[int]],
    options: GenerationOptions,
    tokenizer=None,
    max_context: int | None = None,
) -> list[GenerationResult]:
    """Run `generate_stream` to the end and assemble one result per prompt."""
    reasoning = [[] for _ in prompts]
    text = [[] for _ in prompts]
    tokens = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    opened = [False] * len(prompts)
    for event in generate_stream(session, prompts, options, tokenizer, max_context):
        tokens[event.row].extend(event.token_ids)
        reasoning[event.row].append(event.reasoning)
        text[event.row].append(event.text)
        opened[event.row] |= bool(event.reasoning)
        if event.finish_reason:
            finish[event.row] = event.finish_reason
    results = []
    for i, prompt in enumerate(prompts):
        thought = "".join(reasoning[i])
        has_reasoning = opened[i] or (tokenizer is not None and _prompt_opens_thinking(tokenizer, prompt))
        results.append(GenerationResult(
            text="".join(text[i]).rstrip() if tokenizer is not None else "",
            reasoning=thought.strip() if has_reasoning else None,
            token_ids=tokens[i],
            finish_reason=finish[i],
            prompt_tokens=len(prompt),
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
