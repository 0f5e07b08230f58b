"""The OpenAI wire protocol the server speaks: strict request bodies and their mapping onto the runtime's generation
options, OpenAI's error body, and the response objects (choices, deltas, logprobs, tool calls, usage) assembled from
the scheduler's StreamEvents.

Request fields (OpenAI's chat and text completions APIs); any other field is a 400 naming it, never ignored:
- both: `model`, `max_tokens`, `temperature`, `top_p`, `n` (choice i samples with `seed + i` when a seed is given),
  `seed`, `stop`, `stream`, `stream_options.include_usage`, `presence_penalty`, `frequency_penalty`, `logit_bias`
  (token id strings -> bias), `response_format` (`text`, `json_object`, `json_schema`: grammar-constrained answer),
  `user` (accepted and unused: OpenAI's end-user id for abuse monitoring).
- chat: `messages` (system, developer as system, user, assistant with `content` or `tool_calls`, tool),
  `max_completion_tokens`, `logprobs` with `top_logprobs` (0-20), `tools` with `tool_choice` "auto" (the default
  with tools) or "none" (tools left out of the prompt, nothing parsed); "required" and a named function need forced
  decoding and get a 400, as does `parallel_tool_calls: false`; `reasoning_effort` (REASONING_BUDGETS; a 400 for a
  model that does not reason); `metadata` and `store: false` (nothing is stored; `store: true` gets a 400).
- completions: `prompt` (text, token ids, or a list holding one of them), `logprobs` (0-5), `echo`, `best_of` (only
  equal to `n`); `suffix` gets a 400 (no insertion).
- beyond OpenAI's, as vLLM and SGLang accept them: `top_k`, `repetition_penalty`, `stop_in_reasoning`.
Responses carry R1's thinking as `reasoning_content` (DeepSeek's name) and `reasoning` (vLLM's), the same text.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moetrt.runtime.requests import RequestError


class ApiError(Exception):
    """An error the server answers with `status` and OpenAI's error body; `headers` go with the response
    (Retry-After on 429, WWW-Authenticate on 401)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request bodies ---------------------------------------------------------------------------------------
# Strict: a wrong JSON type is an error rather than coerced ("1" is no number, 1.5 no integer); NaN and Infinity
# are no numbers either; a field the model does not declare is refused. Sampling fields take what other
# OpenAI-compatible servers take: top_k -1 or 0 is no top-k, top_p 0 the smallest nucleus (greedy), seed -1 a
# random seed.

