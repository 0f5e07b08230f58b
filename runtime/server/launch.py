"""`moetrt serve`: bind the port, load the engine, run the app under uvicorn with the slow-client limits and one
log format, and shut down gracefully on SIGTERM or SIGINT (app.py's `drain`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import functools
import ipaddress
import json
import logging
import signal
import socket
import sys
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from moetrt.errors import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.runtime.scheduler import DEFAULT_PREFILL_BUDGET, Scheduler
from moetrt.runtime.server.app import create_app
from moetrt.runtime.server.limits import DEFAULT_LIMITS, LOG_LEVELS, ServerLimits
from moetrt.runtime.server.protocol import error_body

log = logging.getLogger("moetrt.server")

# After drain() has ended every request, what uvicorn waits for responses still being written before it
# cancels them (a client that stopped reading, say).
WRITE_GRACE_SECONDS = 5


def serve(engine_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int | None = None, threads: int | None = None, model_name: str | None = None,
          limits: ServerLimits = DEFAULT_LIMITS, log_level: str = "info", expert_parallel=None,
          speculative: str | None = None) -> None:
    """Load an engine and serve it until SIGTERM or SIGINT, then drain (ServerLimits.shutdown_timeout) and
    return. max_batch defaults to the engine's built max_batch; model_name to the engine directory's name.
    `expert_parallel`: Engine.load's (call it on rank 0: the CLI's `--expert-parallel` has the other ranks serve
    rank 0's steps before this). `speculative` "mtp": decode with the engine's MTP module drafting (an engine
    built with --mtp; runtime/scheduler.py). Raises MoetrtError for a bad option (a blank model name or API key), a port out of
    range or in use, or a server that did not start."""
    _configure_logging(log_level)
    if not 0 <= port <= 65535:
        raise MoetrtError(f"--port must lie in [0, 65535], got {port}")
    if model_name is not None and not model_name.strip():
        raise MoetrtError("--served-model-name is blank: give the model's id, or leave the option out to use the "
                          "engine directory's name")
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise MoetrtError("--api-key (or MOETRT_API_KEY) is blank or has spaces around it, so no client could send "
                          "it: give the key itself, or leave the option out to serve without one")
    listener = bind(host, port)  # before loading: a busy port fails at once, not after minutes of loading
    try:
        engine = Engine.load(engine_dir, threads=threads, expert_parallel=expert_parallel)
        built = engine.manifest.profile.max_batch
        max_batch = built if max_batch is None else max_batch
        if not 1 <= max_batch <= built:
            raise MoetrtError(f"--max-batch must lie in [1, {built}] (the engine was built for {built}; rebuild "
                              "with a larger --max-batch)")
        budget = DEFAULT_PREFILL_BUDGET if limits.max_prefill_tokens is None else limits.max_prefill_tokens or None
        scheduler = Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context,
                              max_batch=max_batch, max_queue=limits.max_queue, prefill_budget=budget,
                              speculative=speculative)
        _prepare_structured_output(engine)
        name = model_name or Path(engine_dir).resolve().name
        app = create_app(engine, scheduler, model_name=name, api_key=api_key, limits=limits)
        log.info("serving %s (%s, batch %d, queue %d, prefill %s tokens per step%s) from %s", name,
                 engine.manifest.backend, max_batch, limits.max_queue, budget or "all",
                 ", MTP speculative decoding" if speculative else "", engine_dir)
        config = _Config(app, header_timeout=limits.header_timeout, max_connections=limits.max_connections,
                         http=HeaderTimeoutH11Protocol, log_config=None, log_level=log_level, access_log=False,
                         lifespan="on", timeout_graceful_shutdown=WRITE_GRACE_SECONDS)
        server = _Server(config, drain=app.drain, shutdown_timeout=limits.shutdown_timeout,
                         warning=exposure_warning(listener.getsockname()[0], api_key),
                         listening_level=logging.WARNING if port == 0 else logging.INFO)
        server.run(sockets=[listener])
    finally:
        listener.close()
    if not server.started:
        raise MoetrtError("the server did not start (see the log above)")
    log.info("stopped")


def _prepare_structured_output(engine: Engine) -> None:
    """Build the grammar library's view of the tokenizer now (about a second for DeepSeek's 129k vocabulary):
    the first request with a `response_format` would otherwise pay it on the event loop, stalling every stream."""
    tokenizer = engine.tokenizer
    if tokenizer is None or not engine.eos_ids:
        return
    from moetrt.runtime import structured

    structured.tokenizer_grammar_info(tokenizer, engine.eos_ids)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not yet listening) to `host`:`port`; MoetrtError when the port is taken or the
    address is not this machine's."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise MoetrtError(f"cannot resolve --host {host!r}: {error.strerror}") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts despite TIME_WAIT; not a busy port
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise MoetrtError(f"port {port} is in use on {host}: stop the other server or choose another --port") \
                from None
        raise MoetrtError(f"cannot bind {host}:{port}: {error.strerror}") from None
    return listener


def exposure_warning(address: str, api_key: str | None) -> str | None:
    """The warning for a server bound to `address` (an IP address) without an API key, when other machines
    can reach it (any address but loopback); else None."""
    if api_key is not None or ipaddress.ip_address(address.split("%")[0]).is_loopback:
        return None
    return (f"listening on {address}, which other machines can reach, without an API key: anyone who can "
            "connect can generate; set --api-key (or MOETRT_API_KEY) or bind to 127.0.0.1")


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head: a connection that has not sent a whole head
    `config.header_timeout` seconds after it opened (or after the first byte of a later request on a kept-alive
    connection) is closed. uvicorn times out only idle kept-alive connections, so a client sending half a head,
    or nothing, would hold its connection forever.

    It also holds `config.max_connections` in place of uvicorn's `limit_concurrency`, whose check counts the
    connection asking (N admits N-1, 1 refuses everything) and answers in plain text: a request on a connection
    beyond the limit gets a 503 in OpenAI's error shape with Retry-After, and the connection is closed."""

    config: _Config
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, config: _Config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.app = functools.partial(self._within_limit, self.app)

    async def _within_limit(self, app, scope, receive, send) -> None:
        # Both sets include this connection and this request's task by the time the task runs.
        limit = self.config.max_connections
        if scope["type"] != "http" or (len(self.connections) <= limit and len(self.tasks) <= limit):
            return await app(scope, receive, send)
        log.warning("refusing a request from %s: %d connections open (--max-connections %d)",
                    "%s:%d" % tuple(self.client) if self.client else "-", len(self.connections), limit)
        body = json.dumps(error_body(f"the server has {limit} connections open (--max-connections); retry later",
                                     kind="server_error", code="too_many_connections")).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a head
            if self._head_timer is None:
                self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.config.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection from %s: no request head within %g s (--header-timeout)",
                      self.client, self.config.header_timeout)
            self.transport.close()


