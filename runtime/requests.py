"""What a generation request must satisfy before it runs, checked in one place, and the defaults it starts from.

`validate_request` is the check that the Python API (and so the CLI), `generate_stream`, the scheduler and the
server all run before any compute; each refusal is a `RequestError` whose one-line message names the problem
and the fix. Option values are checked where they are held: `SamplingParams` (temperature, top_k, top_p,
repetition_penalty) and `GenerationOptions` (max_new_tokens, prefill_chunk, max_reasoning_tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from moetrt.errors import MoetrtError
from moetrt.runtime.sampling import SamplingParams
from moetrt.settings import DEFAULT_MAX_SEQ


# Tokens to generate when neither the caller nor the engine's generation_config.json says how many.
DEFAULT_MAX_NEW_TOKENS = 512
# Prompt tokens per graph call in prefill (never more than the engine's max_seq): the same number as the max_seq
# an engine is built with when none is given.
DEFAULT_PREFILL_CHUNK = DEFAULT_MAX_SEQ

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How one request generates: at most `max_new_tokens` new tokens, sampled as `sampling` says, ending at a
    stop token id, or at a stop string in the answer (or, with `stop_in_reasoning`, in the thinking too);
    `max_reasoning_tokens` closes the thinking after that many tokens; prompts are
    prefilled `prefill_chunk` tokens per graph call. Raises MoetrtError for values out of range."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = SamplingParams(do_sample=False)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_in_reasoning: bool = False
    max_reasoning_tokens: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MoetrtError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.prefill_chunk < 1:
            raise MoetrtError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.max_reasoning_tokens is not None and self.max_reasoning_tokens < 0:
            raise MoetrtError("max_reasoning_tokens must be >= 0")


class RequestError(MoetrtError):
    """A request the engine refuses. `param` names the field at fault ("prompt", "stop"), `code` the reason
    where a client may act on it (`CONTEXT_LENGTH_EXCEEDED`); the server returns both in its 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def validate_request(prompt: Sequence[int], options: GenerationOptions, *, vocab_size: int,
                     max_context: int | None, has_tokenizer: bool) -> None:
    """Raise RequestError unless the token-id `prompt` with `options` can run on an engine with `vocab_size`
    tokens, `max_context` positions per sequence (None: unbounded) and a tokenizer or not."""
    if len(prompt) == 0:
        raise RequestError("the prompt is empty: pass at least one token", param="prompt")
    check_token_ids(prompt, vocab_size)
    if options.stop and not has_tokenizer:
        raise RequestError("stop strings need an engine with a tokenizer; pass stop_token_ids instead", param="stop")
    if max_context is not None:
        check_context(len(prompt), options.max_new_tokens, max_context)


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Raise RequestError unless every id lies in [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token ids must lie in [0, {vocab_size}), got {bad}: pass ids from this engine's "
                           "vocabulary", param="prompt")


def check_context(prompt_tokens: int, new_tokens: int, max_context: int) -> None:
    """Raise RequestError (code context_length_exceeded) when `prompt_tokens` + `new_tokens` exceed the
    engine's `max_context`. `new_tokens` is 0 when only the prompt is scored."""
    total = prompt_tokens + new_tokens
    if total <= max_context:
        return
    room = max_context - prompt_tokens
    head, fix = f"a prompt of {prompt_tokens} tokens", "shorten the prompt"
    if new_tokens:
        head += f" plus {_new_tokens(new_tokens)} ({total})"
        fix = f"ask for at most {_new_tokens(room)}, shorten the prompt" if room >= 1 else fix
    raise RequestError(f"{head} exceeds the engine's context of {max_context} tokens; {fix}, or rebuild the "
                       "engine with a larger --max-context", param="prompt", code=CONTEXT_LENGTH_EXCEEDED)


def fit_new_tokens(prompt_tokens: int, max_context: int, default: int | None) -> int:
    """max_new_tokens for a request that names none: `default` (None: all the room) capped by the room a prompt of
    `prompt_tokens` leaves in the engine's `max_context`; at least 1, so that a prompt that fills the context is
    refused as too long rather than given nothing to do."""
    room = max_context - prompt_tokens
    return max(1, room if default is None else min(room, default))


def _new_tokens(count: int) -> str:
    return f"{count} new token{'' if count == 1 else 's'}"
