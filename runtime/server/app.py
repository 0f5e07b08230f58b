"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (FastAPI and uvicorn: the `serve` extra).

POST /v1/chat/completions and /v1/completions (server-sent events with `stream`, else one JSON object; the fields
each takes and the response shapes are protocol.py's), GET /v1/models and /v1/models/{id}, GET /health and
GET /metrics (Prometheus text). R1's thinking comes back as `reasoning_content` (DeepSeek's name) and `reasoning`
(vLLM's) beside `content`; with `tools`, tool calls in the model's output come back as `tool_calls`
(runtime/tool_parsers.py). Errors are OpenAI-style JSON
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
from moetrt.runtime.reasoning import ThinkTags
from moetrt.runtime.requests import RequestError, fit_new_tokens
from moetrt.runtime.scheduler import QueueFull, Scheduler, Ticket
from moetrt.runtime.server.limits import DEFAULT_LIMITS, ServerLimits
from moetrt.runtime.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    Reply,
    TokenSpeller,
    error_body,
    parse,
    refused,
)
from moetrt.runtime.tool_parsers import DEFAULT_TOOL_PARSER, tool_parser

log = logging.getLogger("moetrt.server")
access_log = logging.getLogger("moetrt.access")

SHUTTING_DOWN = "the server is shutting down; retry the request on another server"
TOOL_PARSER = DEFAULT_TOOL_PARSER  # DeepSeek's tool-call format (V3, R1 and their updates, V3.1)


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
        state = scope.setdefault("state", {})  # per request: the route leaves its Reply here for the log

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


def _log_access(scope, status: int, reply: Reply | None, seconds: float) -> None:
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
        status = ("draining" if service.draining else service.unavailable() or
                  ("ok" if scheduler.running else "scheduler stopped"))
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
        prompt, in_reasoning = await asyncio.to_thread(service.chat_prompt, body)  # a long prompt takes seconds
        return await service.respond(request, body, prompt, chat=True, in_reasoning=in_reasoning)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await request.body())
        prompt = await asyncio.to_thread(service.completion_prompt, body.prompt)
        return await service.respond(request, body, prompt, chat=False, echo=service.echo(body, prompt))

    return _Gate(app, service, scheduler.metrics, api_key, limits)


