"""Structured output: OpenAI's `response_format` (`json_object`, `json_schema`) as a per-token mask over the logits,
through llguidance (grammar-constrained decoding; bench/results/grammar_libs.md says why this library).

`check_response_format` refuses a bad or unsupported object before any compute; `constraint_for` gives a request
its `Constraint`, which RowState (runtime/generate.py) asks for the mask of each answer token and tells each token
chosen. The tokenizer side is compiled once per tokenizer, a schema's grammar once per schema text (both cached).

Conventions: the JSON is written with `", "` and `": "` between items and keys and no other whitespace (as
Python's `json.dumps` writes it), so a model cannot wander off into endless whitespace; `strict` is accepted either
way and the schema is always enforced. Schema keywords llguidance does not implement (`uniqueItems`, `not`,
`if`/`then`, ...) are refused, never ignored; formats are its list (date, date-time, email, uuid, ...).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.requests import RequestError

PARAM = "response_format"
FORMAT_TYPES = ("text", "json_object", "json_schema")
JSON_SCHEMA_FIELDS = ("name", "schema", "strict", "description")
# llguidance's JSON compile options: fixed separators, no free whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
GRAMMAR_CACHE_SIZE = 256


def check_response_format(fmt: Any) -> None:
    """Raise RequestError (param "response_format") unless `fmt` is None or an OpenAI response_format object this
    engine can enforce: `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    {"name": str, "schema": {...}, "strict": bool?, "description": str?}}` whose schema compiles (a valid JSON
    Schema using only the keywords llguidance implements)."""
    _schema_text(fmt)


def _schema_text(fmt: Any) -> str | None:
    """The schema `fmt` asks for as JSON text (the grammar cache's key; keys keep their order, which is the order
    the answer writes an object's properties in), None for text."""
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise RequestError(f"response_format must be an object such as {{'type': 'json_object'}}, got "
                           f"{type(fmt).__name__}", param=PARAM)
    kind = fmt.get("type")
    if kind not in FORMAT_TYPES:
        raise RequestError(f"response_format.type must be one of {', '.join(FORMAT_TYPES)}, got {kind!r}",
                           param=PARAM)
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(fmt) - allowed)
    if extra:
        raise RequestError(f"response_format of type {kind} takes no field {extra[0]!r}: remove it", param=PARAM)
    if kind == "text":
        return None
    schema = ANY_OBJECT if kind == "json_object" else _json_schema(fmt.get("json_schema"))
    try:
        text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise RequestError(f"response_format.json_schema.schema is not JSON ({error})", param=PARAM) from None
    error = _grammar(text)[1]
    if error:
        raise RequestError(f"response_format.json_schema.schema cannot be enforced: {_one_line(error)}; correct "
                           "the schema or leave out the keywords named", param=PARAM)
    return text