class _Config(uvicorn.Config):
    """uvicorn's config and the head deadline and connection limit HeaderTimeoutH11Protocol reads."""

    def __init__(self, app, *, header_timeout: float, max_connections: int, **options):
        super().__init__(app, **options)
        self.header_timeout, self.max_connections = header_timeout, max_connections


class _Server(uvicorn.Server):
    """uvicorn's server that says where it listens once it does (at `listening_level`: WARNING for a port the
    system chose, so that --log-level warning still tells it), stops listening and drains the app on the first
    SIGTERM or SIGINT (a second SIGINT cuts the drain), and exits normally: uvicorn re-raises the signal once it
    has stopped, which SIGTERM's default action turns into death by signal."""

    def __init__(self, config: _Config, *, drain, shutdown_timeout: float, warning: str | None,
                 listening_level: int = logging.INFO):
        super().__init__(config)
        self.drain, self.shutdown_timeout, self.warning = drain, shutdown_timeout, warning
        self.listening_level = listening_level

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            for listener in sockets or []:
                host, port = listener.getsockname()[:2]
                log.log(self.listening_level, "listening on http://%s:%d/v1", f"[{host}]" if ":" in host else host,
                        port)
            if self.warning:
                log.warning(self.warning)

    async def shutdown(self, sockets=None) -> None:
        log.info("shutting down: no new connections; new requests on open ones get 503")
        for server in getattr(self, "servers", []):
            server.close()
        await self.drain(self.shutdown_timeout, lambda: self.force_exit)
        await super().shutdown(sockets=sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown after a second SIGINT; the lifespan task would then be cancelled
            # at exit (a CancelledError traceback in the log) and the scheduler never closed. Closing it takes
            # one decode step at most, since drain() has ended every request.
            await self.lifespan.shutdown()

    @contextlib.contextmanager
    def capture_signals(self):
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _IsoFormatter(logging.Formatter):
    def formatTime(self, record, datefmt=None) -> str:
        return datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def _configure_logging(level: str) -> None:
    """One format, ISO 8601 timestamps with the UTC offset, on stderr, for moetrt's loggers and uvicorn's."""
    if level.lower() not in LOG_LEVELS:
        raise MoetrtError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("moetrt", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
