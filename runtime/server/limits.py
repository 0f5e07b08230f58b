"""What one client may hold or send, and how long the server waits: the `moetrt serve` options' single source of
defaults. Plain Python, so the command line can show them without the `serve` extra installed."""

from __future__ import annotations

import dataclasses

from moetrt.errors import MoetrtError

LOG_LEVELS = ("debug", "info", "warning", "error")  # `moetrt serve --log-level`


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Limits a server holds clients to. Sizes in bytes, times in seconds.

    max_queue: requests waiting for a batch slot; beyond that, 429 with Retry-After.
    max_body_bytes: largest request body; beyond that, 413.
    max_connections: open connections (and running requests) beyond which a new request gets 503 with
        Retry-After (launch.py's HeaderTimeoutH11Protocol holds it).
    header_timeout: time a connection has to send a whole request head, from its opening (or from the first
        byte of a later request on a kept-alive connection); then it is closed.
    body_timeout: time a client has to send the whole body once the head arrived; then 408 and the connection
        is closed.
    shutdown_timeout: on SIGTERM or SIGINT, time running requests get to finish before they end with an error
        event (streams) or a 503.
    sse_keepalive: seconds without events after which a stream gets a `: keep-alive` SSE comment (while it
        waits in the queue, say), so proxies with idle timeouts keep the connection.
    max_prefill_tokens: prompt tokens prefilled per decode step while requests run (chunked prefill, so a long
        prompt arriving never stalls the streams); 0 prefills whole prompts before the step; None: the
        scheduler's DEFAULT_PREFILL_BUDGET (runtime/scheduler.py, which needs the extra to import).
    """

    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    sse_keepalive: float = 5.0
    max_prefill_tokens: int | None = None

    def __post_init__(self):
        for name in ("max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise MoetrtError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_queue < 0:
            raise MoetrtError("--max-queue must be at least 0")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 0:
            raise MoetrtError("--max-prefill-tokens must be at least 0 (0 turns chunked prefill off)")
        for name in ("header_timeout", "body_timeout", "sse_keepalive"):
            if not getattr(self, name) > 0:
                raise MoetrtError(f"--{name.replace('_', '-')} must be more than 0 seconds")
        if not self.shutdown_timeout >= 0:
            raise MoetrtError("--shutdown-timeout must be at least 0 seconds")


DEFAULT_LIMITS = ServerLimits()
