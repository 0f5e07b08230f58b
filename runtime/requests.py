"""What a generation request must satisfy before it runs, checked in one place, and the defaults it starts from.

`validate_request` is the check that the Python API (and so the CLI), `generate_stream`, the scheduler and the
server all run before any compute; each refusal is a `RequestError` whose one-line message names the problem
and the fix. Option values are checked where they are held: `SamplingParams` (temperature, top_k, top_p,
repetition_penalty) and `GenerationOptions` (max_new_tokens, prefill_chunk, max_reasoning_tokens); their types,
the chat messages and the text a request carries are checked here first (`check_option_types`, `check_messages`,
`check_text`), so that a wrong type is a one-line refusal rather than a traceback.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

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


# -- types of what the Python API and generation_config.json pass ---------------------------------------------------

def is_integer(value: Any) -> bool:
    """An integer, Python's or numpy's (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number, Python's or numpy's (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool is no subclass of bool


def _is_stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value))


def _is_id_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(is_integer(t) for t in value)


# option name -> (test, what the message says it must be)
OPTION_TYPES = {
    **{name: (_is_number, "a number") for name in ("temperature", "top_p", "repetition_penalty")},
    **{name: (is_integer, "an integer") for name in ("top_k", "seed", "max_new_tokens", "max_reasoning_tokens",
                                                      "prefill_chunk")},
    **{name: (_is_flag, "true or false") for name in ("do_sample", "greedy", "stop_in_reasoning")},
    "stop": (_is_stop, "a string or a list of strings"),
    "stop_token_ids": (_is_id_list, "a list of integer token ids"),
}


def check_option_types(values: Mapping[str, Any]) -> None:
    """Raise RequestError (param: the option) unless each known option in `values` has its type (OPTION_TYPES),
    so that a string temperature, say, is refused before it reaches a comparison, and unless the stop strings are
    UTF-8 text (`check_text`); None values and unknown names are left to the caller."""
    for name, value in values.items():
        test, kind = OPTION_TYPES.get(name, (None, ""))
        if test is not None and value is not None and not test(value):
            raise RequestError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})", param=name)
    for text in _stop_strings(values.get("stop")):
        check_text(text, "a stop string", param="stop")


def _stop_strings(stop: Any) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def check_text(text: str, what: str, param: str) -> None:
    """Raise RequestError unless `text` can be written as UTF-8. Python keeps the bytes of a command-line argument
    that is not UTF-8 as lone surrogates (PEP 383's surrogateescape), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = text[error.start]
        byte = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"U+{ord(char):04X}"
        raise RequestError(f"{what} is not valid UTF-8 text ({byte} at character {error.start}): pass UTF-8 text "
                           "(on a command line, check the shell's locale and the argument's encoding)",
                           param=param) from None


def check_messages(messages: Any) -> None:
    """Raise RequestError (param "messages") unless `messages` is a list of dicts, each with a string "role" and a
    string "content" (or a None content in an assistant message that carries "tool_calls", as OpenAI's API and
    DeepSeek-R1's template allow), and every string in them is valid UTF-8."""
    if not isinstance(messages, (list, tuple)):
        raise RequestError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                           f"{type(messages).__name__}", param="messages")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, Mapping):
            raise RequestError(f"message {number} must be a dict with 'role' and 'content', got "
                               f"{type(message).__name__}", param="messages")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise RequestError(f"message {number} needs a string 'role' ('system', 'user', 'assistant' or 'tool'), "
                               f"got {role!r}", param="messages")
        tool_call = role == "assistant" and content is None and message.get("tool_calls")
        if not isinstance(content, str) and not tool_call:
            raise RequestError(f"message {number} ({role}) needs a string 'content', got "
                               f"{'no content' if 'content' not in message else repr(content)}: pass its text "
                               "(a None content is for an assistant message with tool_calls)", param="messages")
        for text in _strings(message):
            check_text(text, f"message {number} ({role})", param="messages")


def _strings(value: Any) -> Sequence[str]:
    """Every string in a message (values of nested dicts and lists too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []
