"""The OpenAI wire protocol the server speaks: request bodies (strict pydantic models), the error body, and
parsing a body into a model with OpenAI-style errors (`ApiError`: status, message, param, code)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
# are no numbers either. Sampling fields take what other OpenAI-compatible servers take: top_k -1 or 0 is no top-k,
# top_p 0 the smallest nucleus (greedy), seed -1 a random seed.


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # beyond OpenAI's fields, as vLLM and SGLang accept them
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-1, lt=1 << 63)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stop_in_reasoning: bool = False  # stop strings end the answer; with this, the thinking too
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None

    @property
    def requested_tokens(self) -> int | None:
        """The most tokens the client asked for, None when it left that to the server."""
        return self.max_tokens

    @property
    def prompt_param(self) -> str:
        """The body field holding the prompt, named in errors about it."""
        return "prompt"


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def prompt_param(self) -> str:
        return "messages"


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]


def parse(model: type[BaseModel], body: bytes):
    """The body as `model`; ApiError 400 naming the first offending field (or invalid_json)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            reason = first["msg"].removeprefix("Invalid JSON: ")
            raise ApiError(400, f"the body is not valid JSON ({reason})", code="invalid_json") from None
        where = ".".join(str(part) for part in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=param) from None


def refused(error: RequestError, body: GenerationRequest) -> ApiError:
    """The 400 for a request the runtime's validator refused; a prompt error names the body's prompt field."""
    param = body.prompt_param if error.param == "prompt" else error.param
    return ApiError(400, str(error), param=param, code=error.code)