def _json_schema(spec: Any) -> Mapping[str, Any]:
    """The `schema` of a json_schema response_format's `json_schema` object, its other fields checked."""
    where = "response_format.json_schema"
    if not isinstance(spec, Mapping):
        raise RequestError(f"{where} must be an object {{'name': ..., 'schema': {{...}}, 'strict': true}}, got "
                           f"{'nothing' if spec is None else type(spec).__name__}", param=PARAM)
    extra = sorted(set(spec) - set(JSON_SCHEMA_FIELDS))
    if extra:
        raise RequestError(f"{where} has no field {extra[0]!r} (it takes {', '.join(JSON_SCHEMA_FIELDS)})",
                           param=PARAM)
    name = spec.get("name")
    if not (isinstance(name, str) and name and len(name) <= 64
            and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)):
        raise RequestError(f"{where}.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}", param=PARAM)
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise RequestError(f"{where}.strict must be true or false, got {spec['strict']!r}", param=PARAM)
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise RequestError(f"{where}.description must be a string", param=PARAM)
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise RequestError(f"{where}.schema must be a JSON Schema object, got "
                           f"{'nothing' if schema is None else type(schema).__name__}", param=PARAM)
    return schema


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _grammar(schema_text: str) -> tuple[str, str]:
    """(llguidance grammar, error message or "") for a schema's canonical JSON text; checked without a tokenizer."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema_text, defaults=JSON_OPTIONS)
    except ValueError as error:
        return "", str(error)
    return grammar, LLMatcher.validate_grammar(grammar)


class TokenizerGrammarInfo:
    """What llguidance needs of one tokenizer, built once (`grammar_info`): its LLTokenizer (the byte string of each
    token, for the mask), the token count `size` and `banned` `[size]` bool: the added tokens (chat markers,
    `<think>`, tool-call markers) other than the end-of-sequence ids, which never belong in a JSON answer."""

    def __init__(self, tokenizer, eos_ids: Sequence[int]):
        from llguidance import LLTokenizer

        self.eos_ids = tuple(int(t) for t in eos_ids)
        self.size = tokenizer.get_vocab_size(with_added_tokens=True)
        try:
            self.lltokenizer = LLTokenizer(tokenizer.to_str(), n_vocab=self.size, eos_token=list(self.eos_ids))
        except ValueError:  # a decoder llguidance does not read (e.g. Fuse): give it each token's bytes
            from llguidance import TokenizerWrapper

            self.lltokenizer = LLTokenizer(TokenizerWrapper(_TokenBytes(tokenizer, self.eos_ids, self.size)),
                                           n_vocab=self.size, eos_token=list(self.eos_ids))
        self.banned = np.zeros(self.size, dtype=bool)
        self.banned[[i for i in tokenizer.get_added_tokens_decoder() if i < self.size]] = True
        self.banned[[i for i in self.eos_ids if i < self.size]] = False
        self._prototypes: dict[str, Any] = {}
        self._lock = threading.Lock()  # the server checks formats in its handlers, the scheduler builds rows

    def matcher(self, schema_text: str):
        """A fresh llguidance matcher for the schema: a copy of one built once per schema text."""
        from llguidance import LLMatcher

        with self._lock:
            prototype = self._prototypes.pop(schema_text, None)  # re-inserted last: the dict keeps LRU order
            if prototype is None:
                prototype = LLMatcher(self.lltokenizer, _grammar(schema_text)[0], log_level=0)
                if prototype.is_error():
                    raise RequestError(f"response_format cannot be enforced with this tokenizer: "
                                       f"{_one_line(prototype.get_error())}", param=PARAM)
                if len(self._prototypes) >= GRAMMAR_CACHE_SIZE:
                    self._prototypes.pop(next(iter(self._prototypes)))
            self._prototypes[schema_text] = prototype
            return prototype.deep_copy()


class _TokenBytes:
    """llguidance's TokenizerWrapper input for a tokenizer whose decoder it cannot read: each token's bytes as its
    own decoded text (right for tokenizers whose tokens are whole characters)."""

    def __init__(self, tokenizer, eos_ids: tuple[int, ...], size: int):
        self._tokenizer = tokenizer
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = None
        self.tokens = [tokenizer.decode([i], skip_special_tokens=False).encode() for i in range(size)]
        self.special_token_ids = sorted(tokenizer.get_added_tokens_decoder())

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False).ids


@functools.lru_cache(maxsize=8)
def grammar_info(tokenizer, eos_ids: tuple[int, ...]) -> TokenizerGrammarInfo:
    """The cached TokenizerGrammarInfo of a `tokenizers.Tokenizer` with these end-of-sequence ids (about a second
    for DeepSeek's 129k-token vocabulary, the first time: a server may call it at start-up)."""
    return TokenizerGrammarInfo(tokenizer, eos_ids)


class Constraint:
    """One request's grammar state. `mask(logits)` returns a copy of logits `[vocab]` with every token the grammar
    does not allow next set to -inf (ids past the tokenizer's, the model's padding, always); `accept(token)`
    advances the grammar by the token chosen; `finished` is True once the answer is complete and only an
    end-of-sequence token may follow (or one has been accepted). Not thread-safe: one row, one thread at a time."""

    def __init__(self, matcher, info: TokenizerGrammarInfo, end_ids: Sequence[int] = ()):
        self._matcher, self._info = matcher, info
        self._end_ids = frozenset(info.eos_ids) | frozenset(int(t) for t in end_ids)
        self._end_list = sorted(t for t in self._end_ids if t < info.size)
        self._bitmask = np.zeros((info.size + 31) // 32, dtype=np.int32)
        self._ended = False

    @property
    def finished(self) -> bool:
        return self._ended or self._matcher.is_stopped()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        size = self._info.size
        if self._ended or self._matcher.is_error():
            allowed = np.zeros(size, dtype=bool)
        else:
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little", count=size).view(bool)
            allowed &= ~self._info.banned
        if self._ended or self._matcher.is_accepting():
            allowed[self._end_list] = True
        out = np.full_like(logits, -np.inf)
        head = min(size, logits.shape[-1])
        out[:head] = np.where(allowed[:head], logits[:head], -np.inf)
        return out

    def accept(self, token_id: int) -> None:
        """Advance by `token_id`. Raises MoetrtError for a token the last mask did not allow (a caller's bug)."""
        token_id = int(token_id)
        if token_id in self._end_ids:
            if not (self._ended or self._matcher.is_accepting()):
                raise MoetrtError(f"token {token_id} (end of sequence) was chosen before the response_format's "
                                  "JSON was complete: the constraint's mask was not applied")
            self._ended = True
            return
        if self._ended or not self._matcher.consume_token(token_id):
            raise MoetrtError(f"token {token_id} breaks the response_format's grammar: the constraint's mask was not "
                              f"applied ({_one_line(self._matcher.get_error()) or 'the answer had ended'})")


def constraint_for(response_format: Any, tokenizer, eos_ids: Sequence[int]) -> Constraint | None:
    """The Constraint for a request's `response_format` (the OpenAI object as received; checked as
    `check_response_format` does), None for none or `{"type": "text"}`. `tokenizer`: a ChatTokenizer
    (moetrt/tasks/chat.py) or a `tokenizers.Tokenizer`; `eos_ids`: the ids that end a sequence, allowed once the
    JSON is complete. Raises RequestError (param "response_format") for a bad object or an engine without a
    tokenizer."""
    schema_text = _schema_text(response_format)
    if schema_text is None:
        return None
    if tokenizer is None:
        raise RequestError("response_format needs an engine with a tokenizer; this one takes token ids only",
                           param=PARAM)
    if not eos_ids:
        raise RequestError("response_format needs an end-of-sequence token to end the JSON; this engine names none",
                           param=PARAM)
    info = tokenizer_grammar_info(tokenizer, eos_ids)
    return Constraint(info.matcher(schema_text), info, eos_ids)


def tokenizer_grammar_info(tokenizer, eos_ids: Sequence[int]) -> TokenizerGrammarInfo:
    """The cached grammar view of a ChatTokenizer or `tokenizers.Tokenizer` (a server builds it at start-up).
    llguidance reads its end-of-sequence ids as the end of the text, never as text: the tokenizer's own (a
    ChatTokenizer's eos_ids) are used for that when known, so a request's extra stop ids neither rebuild the cached
    tokenizer side nor leave the grammar; the ids a Constraint is given end the answer once the JSON is complete."""
    own = tuple(int(t) for t in getattr(tokenizer, "eos_ids", ()) or eos_ids)
    return grammar_info(getattr(tokenizer, "tokenizer", tokenizer), own)
