"""Serving metrics on `prometheus_client`: the scheduler and the HTTP server record into a `Metrics`, and
`/metrics` renders it in Prometheus' text format (`render`, served with `CONTENT_TYPE`).

Each `Metrics` owns its own CollectorRegistry (with the process, platform and garbage-collector collectors), so
two servers in one process never collide on names. prometheus_client is thread-safe: the scheduler thread and
the server's event loop record, `/metrics` reads. Token throughput is `rate()` over the token counters.

Histogram buckets, in seconds, cover both a tiny model on CPU (steps of a millisecond) and a DeepSeek-R1-class
model on GPUs (decode steps of 10-100 ms, prefills of seconds, reasoning answers of many minutes). They are
roughly 1-2.5-5 per decade, finer where serving targets usually sit (inter-token latency 10-100 ms, time to first
token 0.1-1 s) and reaching an hour for end-to-end latency, where a long chain of thought ends.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)

# The classic text format (0.0.4) that `generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

QUEUE_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                      300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
                300.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                       2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
               3600.0)


def _count(metric: Counter, **labels: str) -> int:
    """A counter's value (a labelled counter's child with exactly these labels), 0 if never incremented."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return int(sample.value)
    return 0


class _Reading:
    """A read-only int attribute that reads a counter of the `Metrics` (for tests and benchmarks)."""

    def __init__(self, counter: str):
        self.counter = counter

    def __get__(self, metrics: Metrics, owner=None) -> int:
        return _count(getattr(metrics, self.counter))


class Metrics:
    """The metrics of one server: request outcomes, HTTP responses, token counters, batch gauges and the
    latency histograms (queue time, time to first token, inter-token latency, end-to-end latency)."""

    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self._requests = Counter("moetrt_requests_total", "Generation requests by outcome (a finish reason, "
                                 "cancelled, failed or rejected).", ["outcome"], registry=r)
        self._responses = Counter("moetrt_http_responses_total", "HTTP responses by route and status.",
                                  ["route", "status"], registry=r)
        self._prompt_tokens = Counter("moetrt_prompt_tokens_total", "Prompt tokens prefilled.", registry=r)
        self._generated_tokens = Counter("moetrt_generated_tokens_total", "Tokens generated.", registry=r)
        self._decode_steps = Counter("moetrt_decode_steps_total", "Batched decode steps.", registry=r)
        self._decode_rows = Counter("moetrt_decode_rows_total", "Requests summed over decode steps (batch "
                                    "occupancy is its rate over moetrt_decode_steps_total's).", registry=r)
        self._cache_resizes = Counter("moetrt_cache_resizes_total", "Cache re-packs because the batch width "
                                      "changed.", registry=r)
        self._cache_compactions = Counter("moetrt_cache_compactions_total", "Cache compactions (rows moved left).",
                                          registry=r)
        self._draft_tokens = Counter("moetrt_spec_decode_draft_tokens_total", "Draft tokens the MTP module "
                                     "proposed and the main model verified (--speculative mtp).", registry=r)
        self._accepted_tokens = Counter("moetrt_spec_decode_accepted_tokens_total", "Draft tokens accepted "
                                        "(the acceptance rate is their rate over the draft tokens').", registry=r)
        self._queue_depth = Gauge("moetrt_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self._batch_rows = Gauge("moetrt_batch_rows", "Requests in the running batch.", registry=r)
        self._batch_width = Gauge("moetrt_batch_width", "Cache slots each decode step runs over (rows and the "
                                  "holes between them).", registry=r)
        self._batch_capacity = Gauge("moetrt_batch_capacity", "Most requests decoded together (--max-batch).",
                                     registry=r)
        self._queue_time = Histogram("moetrt_request_queue_time_seconds", "From request arrival to the start of "
                                     "its prefill.", buckets=QUEUE_TIME_BUCKETS, registry=r)
        self._ttft = Histogram("moetrt_time_to_first_token_seconds", "From request arrival to its first "
                               "generated token.", buckets=TTFT_BUCKETS, registry=r)
        self._inter_token = Histogram("moetrt_inter_token_latency_seconds", "Between a request's consecutive "
                                      "generated tokens (one observation per token after the first).",
                                      buckets=INTER_TOKEN_BUCKETS, registry=r)
        self._e2e = Histogram("moetrt_e2e_request_latency_seconds", "From request arrival to its last token, for "
                              "requests that ran to a finish reason (stop or length).", buckets=E2E_BUCKETS,
                              registry=r)

    # -- recording (any thread) ---------------------------------------------------------------------------

    def follow_scheduler(self, max_batch: int, queue_depth: Callable[[], int]) -> None:
        """Report `max_batch` as the batch capacity and `queue_depth()` (read at each scrape) as the queue depth."""
        self._batch_capacity.set(max_batch)
        self._queue_depth.set_function(queue_depth)

    def count_request(self, outcome: str) -> None:
        """A request that ended without running to a finish reason: cancelled, failed or rejected."""
        self._requests.labels(outcome=outcome).inc()

    def count_response(self, route: str, status: int) -> None:
        self._responses.labels(route=route, status=str(status)).inc()

    def queued(self, seconds: float) -> None:
        """A request left the queue `seconds` after it arrived; its prefill starts."""
        self._queue_time.observe(seconds)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        """A request's prompt was prefilled and its first token generated, `seconds` after it arrived."""
        self._ttft.observe(seconds)
        self._prompt_tokens.inc(prompt_tokens)
        self._generated_tokens.inc()

    def next_tokens(self, gaps: Iterable[float]) -> None:
        """One more token for each of some requests; `gaps`: seconds since each one's previous token."""
        count = 0
        for gap in gaps:
            self._inter_token.observe(gap)
            count += 1
        self._generated_tokens.inc(count)

    def finished(self, reason: str, seconds: float) -> None:
        """A request ran to its finish reason (stop or length) `seconds` after it arrived."""
        self._requests.labels(outcome=reason).inc()
        self._e2e.observe(seconds)

    def decode_step(self, rows: int) -> None:
        self._decode_steps.inc()
        self._decode_rows.inc(rows)

    def batch(self, rows: int, width: int) -> None:
        """The running batch now holds `rows` requests over `width` cache slots."""
        self._batch_rows.set(rows)
        self._batch_width.set(width)

    def cache_resized(self) -> None:
        self._cache_resizes.inc()

    def cache_compacted(self) -> None:
        self._cache_compactions.inc()

    def drafts(self, proposed: int, accepted: int) -> None:
        """A speculative step verified `proposed` draft tokens and accepted `accepted` of them."""
        self._draft_tokens.inc(proposed)
        self._accepted_tokens.inc(accepted)

    # -- reading ------------------------------------------------------------------------------------------

    prompt_tokens = _Reading("_prompt_tokens")
    generated_tokens = _Reading("_generated_tokens")
    decode_steps = _Reading("_decode_steps")
    decode_rows = _Reading("_decode_rows")
    cache_resizes = _Reading("_cache_resizes")
    cache_compactions = _Reading("_cache_compactions")
    draft_tokens = _Reading("_draft_tokens")
    accepted_tokens = _Reading("_accepted_tokens")

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests so far by outcome."""
        return collections.Counter({sample.labels["outcome"]: int(sample.value)
                                    for family in self._requests.collect() for sample in family.samples
                                    if sample.name.endswith("_total")})

    def render(self) -> str:
        """Every metric of the registry in Prometheus' text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode()