# reasoning_effort -> the thinking budget in tokens (GenerationOptions.max_reasoning_tokens; None: no budget, the
# model thinks until it closes </think> or max_tokens ends the reply). Without the field there is no budget.
REASONING_BUDGETS: dict[str, int | None] = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": None}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's schema makes every optional field nullable, null meaning the default (`"n": null` is n 1):
        drop the nulls of optional fields. A required field or an unknown one stays, to be refused."""
        if not isinstance(data, dict):
            return data
        optional = {field.alias or name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in optional}


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("a json_schema object goes with type 'json_schema', and only with it")
        return self


Penalty = Annotated[float, Field(ge=-2, le=2)]


class GenerationRequest(Strict):
    """The fields chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # beyond OpenAI's fields, as vLLM and SGLang accept them
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=-1, lt=1 << 63)
    stop: str | list[str] | None = None
    stop_in_reasoning: bool = False  # stop strings end the answer; with this, the thinking too
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # OpenAI's limit; as a length bound on the list branch of the union, a fifth string was reported as
        # "stop.str: Input should be a valid string"
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stop)}")
        return stop

    @model_validator(mode="after")
    def _stream_options_with_stream(self):
        if self.stream_options is not None and not self.stream:  # OpenAI and vLLM refuse it too
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def requested_tokens(self) -> int | None:
        """The most tokens the client asked for, None when it left that to the server."""
        return self.max_tokens

    @property
    def prompt_param(self) -> str:
        """The body field holding the prompt, named in errors about it."""
        return "prompt"

    @property
    def logprob_alternatives(self) -> int | None:
        """Alternatives per token the reply reports with each token's logprob (GenerationOptions.logprobs); None:
        no logprobs."""
        return None

    def check_supported(self) -> None:
        """ApiError 400 naming a field whose value is valid OpenAI but which this server does not implement."""

    def generation_overrides(self) -> dict[str, Any]:
        """Keyword arguments for `Engine.options`, only those the body sets (None leaves the engine's default)."""
        overrides = dict(max_new_tokens=self.requested_tokens, temperature=self.temperature, top_p=self.top_p,
                         top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
                         stop=self.stop, stop_in_reasoning=self.stop_in_reasoning,
                         presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                         logit_bias=self.logit_bias, logprobs=self.logprob_alternatives)
        if self.response_format is not None and self.response_format.type != "text":
            overrides["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        return {name: value for name, value in overrides.items() if value is not None}


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    """One turn. The template receives it as a dict with the fields the body set (a `developer` turn as
    `system`, text parts joined)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns
    reasoning_content: str | None = None  # assistant turns of this server's replies, sent back as they came
    reasoning: str | None = None
    refusal: None = None

    @model_validator(mode="after")
    def _fields_of_the_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a message with role {self.role!r} needs a content (only an assistant message with "
                             "tool_calls may leave it null)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs the tool_call_id it answers, and only tool messages carry one")
        return self

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        message["role"] = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        elif self.content is None:
            message["content"] = None
        return message


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs_: int | None = Field(None, ge=0, le=20, alias="top_logprobs")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def prompt_param(self) -> str:
        return "messages"

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs_ or 0) if self.logprobs else None

    @property
    def uses_tools(self) -> bool:
        """Whether the prompt renders `tools` and the reply is parsed for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def check_supported(self) -> None:
        if self.top_logprobs_ is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice is not None and not self.tools:
            raise ApiError(400, "tool_choice needs tools to choose from", param="tool_choice")
        if self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice):
            raise ApiError(400, "tool_choice 'required' and a named function are not supported (they need forced "
                           "decoding): use 'auto' or 'none'", param="tool_choice")
        if self.parallel_tool_calls is False:
            raise ApiError(400, "parallel_tool_calls: false is not supported: the model may call several tools in "
                           "one turn; leave the field out", param="parallel_tool_calls")
        if self.store:
            raise ApiError(400, "this server does not store completions: leave store out or false", param="store")

    def generation_overrides(self) -> dict[str, Any]:
        overrides = super().generation_overrides()
        if self.reasoning_effort is not None and REASONING_BUDGETS[self.reasoning_effort] is not None:
            overrides["max_reasoning_tokens"] = REASONING_BUDGETS[self.reasoning_effort]
        return overrides

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.for_template() for message in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the template receives them (OpenAI's objects), None when it renders none."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.uses_tools else None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        if self.suffix:
            raise ApiError(400, "suffix (inserting text before a suffix) is not supported: leave it out",
                           param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, f"best_of must equal n ({self.n}): ranking extra candidates is not supported",
                           param="best_of")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo with logprobs (log-probabilities of the prompt's tokens) is not supported: "
                           "drop one of them", param="echo")


def parse(model: type[BaseModel], body: bytes):
    """The body as `model`; ApiError 400 naming the first offending field (or invalid_json), and for fields the
    server does not implement (`check_supported`)."""
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            reason = first["msg"].removeprefix("Invalid JSON: ")
            raise ApiError(400, f"the body is not valid JSON ({reason})", code="invalid_json") from None
        where = ".".join(str(part) for part in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {where!r}: this server does not support it (moetrt's README lists the "
                           "fields it takes); remove it", param=param, code="unknown_field") from None
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=param) from None
    parsed.check_supported()
    return parsed


def refused(error: RequestError, body: GenerationRequest) -> ApiError:
    """The 400 for a request the runtime's validator refused; a prompt error names the body's prompt field."""
    param = body.prompt_param if error.param == "prompt" else error.param
    return ApiError(400, str(error), param=param, code=error.code)


# -- responses --------------------------------------------------------------------------------------------


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, which DeepSeek's tokenizer uses): printable bytes stand for themselves,
    the others for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class TokenSpeller:
    """A token id's text and UTF-8 bytes, as OpenAI's logprobs report them: the text is what the token decodes to
    alone (U+FFFD for part of a character), the bytes are the token's own (with byte-level BPE, the bytes its
    vocabulary entry stands for, so consecutive tokens' bytes join into the characters they split)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        inner = getattr(tokenizer, "tokenizer", None)
        self._byte_level = type(getattr(inner, "decoder", None)).__name__ == "ByteLevel"
        self._table = _byte_level_table() if self._byte_level else {}
        self._spelled: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._spelled:
            self._spelled[token_id] = self._spell(token_id)
        return self._spelled[token_id]

    def _spell(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:  # an engine without a tokenizer: ids only, as vLLM spells them
            return f"token_id:{token_id}", []
        text = self.tokenizer.decode([token_id])
        piece = self.tokenizer.tokenizer.id_to_token(token_id) if self._byte_level else None
        if piece is not None and all(char in self._table for char in piece):
            return text, [self._table[char] for char in piece]
        return text, list(text.encode("utf-8"))


@dataclasses.dataclass
class _Choice:
    """One choice's accumulated output; the whole response's text is exactly its streamed deltas joined."""

    index: int
    tools: Any = None  # the tool-call parser while the request uses tools
    reasoning: list[str] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    logprobs: list[Any] = dataclasses.field(default_factory=list)  # generate.py TokenLogprob per token
    offset: int = 0  # characters of the token texts so far (completions' text_offset)
    tokens: int = 0
    finish_reason: str | None = None


class Reply:
    """One request's response, built from its StreamEvents (`event.row` is the choice index): `add` returns the
    streamed chunk's choice for an event, `whole` the complete response. Chat replies split the thinking into
    `reasoning_content` and `reasoning`; with `top_logprobs` (None: off) each token carries its logprob in OpenAI's
    chat or completions shape; `tool_parser()` (None: no tools) makes each choice's parser; `echo` is the prompt
    text a completion starts with; `reasoning_tokens()` counts the thinking tokens of all choices."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, n: int = 1, *, speller: TokenSpeller | None = None,
                 top_logprobs: int | None = None, tool_parser: Callable[[], Any] | None = None, echo: str = "",
                 reasoning_tokens: Callable[[], int] = lambda: 0):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.speller, self.top_logprobs, self.echo = speller, top_logprobs, echo
        self.reasoning_tokens = reasoning_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [_Choice(i, tool_parser() if tool_parser else None) for i in range(n)]

    @property
    def tokens(self) -> int:
        """Completion tokens of all choices."""
        return sum(choice.tokens for choice in self.choices)

    @property
    def finish_reason(self) -> str | None:
        """The first choice's finish reason (the access log's)."""
        return self.choices[0].finish_reason

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                                 "total_tokens": self.prompt_tokens + self.tokens}
        if self.chat:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens()}
        return usage

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def opening(self) -> list[dict[str, Any]]:
        """What the stream starts with, a chunk per choice: the assistant role (chat) or the echoed prompt
        (completions with `echo`)."""
        if self.chat:
            return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for c in self.choices]
        return [{"index": c.index, "text": self.echo, "logprobs": None, "finish_reason": None}
                for c in self.choices] if self.echo else []

    def add(self, event) -> dict[str, Any] | None:
        """Take one StreamEvent; returns its choice for a streamed chunk, None when it has nothing to show."""
        choice = self.choices[event.row]
        choice.tokens += len(event.token_ids)
        choice.reasoning.append(event.reasoning)
        text, calls = event.text, []
        if choice.tools is not None:
            text, calls = self._parse_tools(choice, event)
        choice.text.append(text)
        logprobs = list(event.logprobs or []) if self.top_logprobs is not None else []
        offset = len(self.echo) + choice.offset
        choice.offset += sum(len(self._spell(entry.token_id)[0]) for entry in logprobs)
        choice.logprobs.extend(logprobs)
        if event.finish_reason is not None:
            choice.finish_reason = ("tool_calls" if choice.tool_calls and event.finish_reason == "stop"
                                    else event.finish_reason)
        if not (event.reasoning or text or calls or logprobs or event.finish_reason):
            return None
        shown = self._logprobs(logprobs, offset) if logprobs else None
        if not self.chat:
            return {"index": choice.index, "text": text, "logprobs": shown, "finish_reason": choice.finish_reason}
        delta: dict[str, Any] = {}
        if event.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = event.reasoning
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        return {"index": choice.index, "delta": delta, "logprobs": shown, "finish_reason": choice.finish_reason}

    def _parse_tools(self, choice: _Choice, event) -> tuple[str, list[dict[str, Any]]]:
        """The answer text outside tool calls and the tool-call deltas this event completes; at the choice's end,
        whatever the parser held back (malformed calls come back as plain text)."""
        parsed = choice.tools.feed(list(event.token_ids), event.text) if not event.reasoning else None
        text = parsed.text if parsed is not None else event.text
        calls = list(parsed.tool_calls) if parsed is not None else []
        if event.finish_reason is not None:
            result = choice.tools.finish()
            text += result.text
            calls += result.tool_calls
            choice.tool_calls = list(result.complete)
        return text, calls

    def _spell(self, token_id: int) -> tuple[str, list[int]]:
        return self.speller(token_id) if self.speller is not None else (str(token_id), [])

    def _logprobs(self, entries: list, offset: int) -> dict[str, Any]:
        """Logprobs of `entries` (TokenLogprob) in OpenAI's chat or completions shape; `offset` is the first
        token's position in the choice's text (completions' text_offset)."""
        spell = self._spell
        if self.chat:
            def item(token: int, logprob: float) -> dict[str, Any]:
                text, raw = spell(token)
                return {"token": text, "logprob": logprob, "bytes": raw}

            return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                                for e in entries], "refusal": None}
        tokens = [spell(e.token_id)[0] for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        # OpenAI's legacy shape: the top alternatives and the sampled token, text -> logprob
        top = [{**{spell(t)[0]: lp for t, lp in e.top}, spell(e.token_id)[0]: e.logprob} for e in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}

    def whole(self) -> dict[str, Any]:
        """The complete response: every choice, in index order, and the usage."""
        choices = []
        for choice in self.choices:
            text, reasoning = "".join(choice.text), "".join(choice.reasoning)
            logprobs = self._logprobs(choice.logprobs, len(self.echo)) if self.top_logprobs is not None else None
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text or (None if choice.tool_calls else ""),
                                           "refusal": None, "reasoning_content": reasoning or None,
                                           "reasoning": reasoning or None}
                if choice.tool_calls:
                    message["tool_calls"] = choice.tool_calls
                choices.append({"index": choice.index, "message": message, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
            else:
                choices.append({"index": choice.index, "text": self.echo + text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        return {**self.head(chunk=False), "choices": choices, "usage": self.usage()}
