"""What a generation request must satisfy before it runs, checked in one place, and the defaults it starts from.

`validate_request` is the check that the Python API (and so the CLI), `generate_stream`, the scheduler and the
server all run before any compute; each refusal is a `RequestError` whose one-line message names the problem
and the fix. Option values are checked where they are held: `SamplingParams` (temperature, top_k, top_p,
repetition_penalty) and `GenerationOptions` (max_new_tokens, prefill_chunk, max_reasoning_tokens, OpenAI's
penalties, logit_bias, logprobs); token ids against the vocabulary in `validate_request`; their types,
the chat messages and the text a request carries are checked here first (`check_option_types`, `check_messages`,
`check_text`), so that a wrong type is a one-line refusal rather than a traceback.
"""

from __future__ import annotations

import dataclasses
import math
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
# The most alternatives per token `logprobs` may ask for (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20


# Speculative decoding methods (GenerationOptions.speculative): "mtp" drafts with the engine's multi-token-prediction
# module (an engine built with --mtp; runtime/speculative.py).
SPECULATIVE_METHODS = (None, "mtp")


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How one request generates: at most `max_new_tokens` new tokens, sampled as `sampling` says, ending at a
    stop token id, or at a stop string in the answer (or, with `stop_in_reasoning`, in the thinking too);
    `max_reasoning_tokens` closes the thinking after that many tokens; prompts are
    prefilled `prefill_chunk` tokens per graph call. Raises MoetrtError for values out of range.

    OpenAI's fields, as its API reference defines them (RequestError naming the field when out of range):
    `presence_penalty` and `frequency_penalty` in [-2, 2] (sampling.py `apply_presence_frequency_penalties`:
    counts over the generated tokens, not the prompt), `logit_bias` (token id, bias in [-100, 100]) pairs added to
    the logits before sampling (a mapping {id: bias}, JSON's string ids too, is normalised to sorted pairs),
    `logprobs` None (off) or k in [0, 20]: each generated token reports its log-probability under the model's raw
    logits and the k most likely alternatives (generate.py `TokenLogprob`), `response_format` OpenAI's object as
    received ({"type": "json_object"} or {"type": "json_schema", ...}), decoded under structured.py's constraint.

    `speculative` "mtp" decodes with the engine's multi-token-prediction module drafting `draft_tokens` tokens per
    step (1 for now), verified by the main model (runtime/speculative.py): greedy output as plain decoding's, sampled
    output from the same distribution. None decodes one token per step.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = SamplingParams(do_sample=False)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_in_reasoning: bool = False
    max_reasoning_tokens: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    response_format: dict | None = None
    speculative: str | None = None
    draft_tokens: int = 1

    def __post_init__(self) -> None:
        if self.speculative not in SPECULATIVE_METHODS:
            raise MoetrtError(f"speculative must be None (plain decoding) or one of {', '.join(SPECULATIVE_METHODS[1:])}, "
                              f"got {self.speculative!r}")
        if not (is_integer(self.draft_tokens) and self.draft_tokens >= 1):
            raise MoetrtError(f"draft_tokens must be a positive integer, got {self.draft_tokens!r}")
        if self.draft_tokens > 1:
            raise MoetrtError(f"draft_tokens {self.draft_tokens}: chaining the MTP module for more than one draft "
                              "token per step is not supported yet; use 1")
        if self.max_new_tokens < 1:
            raise MoetrtError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.prefill_chunk < 1:
            raise MoetrtError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.max_reasoning_tokens is not None and self.max_reasoning_tokens < 0:
            raise MoetrtError("max_reasoning_tokens must be >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and -2 <= value <= 2):
                raise RequestError(f"{name} must be a number in [-2, 2], got {value!r}", param=name)
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias))
        if self.logprobs is not None and not (is_integer(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"logprobs must be None (off) or the number of top alternatives to return per token, "
                               f"an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}", param="logprobs")
        if self.response_format is not None and not isinstance(self.response_format, Mapping):
            raise RequestError(f"response_format must be an object such as {{'type': 'json_object'}}, got "
                               f"{type(self.response_format).__name__}", param="response_format")

    @property
    def processes_logits(self) -> bool:
        """Whether the next token depends on more than the argmax or the sampling filters: a repetition, presence
        or frequency penalty, a logit bias or a response format's constraint. Such rows never take a batch's
        greedy fast path."""
        return (self.sampling.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or bool(self.logit_bias) or self.constrained)

    @property
    def constrained(self) -> bool:
        """Whether `response_format` asks for more than plain text, so that its answer decodes under a grammar."""
        return self.response_format is not None and self.response_format.get("type") != "text"


def _logit_bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as sorted (token id, bias) pairs from a mapping {id: bias} (ids as ints or, as JSON writes
    them, decimal strings) or a sequence of pairs; RequestError (param "logit_bias") for anything else, a
    repeated id, or a bias outside [-100, 100] (OpenAI's range)."""
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)):
        items = bias
    else:
        raise RequestError(f"logit_bias must map token ids to biases, got {type(bias).__name__}", param="logit_bias")
    pairs: dict[int, float] = {}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise RequestError(f"logit_bias must map token ids to biases, got the entry {item!r}", param="logit_bias")
        token, value = item
        if isinstance(token, str) and token.isascii() and token.isdigit():
            token = int(token)
        if not is_integer(token):
            raise RequestError(f"logit_bias keys must be token ids (integers), got {token!r}", param="logit_bias")
        if not (_is_number(value) and math.isfinite(value) and -100 <= value <= 100):
            raise RequestError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {token}",
                               param="logit_bias")
        if int(token) in pairs:
            raise RequestError(f"logit_bias names token {int(token)} twice: give each token one bias",
                               param="logit_bias")
        pairs[int(token)] = float(value)
    return tuple(sorted(pairs.items()))


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
    bad = next((t for t, _ in options.logit_bias if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"logit_bias names token {bad}, but token ids lie in [0, {vocab_size}): pass ids from "
                           "this engine's vocabulary", param="logit_bias")
    if options.constrained and not has_tokenizer:
        raise RequestError("response_format needs an engine with a tokenizer (the grammar is over its tokens)",
                           param="response_format")
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
    **{name: (_is_number, "a number") for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty",
                                                    "frequency_penalty")},
    **{name: (is_integer, "an integer") for name in ("top_k", "seed", "max_new_tokens", "max_reasoning_tokens",
                                                      "prefill_chunk", "logprobs", "draft_tokens")},
    "speculative": (lambda v: isinstance(v, str), "a string: 'mtp'"),
    "logit_bias": (lambda v: isinstance(v, (Mapping, list, tuple)), "a mapping of token ids to biases"),
    "response_format": (lambda v: isinstance(v, Mapping), "an object such as {'type': 'json_object'}"),
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
    DeepSeek-R1's template allow; "tool" messages answer a call with their string content), tool_calls in OpenAI's
    shape (`_check_tool_calls`), and every string in them is valid UTF-8."""
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
        if message.get("tool_calls") is not None:
            _check_tool_calls(number, role, message["tool_calls"])
        for text in _strings(message):
            check_text(text, f"message {number} ({role})", param="messages")


def _check_tool_calls(number: int, role: str, calls: Any) -> None:
    """An assistant message's tool_calls in OpenAI's shape, the fields DeepSeek's templates read:
    [{"type": "function", "function": {"name": str, "arguments": str (JSON)}}] ("id" too, as OpenAI sends it)."""
    if role != "assistant":
        raise RequestError(f"message {number} ({role}) has tool_calls: only assistant messages carry them",
                           param="messages")
    shape = '[{"id": ..., "type": "function", "function": {"name": ..., "arguments": "<JSON text>"}}]'
    if not isinstance(calls, (list, tuple)) or not calls:
        raise RequestError(f"message {number}'s tool_calls must be a non-empty list {shape}", param="messages")
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not (isinstance(function, Mapping) and call.get("type") == "function"
                and isinstance(function.get("name"), str) and isinstance(function.get("arguments"), str)):
            raise RequestError(f"message {number}'s tool call {call!r} is not OpenAI's shape {shape}",
                               param="messages")


def check_tools(tools: Any) -> None:
    """Raise RequestError (param "tools") unless `tools` is None or a list of OpenAI's tool objects,
    [{"type": "function", "function": {"name": str, "description": str, "parameters": JSON schema dict}}]
    (description and parameters optional), every string in them valid UTF-8."""
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise RequestError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} objects, got "
                           f"{type(tools).__name__}", param="tools")
    for number, tool in enumerate(tools, 1):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not (isinstance(function, Mapping) and tool.get("type") == "function"
                and isinstance(function.get("name"), str) and function["name"]
                and isinstance(function.get("description", ""), str)
                and isinstance(function.get("parameters", {}), Mapping)):
            raise RequestError(f"tool {number} must be {{'type': 'function', 'function': {{'name': str, "
                               f"'description': str, 'parameters': {{JSON schema}}}}}}, got {tool!r}", param="tools")
        for text in _strings(tool):
            check_text(text, f"tool {number}", param="tools")


def _strings(value: Any) -> Sequence[str]:
    """Every string in a message (values of nested dicts and lists too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []
