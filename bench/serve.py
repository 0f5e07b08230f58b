"""`moetrt bench serve`: an online serving benchmark through the real OpenAI-compatible HTTP server, in the manner
of vLLM's benchmark_serving.

Streamed chat requests (short arithmetic questions, tiny-r1's task, with long prompts of a given token count mixed
in) go to a `moetrt serve ENGINE` process this command starts on a free loopback port, or to `--url`, at a Poisson
request rate and/or a fixed number in flight. Per request it measures the time to first token (TTFT), the gaps
between successive streamed chunks (inter-token latency, ITL) and the end-to-end latency; per run the request and
output-token throughput. It also splits the ITL gaps into those that overlap a long prompt's prefill window (from
that request's send to its first token, queueing included) and the rest, the figure chunked prefill is meant to
improve. `--compare 'label=serve flags' ...` runs several server configurations on the same workload in rounds
that alternate their order, and prints one markdown table per concurrency with each configuration's ratio to the
first (also written to `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve.md"
PERCENTILES = (50, 90, 99)
FILLER = "Keep the running total: {a} {op} {b}. "


# -- the workload -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: its chat messages, and whether it is one of the long prompts."""

    index: int
    messages: list[dict]
    long: bool


def arithmetic_question(rng: random.Random) -> str:
    """A question in tiny-r1's training format: `+` or `-`, operands up to 4 digits."""
    return f"What is {rng.randint(0, 9999)} {rng.choice('+-')} {rng.randint(0, 9999)}?"


def long_prompt_text(tokenizer, tokens: int, rng: random.Random) -> str:
    """A user message of about `tokens` tokens under `tokenizer` (a `tokenizers.Tokenizer`, special tokens not
    counted; the chat template adds its few): filler sentences cut to length, then a question."""
    question = arithmetic_question(rng)
    room = tokens - len(tokenizer.encode(question, add_special_tokens=False).ids)
    if room < 1:
        raise MoetrtError(f"--long-prompt-tokens {tokens} leaves no room for filler: use a larger value")
    filler, ids = "", []
    while len(ids) < room:
        filler += "".join(FILLER.format(a=rng.randint(0, 9999), op=rng.choice("+-"), b=rng.randint(0, 9999))
                          for _ in range(64))
        ids = tokenizer.encode(filler, add_special_tokens=False).ids
    return tokenizer.decode(ids[:room]) + question


def long_positions(count: int, fraction: float) -> set[int]:
    """The indices of the long prompts: round(count * fraction) of them spread evenly, none first (so each one
    arrives while short streams run): index i is long when floor((i + 1) * f) > floor(i * f)."""
    return {i for i in range(count) if math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)}


def make_workload(count: int, long_fraction: float, long_tokens: int, tokenizer, seed: int) -> list[BenchRequest]:
    """`count` requests, the same for a given seed. Raises MoetrtError when long prompts are asked for and there
    is no tokenizer to size them."""
    rng = random.Random(seed)
    longs = long_positions(count, long_fraction)
    if longs and tokenizer is None:
        raise MoetrtError("long prompts need a tokenizer to size them: pass --tokenizer DIR (a directory with "
                          "tokenizer.json, e.g. the engine) or --long-fraction 0")
    requests = []
    for i in range(count):
        text = long_prompt_text(tokenizer, long_tokens, rng) if i in longs else arithmetic_question(rng)
        requests.append(BenchRequest(i, [{"role": "user", "content": text}], i in longs))
    return requests


def load_tokenizer(directory: Path):
    """The `tokenizers.Tokenizer` in `directory`/tokenizer.json. Raises MoetrtError when it is missing."""
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise MoetrtError(f"no tokenizer.json in {directory}: pass --tokenizer DIR with one, or --long-fraction 0")
    return Tokenizer.from_file(str(path))


def arrival_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Send times in seconds from the start: a Poisson process of `rate` requests/s (exponential gaps, the first
    request at 0), or all at 0 when rate is infinite."""
    offsets, now = [], 0.0
    for i in range(count):
        if i and math.isfinite(rate):
            now += rng.expovariate(rate)
        offsets.append(now)
    return offsets


# -- measuring --------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are `time.perf_counter()` seconds: `sent` when the request was
    issued, `chunks` the arrival of every streamed chunk that carried answer or reasoning text, `end` when the
    stream ended. `output_tokens` is the usage's completion_tokens (the chunk count when the server sent none)."""

    long: bool
    sent: float
    chunks: list[float] = field(default_factory=list)
    end: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of every gap between successive chunks."""
        return list(zip(self.chunks, self.chunks[1:]))


@dataclass
class RunResult:
    """One workload run against one server: its records and the seconds from the first send to the last end."""

    records: list[RequestRecord]
    duration: float


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default, as
    vLLM's benchmark reports them). Raises ValueError for no values."""
    if not values:
        raise ValueError("no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(values: list[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean and the PERCENTILES of `values` times `scale`; None figures for no values."""
    out: dict[str, float | int | None] = {"count": len(values)}
    out["mean"] = float(np.mean(values)) * scale if values else None
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q) * scale if values else None
    return out


