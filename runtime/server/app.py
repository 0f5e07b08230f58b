"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (FastAPI and uvicorn: the `serve` extra).

POST /v1/chat/completions and /v1/completions (server-sent events with `stream`, else one JSON object),
GET /v1/models and /v1/models/{id}, GET /health and GET /metrics (Prometheus text). R1's thinking comes back as
`reasoning_content` beside `content`, as DeepSeek's API returns it. Errors are OpenAI-style JSON
(protocol.py's `error_body`) with a 4xx status for anything a client can cause. `drain()` ends the app's work
for a graceful shutdown (launch.py calls it on SIGTERM/SIGINT).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from moetrt.errors import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import GenerationOptions, StreamEvent
from moetrt.runtime.requests import RequestError, fit_new_tokens
from moetrt.runtime.scheduler import QueueFull, Scheduler, Ticket
from moetrt.runtime.server.limits import DEFAULT_LIMITS, ServerLimits
from moetrt.runtime.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    error_body,
    parse,
    refused,
)

log = logging.getLogger("moetrt.server")
access_log = logging.getLogger("moetrt.access")

SHUTTING_DOWN = "the server is shutting down; retry the request on another server"


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.kind, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def _route(path: str) -> str:
    """The metrics label of a path: a route's template, or "other"."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in ROUTES else "other"


# -- the app ----------------------------------------------------------------------------------------------


class _Gate:
    """ASGI middleware in front of every route: counts responses and writes the access log, checks the API key
    on /v1 routes before anything reads the body, and refuses bodies over `max_body_bytes` (buffering at most
    that much) or slower than `body_timeout`."""

    def __init__(self, app, service: _Service, metrics, api_key: str | None, limits: ServerLimits):
        self.app, self.service, self.metrics, self.limits = app, service, metrics, limits
        self.api_key = None if api_key is None else api_key.encode()

    async def drain(self, timeout: float, force: Callable[[], bool] = lambda: False) -> None:
        """Stop taking generation requests (503), give the running ones `timeout` seconds, then end the rest:
        streams with an error event and `[DONE]`, whole responses with a 503. `force()` true cuts the wait."""
        await self.service.drain(timeout, force)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 0
        state = scope.setdefault("state", {})  # per request: the route leaves its _Reply here for the log

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.count_response(_route(scope["path"]), status)
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                receive, refusal = await self._read_body(receive, scope)
            if refusal is not None:
                return await _error_response(refusal)(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        finally:
            _log_access(scope, status, state.get("reply"), time.perf_counter() - started)

    def _refusal(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            # RFC 6750: `Bearer` (any case), one space, the token exactly; a padded or quoted key is wrong.
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, self.api_key):
                return ApiError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body exceeds {self.limits.max_body_bytes} bytes (--max-body-bytes)",
                        code="request_too_large")

    async def _read_body(self, receive, scope):
        """Read the whole body (bounded in size and time), then replay it; later receives go to the client
        (disconnects)."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        chunks, size = [], 0
        while True:
            message = await self._receive_by(receive, deadline)
            if isinstance(message, ApiError):
                return receive, message
            if message["type"] != "http.request":
                return receive, ApiError(400, "the client went away")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body_bytes:
                return receive, self._too_large()
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay, None

    async def _receive_by(self, receive, deadline: float):
        """The next message, or a 408 once `deadline` (loop time) passed, or a 503 once a drain began (so a slow
        body cannot outlast the shutdown)."""
        loop = asyncio.get_running_loop()
        message = asyncio.ensure_future(receive())
        try:
            while True:
                done, _ = await asyncio.wait({message}, timeout=min(0.25, max(0.0, deadline - loop.time())))
                if done:
                    return message.result()
                if self.service.draining:
                    return ApiError(503, SHUTTING_DOWN, kind="server_error", code="server_shutting_down",
                                    headers={"Connection": "close"})
                if loop.time() >= deadline:
                    return ApiError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s "
                                    "(--body-timeout)", code="request_timeout", headers={"Connection": "close"})
        finally:
            message.cancel()  # a no-op once it is done


