"""Serving metrics, kept by the scheduler and the HTTP server and rendered in Prometheus' text format.

Thread-safe: the scheduler thread and the server's event loop update it, `/metrics` reads it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Counters, gauges and the time-to-first-token histogram of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()  # by outcome
        self.http_responses: collections.Counter[tuple[str, int]] = collections.Counter()  # by (route, status)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.decode_rows = 0  # rows summed over decode steps: / decode_steps = mean batch occupancy
        self.cache_resizes = 0
        self.cache_compactions = 0
        self.batch_rows = 0
        self.batch_width = 0
        self.batch_capacity = 0
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.queue_depth: Callable[[], int] = lambda: 0

    def count_request(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def count_response(self, route: str, status: int) -> None:
        with self._lock:
            self.http_responses[(route, status)] += 1

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)
            self.prompt_tokens += prompt_tokens

    def tokens(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += count
            self._recent.append((now, count))
            self._forget(now)

    def decode_step(self, rows: int) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds."""
        with self._lock:
            self._forget(time.monotonic())
            return sum(count for _, count in self._recent) / RATE_WINDOW_S

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        rate = self.tokens_per_second()
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
                lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                             for labels, value in samples)

            metric("moetrt_requests_total", "counter", "Generation requests by outcome.",
                   [(f'{{outcome="{k}"}}', v) for k, v in sorted(self.requests.items())])
            metric("moetrt_http_responses_total", "counter", "HTTP responses by route and status.",
                   [(f'{{route="{r}",status="{s}"}}', v) for (r, s), v in sorted(self.http_responses.items())])
            metric("moetrt_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", self.prompt_tokens)])
            metric("moetrt_generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("moetrt_tokens_per_second", "gauge", f"Tokens generated per second over the last "
                   f"{RATE_WINDOW_S:g} s.", [("", float(rate))])
            metric("moetrt_queue_depth", "gauge", "Requests waiting for a batch slot.", [("", self.queue_depth())])
            metric("moetrt_batch_rows", "gauge", "Requests in the running batch.",
                   [("", self.batch_rows)])
            metric("moetrt_batch_width", "gauge", "Cache slots each decode step runs over (rows and the holes "
                   "between them).", [("", self.batch_width)])
            metric("moetrt_batch_capacity", "gauge", "Most requests decoded together (--max-batch).",
                   [("", self.batch_capacity)])
            metric("moetrt_decode_steps_total", "counter", "Batched decode steps.", [("", self.decode_steps)])
            metric("moetrt_decode_rows_total", "counter", "Requests summed over decode steps (batch occupancy is "
                   "its rate over moetrt_decode_steps_total's).", [("", self.decode_rows)])
            metric("moetrt_cache_resizes_total", "counter", "Cache re-packs because the batch width changed.",
                   [("", self.cache_resizes)])
            metric("moetrt_cache_compactions_total", "counter", "Cache compactions (rows moved left).",
                   [("", self.cache_compactions)])
            ttft = self.time_to_first_token
            name = "moetrt_time_to_first_token_seconds"
            lines.extend([f"# HELP {name} From request arrival to its first generated token.",
                          f"# TYPE {name} histogram"])
            lines.extend(f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(ttft.buckets, ttft.counts))
            lines.extend([f'{name}_bucket{{le="+Inf"}} {ttft.count}', f"{name}_sum {ttft.total:g}",
                          f"{name}_count {ttft.count}"])
        return "\n".join(lines) + "\n"