class _Service:
    """Turns parsed requests into scheduler tickets and their events into OpenAI responses. The scheduler's
    `submit` runs the runtime's request validator; its refusals become 400s (`protocol.refused`)."""

    def __init__(self, engine: Engine, scheduler: Scheduler, model_name: str, sse_keepalive: float):
        self.engine, self.scheduler, self.model_name = engine, scheduler, model_name
        self.sse_keepalive = sse_keepalive
        self.speller = TokenSpeller(engine.tokenizer)
        self.mailbox: _Mailbox | None = None
        self.flights: weakref.WeakSet[_Flight] = weakref.WeakSet()  # a stream never started leaves none behind
        self.draining = False

    def unavailable(self) -> str | None:
        """Why the engine cannot take requests now (under expert parallelism: ranks that stopped answering,
        runtime/parallel), or None."""
        problem = getattr(self.engine.session, "problem", None)
        return problem() if problem is not None else None

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
        """The conversation's token ids (with the request's tools rendered by the template), and whether the
        template's generation prompt opened the thinking."""
        messages, tools = body.template_messages(), body.template_tools()
        try:
            return (self.engine.chat_prompt(messages, tools=tools),
                    self.engine.opens_thinking(messages, tools=tools))
        except RequestError as error:  # bad messages, or the template's raise_exception refused them
            raise refused(error, body) from None
        except MoetrtError as error:
            raise ApiError(400, str(error), param="messages") from None

    def echo(self, body: CompletionRequest, prompt: list[int]) -> str:
        """What `echo` puts before each choice's text: the prompt as sent, token ids decoded."""
        if not body.echo:
            return ""
        text = body.prompt[0] if isinstance(body.prompt, list) and body.prompt else body.prompt
        if isinstance(text, str):
            return text
        return self.engine.tokenizer.decode(prompt) if self.engine.tokenizer is not None else ""

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
        if body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if getattr(body, "reasoning_effort", None) is not None and (
                self.engine.tokenizer is None or ThinkTags.of(self.engine.tokenizer) is None):
            raise ApiError(400, "reasoning_effort needs a model that reasons (<think> and </think> tokens); this one "
                           "does not: leave it out", param="reasoning_effort")
        requested = body.requested_tokens
        try:
            options = self.engine.options(**body.generation_overrides())
        except RequestError as error:
            raise refused(error, body) from None
        except MoetrtError as error:
            raise ApiError(400, str(error)) from None
        if requested is None:
            default = fit_new_tokens(len(prompt), self.engine.max_context, self.engine.defaults.get("max_new_tokens"))
            options = dataclasses.replace(options, max_new_tokens=default)
        return options

    async def respond(self, request: Request, body: GenerationRequest, prompt: list[int], chat: bool,
                      in_reasoning: bool = False, echo: str = "") -> Response:
        """Submit the request and answer it: a stream of chunks or one whole response (Reply builds both).
        `echo`: the prompt text a completion's choices start with."""
        options = self.options(body, prompt)
        if self.draining:
            raise _shutting_down()
        trouble = self.unavailable()
        if trouble:
            raise ApiError(503, trouble, kind="server_error", code="engine_unavailable", headers={"Retry-After": "5"})
        self.mailbox = self.mailbox or _Mailbox(asyncio.get_running_loop())
        flight = _Flight(body.n)
        try:
            reply = Reply(self.model_name, chat, len(prompt), body.n, speller=self.speller,
                          top_logprobs=body.logprob_alternatives, echo=echo, reasoning_tokens=flight.reasoning_tokens,
                          tool_parser=self._tool_parser if chat and body.uses_tools else None)
            flight.ticket = await _submitted(functools.partial(
                self.scheduler.submit, prompt, options, functools.partial(self.mailbox.post, flight),
                split_reasoning=chat, in_reasoning=in_reasoning, n=body.n))
        except QueueFull as error:
            raise ApiError(429, str(error), kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except RequestError as error:
            raise refused(error, body) from None
        except MoetrtError as error:
            raise ApiError(400, str(error)) from None
        if self.draining:  # drain() began while submit ran, so it does not know this flight
            flight.ticket.cancel()
            raise _shutting_down()
        request.state.reply = reply  # for the access log
        self.flights.add(flight)  # no await since the check above, so drain() sees every flight
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(reply, flight, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for batch in _until_finished(flight, request):
                for event in batch:
                    reply.add(event)
        finally:
            self._land(flight)
        return JSONResponse(reply.whole())

    async def _stream(self, reply: Reply, flight: _Flight, include_usage: bool) -> AsyncIterator[str]:
        """The response's server-sent events: one chunk per choice per event with something to show (OpenAI
        streams `n` choices interleaved, each chunk naming its choice's index), then the usage if asked for."""
        usage = {"usage": None} if include_usage else {}
        try:
            for choice in reply.opening():
                yield _sse({**reply.head(chunk=True), "choices": [choice], **usage})
            async for batch in _until_finished(flight, None, self.sse_keepalive):
                if not batch:  # nothing for a while (queued): an SSE comment keeps proxies from timing out
                    yield ": keep-alive\n\n"
                    continue
                choices = [choice for choice in map(reply.add, batch) if choice is not None]
                yield "".join(_sse({**reply.head(chunk=True), "choices": [choice], **usage}) for choice in choices)
            if include_usage:
                yield _sse({**reply.head(chunk=True), "choices": [], "usage": reply.usage()})
        except ApiError as error:  # the status line is already sent: report in the stream, as OpenAI does
            yield _sse(error_body(error.message, error.kind, code=error.code))
        finally:
            self._land(flight)  # also when the client disconnected (Starlette cancels this generator)
        yield "data: [DONE]\n\n"  # after an error too, as vLLM ends its streams, so clients stop reading

    def _tool_parser(self):
        """A new tool-call parser for one choice; RequestError (param "tools") when the model has no tool-call
        tokens, before anything is submitted."""
        return tool_parser(TOOL_PARSER, self.engine.tokenizer)

    def _land(self, flight: _Flight) -> None:
        """The request's response is over: cancel its ticket (a no-op once finished; frees the slot if the
        client went away) and stop tracking it."""
        flight.ticket.cancel()
        flight.over.set()
        self.flights.discard(flight)


def _shutting_down() -> ApiError:
    return ApiError(503, SHUTTING_DOWN, kind="server_error", code="server_shutting_down",
                    headers={"Connection": "close"})


async def _submitted(submit: Callable[[], Ticket]) -> Ticket:
    """`submit()`'s ticket, submitted on a worker thread: the scheduler's submit (thread-safe) checks the request
    and builds its grammar constraint, seconds for a large json_schema, which would stall every stream on the event
    loop. If the caller is cancelled meanwhile, the ticket is cancelled once it exists, so nothing generates for
    nobody."""
    submitting = asyncio.ensure_future(asyncio.to_thread(submit))
    try:
        return await asyncio.shield(submitting)
    except asyncio.CancelledError:
        submitting.add_done_callback(_cancel_ticket)
        raise


def _cancel_ticket(submitting: asyncio.Future) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Flight:
    """One generation request in progress: its ticket (all `choices` of it), the queue its events arrive in (on
    the event loop), and `over`, set once every choice's last event or an error arrived or its response ended."""

    ticket: Ticket  # set as soon as submit() returns it; the scheduler may deliver before that

    def __init__(self, choices: int = 1):
        self.choices = choices
        self.events: asyncio.Queue = asyncio.Queue()
        self.over = asyncio.Event()
        self._running = choices

    def deliver(self, item: StreamEvent | BaseException) -> None:
        self.events.put_nowait(item)
        if not isinstance(item, BaseException) and item.finish_reason is not None:
            self._running -= 1
        if isinstance(item, BaseException) or self._running == 0:
            self.over.set()

    def reasoning_tokens(self) -> int:
        """Thinking tokens of all its choices so far."""
        return sum(row.reasoning_tokens for row in self.ticket.rows)

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


async def _until_finished(flight: _Flight, request: Request | None,
                          keepalive: float | None = None) -> AsyncIterator[list[StreamEvent]]:
    """A flight's events, in lists of those that arrived together, until the last of its last choice; with
    `request`, stops as soon as the client disconnects. (Streamed responses leave that to Starlette, which cancels
    them.) With `keepalive`, an empty list after each `keepalive` seconds without events. An ApiError among the events
    (drain() ends a request with one) is raised as it is; an exception from the scheduler becomes a 500."""
    events, running = flight.events, flight.choices
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
            running -= sum(event.finish_reason is not None for event in batch)
            if running == 0:
                return
    finally:
        for task in (getter, gone):
            if task is not None:
                task.cancel()


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