def _log_access(scope, status: int, reply: _Reply | None, seconds: float) -> None:
    """One line per request: client, request line, status, tokens and finish reason (generation routes), time.
    Health checks and metrics scrapes log at DEBUG, so probes do not drown the requests."""
    client = "%s:%d" % tuple(scope["client"]) if scope.get("client") else "-"
    tokens = (f" prompt_tokens={reply.prompt_tokens} completion_tokens={reply.tokens} "
              f"finish={reply.finish_reason or 'none'}") if reply is not None else ""
    level = logging.DEBUG if scope["path"] in ("/health", "/metrics") else logging.INFO
    access_log.log(level, '%s "%s %s" %d%s %.3fs', client, scope["method"], scope["path"], status, tokens, seconds)


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(engine: Engine, scheduler: Scheduler, *, model_name: str, api_key: str | None = None,
               limits: ServerLimits = DEFAULT_LIMITS) -> _Gate:
    """The ASGI app serving `engine` through `scheduler` (started and closed with the app's lifespan) as
    `model_name`; with `api_key`, /v1 routes need `Authorization: Bearer <api_key>`. Its `drain()` prepares a
    graceful shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="moetrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    service = _Service(engine, scheduler, model_name, limits.sse_keepalive)

    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, error: HTTPException):
        code = "not_found" if error.status_code == 404 else None
        return _error_response(ApiError(error.status_code, str(error.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, error: RequestValidationError):
        return _error_response(ApiError(400, str(error.errors()[0].get("msg", error))))

    @app.exception_handler(Exception)
    async def _bug(_request, error: Exception):
        log.exception("unhandled error")
        return _error_response(ApiError(500, f"internal error: {type(error).__name__}", kind="server_error"))

    @app.get("/health")
    async def health():
        status = "draining" if service.draining else "ok" if scheduler.running else "scheduler stopped"
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(scheduler.metrics.render(), media_type=scheduler.metrics.content_type)

    model = {"id": model_name, "object": "model", "created": created, "owned_by": "moetrt",
             "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse(ChatCompletionRequest, await request.body())
        prompt, in_reasoning = service.chat_prompt(body)
        return await service.respond(request, body, prompt, chat=True, in_reasoning=in_reasoning)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await request.body())
        return await service.respond(request, body, service.completion_prompt(body.prompt), chat=False)

    return _Gate(app, service, scheduler.metrics, api_key, limits)


class _Service:
    """Turns parsed requests into scheduler tickets and their events into OpenAI responses. The scheduler's
    `submit` runs the runtime's request validator; its refusals become 400s (`protocol.refused`)."""

    def __init__(self, engine: Engine, scheduler: Scheduler, model_name: str, sse_keepalive: float):
        self.engine, self.scheduler, self.model_name = engine, scheduler, model_name
        self.sse_keepalive = sse_keepalive
        self.mailbox: _Mailbox | None = None
        self.flights: weakref.WeakSet[_Flight] = weakref.WeakSet()  # a stream never started leaves none behind
        self.draining = False

    async def drain(self, timeout: float, force: Callable[[], bool]) -> None:
        """_Gate.drain. New generation requests get 503 from here on; `respond` checks before it submits."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        running = [flight for flight in self.flights if not flight.over.is_set()]
        if running:
            log.info("draining: %d requests running; they have %g s to finish (--shutdown-timeout)",
                     len(running), timeout)
        while running and loop.time() < deadline and not force():
            await asyncio.sleep(min(0.05, deadline - loop.time()))
            running = [flight for flight in running if not flight.over.is_set()]
        if running:
            log.warning("ending %d requests still running at shutdown", len(running))
        for flight in running:
            flight.end(ApiError(503, SHUTTING_DOWN, kind="server_error", code="server_shutting_down"))

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], bool]:
        """The conversation's token ids, and whether the template's generation prompt opened the thinking."""
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            return self.engine.chat_prompt(messages), self.engine.opens_thinking(messages)
        except RequestError as error:  # bad messages, or the template's raise_exception refused them
            raise refused(error, body) from None
        except MoetrtError as error:
            raise ApiError(400, str(error), param="messages") from None

    def completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        try:
            return self.engine.encode(prompt)
        except MoetrtError as error:
            raise ApiError(400, str(error), param="prompt") from None

    def options(self, body: GenerationRequest, prompt: list[int]) -> GenerationOptions:
        """The request's options. Without max_tokens, generation_config.json's max_new_tokens capped by the room the
        prompt leaves, else the whole room (OpenAI's and vLLM's convention); at least 1, so that a prompt that fills
        the context is refused as too long."""
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        requested = body.requested_tokens
        try:
            options = self.engine.options(max_new_tokens=requested, temperature=body.temperature, top_p=body.top_p,
                                          top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                                          seed=body.seed, stop=body.stop, stop_in_reasoning=body.stop_in_reasoning)
        except MoetrtError as error:
            raise ApiError(400, str(error)) from None
        if requested is None:
            default = fit_new_tokens(len(prompt), self.engine.max_context, self.engine.defaults.get("max_new_tokens"))
            options = dataclasses.replace(options, max_new_tokens=default)
        return options

    async def respond(self, request: Request, body: GenerationRequest, prompt: list[int], chat: bool,
                      in_reasoning: bool = False) -> Response:
        options = self.options(body, prompt)
        if self.draining:  # no await from here to registering the flight, so drain() sees every flight
            raise ApiError(503, SHUTTING_DOWN, kind="server_error", code="server_shutting_down",
                           headers={"Connection": "close"})
        self.mailbox = self.mailbox or _Mailbox(asyncio.get_running_loop())
        flight = _Flight()
        try:
            flight.ticket = self.scheduler.submit(prompt, options, functools.partial(self.mailbox.post, flight),
                                                  split_reasoning=chat, in_reasoning=in_reasoning)
        except QueueFull as error:
            raise ApiError(429, str(error), kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except RequestError as error:
            raise refused(error, body) from None
        except MoetrtError as error:
            raise ApiError(400, str(error)) from None
        reply = _Reply(self.model_name, chat, len(prompt), flight.ticket)
        request.state.reply = reply  # for the access log
        self.flights.add(flight)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(reply, flight, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for batch in _until_finished(flight.events, request):
                for event in batch:
                    reply.add(event)
        finally:
            self._land(flight)
        return JSONResponse(reply.whole())

    async def _stream(self, reply: _Reply, flight: _Flight, include_usage: bool) -> AsyncIterator[str]:
        try:
            if reply.chat:
                yield _sse(reply.chunk(None, role=True, usage=include_usage))
            async for batch in _until_finished(flight.events, None, self.sse_keepalive):
                if not batch:  # nothing for a while (queued): an SSE comment keeps proxies from timing out
                    yield ": keep-alive\n\n"
                    continue
                for event in batch:
                    reply.add(event)
                yield "".join(_sse(reply.chunk(event, usage=include_usage)) for event in batch
                              if event.reasoning or event.text or event.finish_reason)
            if include_usage:
                yield _sse({**reply.chunk(None, usage=True), "choices": [], "usage": reply.usage()})
        except ApiError as error:  # the status line is already sent: report in the stream, as OpenAI does
            yield _sse(error_body(error.message, error.kind, code=error.code))
        finally:
            self._land(flight)  # also when the client disconnected (Starlette cancels this generator)
        yield "data: [DONE]\n\n"  # after an error too, as vLLM ends its streams, so clients stop reading

    def _land(self, flight: _Flight) -> None:
        """The request's response is over: cancel its ticket (a no-op once finished; frees the slot if the
        client went away) and stop tracking it."""
        flight.ticket.cancel()
        flight.over.set()
        self.flights.discard(flight)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Flight:
    """One generation request in progress: its ticket, the queue its events arrive in (on the event loop),
    and `over`, set once its last event or error arrived or its response ended."""

    ticket: Ticket  # set as soon as submit() returns it; the scheduler may deliver before that

    def __init__(self):
        self.events: asyncio.Queue = asyncio.Queue()
        self.over = asyncio.Event()

    def deliver(self, item: StreamEvent | BaseException) -> None:
        self.events.put_nowait(item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.over.set()

    def end(self, error: ApiError) -> None:
        """Stop generating and end the response with `error`."""
        self.ticket.cancel()
        self.deliver(error)


class _Mailbox:
    """Hands events from the scheduler's thread to the event loop with one wake-up per batch of events (one
    per decode step) rather than one per token of every request."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[_Flight, Any]] = []

    def post(self, flight: _Flight, item) -> None:
        with self._lock:
            self._pending.append((flight, item))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for flight, item in pending:
            flight.deliver(item)