def prefill_windows(records: list[RequestRecord]) -> list[tuple[float, float]]:
    """(send, first token) of every long request: while its prompt waited and prefilled. A long request that got
    no token has its window to its end."""
    return [(r.sent, r.chunks[0] if r.chunks else r.end) for r in records if r.long]


def split_gaps(records: list[RequestRecord], windows: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Every inter-chunk gap's length, split into those that overlap some window (a gap (a, b) overlaps (s, f)
    when a < f and b > s) and the rest. A request's own window ends at its first chunk, so it never holds that
    request's gaps."""
    during, outside = [], []
    for record in records:
        for a, b in record.gaps():
            (during if any(a < f and b > s for s, f in windows) else outside).append(b - a)
    return during, outside


def report(runs: list[RunResult]) -> dict:
    """The figures of one configuration over its runs (pooled): counts, throughputs, and TTFT / ITL / E2E
    summaries in milliseconds, ITL split by long-prompt prefill windows (each run's own)."""
    records = [r for run in runs for r in run.records]
    done = [r for r in records if r.error is None]
    duration = sum(run.duration for run in runs)
    during: list[float] = []
    outside: list[float] = []
    for run in runs:
        ok = [r for r in run.records if r.error is None]
        d, o = split_gaps(ok, prefill_windows(run.records))
        during += d
        outside += o
    gaps = [b - a for r in done for a, b in r.gaps()]
    tokens = sum(r.output_tokens for r in done)
    ttfts = [r.ttft for r in done if r.ttft is not None]
    long_ttfts = [r.ttft for r in done if r.long and r.ttft is not None]
    prompt = {kind: [r.prompt_tokens for r in done if r.long == is_long and r.prompt_tokens is not None]
              for kind, is_long in (("short", False), ("long", True))}
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:3],
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else None,
        "output_throughput": tokens / duration if duration > 0 else None,
        "output_tokens": tokens,
        "prompt_tokens_short": float(np.mean(prompt["short"])) if prompt["short"] else None,
        "prompt_tokens_long": float(np.mean(prompt["long"])) if prompt["long"] else None,
        "ttft_ms": summarize(ttfts, 1e3),
        "ttft_long_ms": summarize(long_ttfts, 1e3),
        "itl_ms": summarize(gaps, 1e3),
        "itl_prefill_ms": summarize(during, 1e3),
        "itl_outside_ms": summarize(outside, 1e3),
        "e2e_ms": summarize([r.e2e for r in done], 1e3),
    }


# -- the client -------------------------------------------------------------------------------------------


def _httpx():
    try:
        import httpx
    except ImportError:
        raise MoetrtError("moetrt bench serve needs httpx, which the dev extra installs: "
                          "pip install 'moetrt[dev]'") from None
    return httpx


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def send_request(client, url: str, body: dict, long: bool) -> RequestRecord:
    """POST one streamed chat completion and time its chunks; failures (HTTP status, an error event, a broken
    connection) end up in `error`, never raised."""
    httpx = _httpx()
    record = RequestRecord(long=long, sent=time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
            elif not await _read_stream(response, record) and record.error is None:
                record.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as error:  # ValueError: an event that is not JSON
        record.error = f"{type(error).__name__}: {error}"
    record.end = time.perf_counter()
    if record.error is None and not record.output_tokens:
        record.output_tokens = len(record.chunks)
    return record


def _error_message(body: bytes) -> str:
    """The message of OpenAI's error body, else the start of the body."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")


async def _read_stream(response, record: RequestRecord) -> bool:
    """Time the stream's chunks into `record`; True once `[DONE]` arrived."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators and `: keep-alive` comments
        now = time.perf_counter()
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        event = json.loads(data)
        if "error" in event:
            record.error = f"stream error: {event['error'].get('message')}"
            continue
        if event.get("usage"):
            record.output_tokens = event["usage"].get("completion_tokens", 0)
            record.prompt_tokens = event["usage"].get("prompt_tokens")
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                record.chunks.append(now)
    return False


@dataclass(frozen=True)
class Sampling:
    """What every request asks for beyond its messages."""

    max_tokens: int
    temperature: float | None
    seed: int

    def body(self, model: str, request: BenchRequest) -> dict:
        body = {"model": model, "messages": request.messages, "max_tokens": self.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "seed": self.seed + request.index}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body


async def run_workload(url: str, api_key: str | None, model: str, requests: list[BenchRequest], sampling: Sampling,
                       offsets: list[float], max_concurrency: int | None) -> RunResult:
    """Send `requests` at `offsets` (seconds from now), at most `max_concurrency` in flight (None: no limit)."""
    httpx = _httpx()
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=30)
    async with httpx.AsyncClient(headers=_headers(api_key), limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def one(request: BenchRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with gate if gate else contextlib.nullcontext():
                return await send_request(client, url, sampling.body(model, request), request.long)

        records = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    return RunResult(list(records), max(r.end for r in records) - start)


async def _warm_up(url: str, api_key: str | None, model: str, requests: list[BenchRequest]) -> RunResult:
    """One short and one long request (if any), four tokens each, unmeasured: first calls allocate."""
    picks = [next((r for r in requests if r.long == kind), None) for kind in (False, True)]
    return await run_workload(url, api_key, model, [r for r in picks if r], Sampling(4, 0.0, 0), [0.0, 0.0], 1)


def check_accepted(result: RunResult) -> RunResult:
    """`result`, unless the server refused one of its requests as invalid (HTTP 400: a prompt plus max_tokens
    beyond the context, say), which no load explains: raises MoetrtError naming it. Busy answers (429, 503)
    stay in the report as failures."""
    refused = next((r.error for r in result.records if r.error and r.error.startswith("HTTP 400")), None)
    if refused:
        raise MoetrtError(f"the server refused a request: {refused}; change the workload "
                          "(--long-prompt-tokens, --max-tokens) to fit the engine")
    return result


def served_model(url: str, api_key: str | None) -> str:
    """The first model id /v1/models lists. Raises MoetrtError when the server cannot be reached or refuses."""
    httpx = _httpx()
    try:
        response = httpx.get(url + "/v1/models", headers=_headers(api_key), timeout=30)
    except httpx.HTTPError as error:
        raise MoetrtError(f"cannot reach {url} ({error}): check --url and that the server runs") from None
    if response.status_code != 200:
        raise MoetrtError(f"{url}/v1/models answered {response.status_code}: check --api-key")
    return response.json()["data"][0]["id"]


# -- the server -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`moetrt serve ENGINE FLAGS...` on a free 127.0.0.1 port for the duration of a `with` block (stopped with
    SIGINT, as a user would). Raises MoetrtError when it exits or is not healthy within `startup_timeout` s."""

    def __init__(self, engine: Path, flags: list[str], startup_timeout: float = 600.0):
        self.engine, self.flags, self.startup_timeout = engine, flags, startup_timeout
        self.url = ""
        self.process: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> ServeProcess:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="moetrt-bench-serve-", suffix=".log", delete=False)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # --log-level first so the configuration's own flags override it
        command = [sys.executable, "-m", "moetrt.cli", "serve", str(self.engine), "--port", str(port),
                   "--log-level", "warning", *self.flags]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_healthy(self) -> None:
        httpx = _httpx()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MoetrtError(f"`moetrt serve {shlex.join(self.flags)}` exited with {self.process.returncode}:"
                                  f" {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise MoetrtError(f"`moetrt serve` was not healthy after {self.startup_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        lines = Path(self._log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:]) or "(no output)"

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def __exit__(self, *exc) -> None:
        self.close()


# -- configurations, rounds and the report ----------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """A labelled set of `moetrt serve` flags (None: the server at --url, not started here)."""

    label: str
    flags: tuple[str, ...] | None


def parse_config(spec: str) -> ServeConfig:
    """'label=flags' (flags split as a shell would; may be empty). Raises MoetrtError without a label."""
    label, sep, flags = spec.partition("=")
    if not sep or not label.strip():
        raise MoetrtError(f"--compare {spec!r}: write 'label=serve flags', e.g. 'whole=--max-prefill-tokens 0'")
    return ServeConfig(label.strip(), tuple(shlex.split(flags)))


def bench(configs: list[ServeConfig], *, engine: Path | None, url: str | None, api_key: str | None,
          model: str | None, requests: list[BenchRequest], sampling: Sampling, rate: float,
          concurrencies: list[int | None], rounds: int, warmup: bool = True,
          startup_timeout: float = 600.0) -> dict[int | None, dict[str, dict]]:
    """Run the workload at every concurrency against every configuration, `rounds` times, the configurations'
    order reversed every other round; returns {concurrency: {label: report}}."""
    offsets = arrival_offsets(len(requests), rate, random.Random(sampling.seed))
    runs: dict[int | None, dict[str, list[RunResult]]] = {c: {k.label: [] for k in configs} for c in concurrencies}
    for round_ in range(rounds):
        for config in configs if round_ % 2 == 0 else configs[::-1]:
            with contextlib.ExitStack() as stack:
                target = url
                if config.flags is not None:
                    target = stack.enter_context(ServeProcess(engine, list(config.flags), startup_timeout)).url
                name = model or served_model(target, api_key)
                if warmup:
                    check_accepted(asyncio.run(_warm_up(target, api_key, name, requests)))
                for concurrency in concurrencies:
                    print(f"round {round_ + 1}/{rounds} {config.label} concurrency {concurrency or 'unlimited'}...",
                          file=sys.stderr, flush=True)
                    result = asyncio.run(run_workload(target, api_key, name, requests, sampling, offsets,
                                                      concurrency))
                    runs[concurrency][config.label].append(check_accepted(result))
    reports = {c: {label: report(results) for label, results in by_label.items()} for c, by_label in runs.items()}
    for by_label in reports.values():
        for label, figures in by_label.items():
            if not figures["completed"]:
                raise MoetrtError(f"no request to {label} completed: {'; '.join(figures['errors'])}")
    return reports


ROWS = (  # (title, key, sub-key or None, digits)
    ("completed requests", "completed", None, 0),
    ("failed requests", "failed", None, 0),
    ("request throughput (req/s)", "request_throughput", None, 2),
    ("output token throughput (tok/s)", "output_throughput", None, 1),
    ("mean prompt tokens, short / long", "prompt_tokens", None, 0),
    *((f"TTFT {s} (ms)", "ttft_ms", s, 2) for s in ("mean", "p50", "p90", "p99")),
    *((f"TTFT long prompts {s} (ms)", "ttft_long_ms", s, 2) for s in ("mean", "p50", "p99")),
    *((f"ITL {s} (ms)", "itl_ms", s, 2) for s in ("mean", "p50", "p90", "p99")),
    ("gaps during long prefill (count)", "itl_prefill_ms", "count", 0),
    *((f"ITL during long prefill {s} (ms)", "itl_prefill_ms", s, 2) for s in ("mean", "p50", "p90", "p99")),
    ("gaps outside long prefill (count)", "itl_outside_ms", "count", 0),
    *((f"ITL outside long prefill {s} (ms)", "itl_outside_ms", s, 2) for s in ("mean", "p50", "p90", "p99")),
    ("p99 ITL during / outside long prefill", "prefill_ratio", None, 2),
    *((f"E2E {s} (ms)", "e2e_ms", s, 2) for s in ("mean", "p50", "p90", "p99")),
)


def figure(figures: dict, key: str, sub: str | None) -> float | None:
    """One number of a report for ROWS (prefill_ratio derived; None when undefined)."""
    if key == "prefill_ratio":
        during, outside = figures["itl_prefill_ms"]["p99"], figures["itl_outside_ms"]["p99"]
        return during / outside if during is not None and outside else None
    value = figures[key] if sub is None else figures[key][sub]
    return value


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(by_label: dict[str, dict]) -> str:
    """One markdown table: a row per figure, a column per configuration, then each one's ratio to the first."""
    labels = list(by_label)
    head = ["figure", *labels, *(f"{b} / {labels[0]}" for b in labels[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, key, sub, digits in ROWS:
        if key == "prompt_tokens":
            cells = [f"{_cell(f['prompt_tokens_short'], 0)} / {_cell(f['prompt_tokens_long'], 0)}"
                     for f in by_label.values()]
            lines.append("| " + " | ".join([title, *cells, *([""] * (len(labels) - 1))]) + " |")
            continue
        values = [figure(f, key, sub) for f in by_label.values()]
        ratios = [f"{v / values[0]:.2f}x" if v is not None and values[0] else "n/a" for v in values[1:]]
        cells = [_cell(v, digits) for v in values]
        lines.append("| " + " | ".join([title, *cells, *ratios]) + " |")
    return "\n".join(lines)


def markdown(reports: dict[int | None, dict[str, dict]], configs: list[ServeConfig], settings: str) -> str:
    """The whole report: settings, the configurations, one table per concurrency, errors seen."""
    out = ["# moetrt bench serve", "", settings, ""]
    for config in configs:
        if config.flags is None:
            flags = "the server at --url"
        else:
            command = shlex.join(["moetrt", "serve", "ENGINE", *config.flags])
            flags = f"`{command}`" if config.flags else f"`{command}` (defaults)"
        out.append(f"- **{config.label}**: {flags}")
    for concurrency, by_label in reports.items():
        out += ["", f"## max concurrency {concurrency or 'unlimited'}", "", table(by_label)]
        for label, figures in by_label.items():
            if figures["errors"]:
                out.append(f"\n{label}: {figures['failed']} failed, e.g. {figures['errors'][0]}")
    return "\n".join(out) + "\n"


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("a rate above 0 (inf: all at once)")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("a fraction in [0, 1]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("an integer of at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moetrt bench serve", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("engine", nargs="?", type=Path, help="engine directory to serve (not with --url)")
    p.add_argument("--url", help="benchmark a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="Bearer key for --url")
    p.add_argument("--model", help="model id to request (default: the first /v1/models lists)")
    p.add_argument("--serve-flags", default="", help="flags for `moetrt serve` (one configuration)")
    p.add_argument("--compare", nargs="+", metavar="'LABEL=FLAGS'",
                   help="several server configurations side by side, the first the baseline of the ratios")
    p.add_argument("--rounds", type=_positive, default=2, help="runs per configuration, order alternating")
    p.add_argument("--num-prompts", type=_positive, default=64)
    p.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=_positive, nargs="+", default=None,
                   help="most requests in flight; several values run one after another")
    p.add_argument("--max-tokens", type=_positive, default=128)
    p.add_argument("--temperature", type=float, default=None, help="default: the engine's generation config")
    p.add_argument("--long-fraction", type=_fraction, default=0.125,
                   help="share of long prompts, spread evenly through the requests")
    p.add_argument("--long-prompt-tokens", type=_positive, default=320,
                   help="tokens of a long prompt's message (with --max-tokens, within the engine's context)")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json to size long prompts "
                   "(default: the engine's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up requests")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a started server has to be healthy")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report")
    return p


def describe(options: argparse.Namespace, requests: list[BenchRequest]) -> str:
    """The report's paragraph on when, where and what was measured."""
    rate = "inf (all at once)" if math.isinf(options.request_rate) else f"{options.request_rate:g}/s"
    temperature = "the engine's default" if options.temperature is None else options.temperature
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()} ({platform.machine()}, "
            f"{os.cpu_count()} CPUs). Target: {options.url or options.engine}. {len(requests)} streamed chat "
            f"requests per run ({sum(r.long for r in requests)} long of ~{options.long_prompt_tokens} tokens, spread "
            f"evenly), request rate {rate}, max_tokens {options.max_tokens}, temperature {temperature}, seed "
            f"{options.seed}; {options.rounds} round(s) per configuration, their order alternating, figures pooled "
            "over rounds. ITL: gaps between successive streamed chunks that carry text; 'during long prefill': the "
            "gaps that overlap a long request's window from its send to its first token.")


def main(argv: list[str] | None = None) -> dict[int | None, dict[str, dict]]:
    """`moetrt bench serve ARGS`: prints and writes the report; returns {concurrency: {label: figures}}. Raises
    MoetrtError for what the user can fix (no engine and no --url, both, a server that does not start)."""
    options = parser().parse_args(argv)
    if (options.engine is None) == (options.url is None):
        raise MoetrtError("moetrt bench serve needs an engine directory or --url (one of them)")
    if options.url and options.compare:
        raise MoetrtError("--compare starts its own servers: pass an engine directory instead of --url")
    if options.url:
        configs = [ServeConfig("server", None)]
    elif options.compare:
        configs = [parse_config(spec) for spec in options.compare]
        if len({c.label for c in configs}) != len(configs):
            raise MoetrtError("--compare labels must differ")
    else:
        configs = [ServeConfig("serve", tuple(shlex.split(options.serve_flags)))]
    tokenizer_dir = options.tokenizer or options.engine
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None and options.long_fraction else None
    requests = make_workload(options.num_prompts, options.long_fraction, options.long_prompt_tokens, tokenizer,
                             options.seed)
    sampling = Sampling(options.max_tokens, options.temperature, options.seed)
    concurrencies = options.max_concurrency or [None]
    reports = bench(configs, engine=options.engine, url=options.url.rstrip("/") if options.url else None,
                    api_key=options.api_key, model=options.model, requests=requests, sampling=sampling,
                    rate=options.request_rate, concurrencies=concurrencies, rounds=options.rounds,
                    warmup=not options.no_warmup, startup_timeout=options.startup_timeout)
    settings = describe(options, requests)
    text = markdown(reports, configs, settings)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(text)
    print(text)
    print(f"written to {options.out}", file=sys.stderr)
    return reports


if __name__ == "__main__":
    main()