async def _until_finished(events: asyncio.Queue, request: Request | None,
                          keepalive: float | None = None) -> AsyncIterator[list[StreamEvent]]:
    """A ticket's events, in lists of those that arrived together, until its last; with `request`, stops as
    soon as the client disconnects. (Streamed responses leave that to Starlette, which cancels them.) With
    `keepalive`, an empty list after each `keepalive` seconds without events. An ApiError among the events
    (drain() ends a request with one) is raised as it is; an exception from the scheduler becomes a 500."""
    getter: asyncio.Future | None = None
    gone = asyncio.ensure_future(_disconnect(request)) if request is not None else None
    try:
        while True:
            getter = getter or asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter} | ({gone} if gone else set()), timeout=keepalive,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield []
                continue
            if getter not in done:
                return
            batch, getter = [getter.result()], None
            while not events.empty():
                batch.append(events.get_nowait())
            for item in batch:
                if isinstance(item, ApiError):
                    raise item
                if isinstance(item, BaseException):
                    raise ApiError(500, f"generation failed: {item}", kind="server_error")
            yield batch
            if batch[-1].finish_reason is not None:
                return
    finally:
        for task in (getter, gone):
            if task is not None:
                task.cancel()


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Reply:
    """Accumulates one request's events into OpenAI's chunk and whole-response objects. The whole response's
    text is exactly the concatenation of the streamed deltas, so streamed and not streamed agree."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, ticket: Ticket):
        self.model, self.chat, self.prompt_tokens, self.ticket = model, chat, prompt_tokens, ticket
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.reasoning: list[str] = []
        self.text: list[str] = []
        self.tokens = 0
        self.finish_reason: str | None = None

    def add(self, event: StreamEvent) -> None:
        self.reasoning.append(event.reasoning)
        self.text.append(event.text)
        self.tokens += len(event.token_ids)
        self.finish_reason = event.finish_reason or self.finish_reason

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                 "total_tokens": self.prompt_tokens + self.tokens}
        if self.chat:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.ticket.row.reasoning_tokens}
        return usage

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, event: StreamEvent | None, role: bool = False, usage: bool = False) -> dict[str, Any]:
        finish = event.finish_reason if event else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if event and event.reasoning:
                delta["reasoning_content"] = event.reasoning
            if event and event.text:
                delta["content"] = event.text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": event.text if event else "", "logprobs": None, "finish_reason": finish}
            out = {**self._head("text_completion"), "choices": [choice]}
        return {**out, "usage": None} if usage else out

    def whole(self) -> dict[str, Any]:
        text, reasoning = "".join(self.text), "".join(self.reasoning)
        if self.chat:
            message = {"role": "assistant", "content": text, "reasoning_content": reasoning or None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": self.usage()}
