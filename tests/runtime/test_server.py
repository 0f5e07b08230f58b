"""`moetrt serve` as a real process on a free loopback port, driven by the official `openai` client: chat and
completions streamed and not, models, 64 concurrent streams against one-at-a-time, bad requests, 429 and
disconnects."""

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moetrt.runtime.engine import Engine

API_KEY = "test-key"
MAX_BODY = 65536


@dataclass
class Server:
    url: str
    model: str
    process: subprocess.Popen
    log_path: Path | None = None

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def post(self, path: str, body, headers=None, timeout: float = 60) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        lines = httpx.get(self.url + "/metrics", timeout=10).text.splitlines()
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines if line[:1] != "#")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(engine_dir, log_path, *options) -> Server:
    port = free_port()
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moetrt.cli", "serve", str(engine_dir), "--port", str(port), "--api-key", API_KEY,
         "--max-body-bytes", str(MAX_BODY), *options], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{open(log_path).read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Server(url, engine_dir.name, process, Path(log_path))
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    pytest.fail(f"the server did not come up:\n{open(log_path).read()}")


def stop_server(server: Server, log_path) -> None:
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 0, open(log_path).read()


@contextlib.contextmanager
def serving(engine_dir, tmp_path_factory, max_batch: int, max_queue: int, *options: str):
    """A `moetrt serve` process (with more `options`) for the duration of the block; it must exit 0 on SIGINT."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server(engine_dir, log_path, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
                           *options)
    yield running
    stop_server(running, log_path)


@pytest.fixture(scope="module")
def server(chat_engine_dir, tmp_path_factory):
    with serving(chat_engine_dir, tmp_path_factory, max_batch=16, max_queue=56) as running:
        yield running


@pytest.fixture(scope="module")
def engine(chat_engine_dir):
    return Engine.load(chat_engine_dir)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def read_chat_stream(chunks) -> tuple[str, str, str | None, object]:
    reasoning, content, finish, usage = [], [], None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(content), finish, usage


def test_models_lists_the_served_engine(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [server.model]


# The first thinks, answers and ends (EOS); the second is still thinking at max_tokens.
@pytest.mark.parametrize("question", ["What is 100-7?", "What is 4+28?"])
def test_streamed_chat_equals_not_streamed_and_the_engine(server, engine, question):
    client = server.client()
    request = dict(model=server.model, messages=user(question), temperature=0, max_tokens=64)
    whole = client.chat.completions.create(**request)
    streamed = read_chat_stream(client.chat.completions.create(**request, stream=True,
                                                               stream_options={"include_usage": True}))
    message = whole.choices[0].message
    reasoning = getattr(message, "reasoning_content", None) or ""
    assert streamed[:3] == (reasoning, message.content, whole.choices[0].finish_reason)
    assert streamed[3].completion_tokens == whole.usage.completion_tokens
    reasoning_tokens = whole.usage.completion_tokens_details.reasoning_tokens
    assert streamed[3].completion_tokens_details.reasoning_tokens == reasoning_tokens > 0
    want = engine.chat(user(question), max_new_tokens=64, greedy=True)
    assert (reasoning.strip(), message.content.rstrip()) == (want.reasoning, want.text)
    assert whole.usage.completion_tokens == want.completion_tokens
    assert whole.usage.prompt_tokens == want.prompt_tokens


def test_max_completion_tokens_and_stop_strings(server, engine):
    client = server.client()
    question = "What is 100-7?"
    want = engine.chat(user(question), max_new_tokens=64, greedy=True)
    stop = want.text[1:3]
    assert want.text and stop not in want.reasoning + "</think>"
    got = client.chat.completions.create(model=server.model, messages=user(question), temperature=0,
                                         max_completion_tokens=64, stop=stop)
    assert got.choices[0].message.content == want.text[: want.text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=server.model, messages=user(question), temperature=0,
                                           max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_completions_streamed_equals_not_streamed_and_keep_raw_text(server, engine):
    client = server.client()
    request = dict(model=server.model, prompt="12+7=", temperature=0, max_tokens=40)
    whole = client.completions.create(**request)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**request, stream=True))
    assert streamed == whole.choices[0].text
    want = engine.generate("12+7=", max_new_tokens=40, greedy=True)
    tokens = want.token_ids[:-1] if want.finish_reason == "stop" else want.token_ids
    assert whole.choices[0].text == engine.tokenizer.decode(tokens)  # <think> tags stay in a raw completion
    assert whole.usage.completion_tokens == len(want.token_ids)
    ids = client.completions.create(**{**request, "prompt": engine.encode("12+7=")})
    assert ids.choices[0].text == whole.choices[0].text


LOAD_REQUESTS = 64


def test_64_concurrent_streams_equal_their_single_request_outputs(server, engine):
    """Each prompt one at a time, then all 64 at once, through the same server: identical outputs, and the
    aggregate tokens per second of both (printed; `pytest -s` shows it)."""
    requests = [(f"What is {i * 37 % 1000}+{i * i % 97}?" + " please" * (i % 5), 16 + (i * 7) % 48)
                for i in range(LOAD_REQUESTS)]
    client = server.async_client()

    async def one(question, max_tokens):
        stream = await client.chat.completions.create(model=server.model, messages=user(question), temperature=0,
                                                      max_tokens=max_tokens, stream=True,
                                                      stream_options={"include_usage": True})
        return read_chat_stream([chunk async for chunk in stream])

    async def side_by_side():
        start = time.perf_counter()
        single = [await one(*request) for request in requests]
        middle, before = time.perf_counter(), await asyncio.to_thread(server.metrics)
        batched = await asyncio.gather(*(one(*request) for request in requests))
        return single, batched, middle - start, time.perf_counter() - middle, before

    single, batched, single_s, batched_s, before = asyncio.run(side_by_side())
    after = server.metrics()

    assert [r[:3] for r in batched] == [r[:3] for r in single]
    for (question, max_tokens), (reasoning, content, finish, usage) in zip(requests, batched):
        want = engine.chat(user(question), max_new_tokens=max_tokens, greedy=True)
        assert (reasoning.strip(), content.rstrip(), finish) == (want.reasoning, want.text, want.finish_reason)
        assert usage.completion_tokens == want.completion_tokens
    tokens = sum(r[3].completion_tokens for r in batched)
    assert tokens == sum(r[3].completion_tokens for r in single)
    steps = after["moetrt_decode_steps_total"] - before["moetrt_decode_steps_total"]
    rows = after["moetrt_decode_rows_total"] - before["moetrt_decode_rows_total"]
    print(f"\n{LOAD_REQUESTS} streams, {tokens} tokens each run: one at a time {tokens / single_s:.0f} tokens/s "
          f"({single_s:.2f} s), all at once {tokens / batched_s:.0f} tokens/s ({batched_s:.2f} s), "
          f"{single_s / batched_s:.1f}x; all at once: {steps:.0f} decode steps, {rows / steps:.1f} requests/step")
    assert batched_s < single_s  # typically 2-4x faster; the margin is left to the printout on a busy machine
    assert after['moetrt_requests_total{outcome="length"}'] + after['moetrt_requests_total{outcome="stop"}'] >= 128
    assert after["moetrt_queue_depth"] == 0


BAD_REQUESTS = [
    # (what, path, body, status, param, code)
    ("malformed JSON", "/v1/chat/completions", b'{"model": "m", "messages": [', 400, None, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("max_tokens a string", "/v1/chat/completions", {"max_tokens": "5"}, 400, "max_tokens", None),
    ("messages a string", "/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("a message without role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", None),
    ("stream a string", "/v1/chat/completions", {"stream": "yes"}, 400, "stream", None),
    ("temperature a string", "/v1/chat/completions", {"temperature": "hot"}, 400, "temperature", None),
    ("stop a number", "/v1/chat/completions", {"stop": 3}, 400, "stop", None),
    ("prompt over the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "7" * 1100}]},
     400, "messages", "context_length_exceeded"),
    ("max_tokens over the context", "/v1/chat/completions", {"max_tokens": 1020}, 400, "messages",
     "context_length_exceeded"),
    ("temperature over 2", "/v1/chat/completions", {"temperature": 2.5}, 400, "temperature", None),
    ("negative temperature", "/v1/chat/completions", {"temperature": -0.1}, 400, "temperature", None),
    ("negative top_p", "/v1/chat/completions", {"top_p": -0.1}, 400, "top_p", None),
    ("top_p over 1", "/v1/chat/completions", {"top_p": 1.5}, 400, "top_p", None),
    ("max_tokens 0", "/v1/chat/completions", {"max_tokens": 0}, 400, "max_tokens", None),
    ("seed below -1", "/v1/chat/completions", {"seed": -2}, 400, "seed", None),
    ("five stop strings", "/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("stream_options without stream", "/v1/chat/completions", {"stream_options": {"include_usage": True}}, 400, None,
     None),
    ("an unknown field", "/v1/chat/completions", {"n_choices": 2}, 400, "n_choices", "unknown_field"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9"}, 404, "model", "model_not_found"),
    ("completion prompt a number", "/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("completion token id out of vocab", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", None),
    ("two completion prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("completion over the context", "/v1/completions", {"prompt": "1" * 1030}, 400, "prompt",
     "context_length_exceeded"),
    ("body over the limit", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_BODY}]},
     413, None, "request_too_large"),
]


@pytest.mark.parametrize("what, path, body, status, param, code", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, what, path, body, status, param, code):
    if isinstance(body, dict):
        base = {"model": server.model, "max_tokens": 4}
        base.update({"messages": user("hi")} if path.endswith("chat/completions") else {"prompt": "1+1="})
        body = {**base, **body}
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error
    if what == "five stop strings":  # was "stop.str: Input should be a valid string", from the union's other branch
        assert "at most 4 stop sequences, got 5" in error["message"], error
    good = {"model": server.model, "max_tokens": 2,
            **({"messages": user("hi")} if path.endswith("chat/completions") else {"prompt": "1"})}
    assert server.post(path, good).status_code == 200  # and the server goes on answering


def test_a_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 4096 + 1):
            yield b"x" * 4096
        yield b'"}]}'

    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_wrong_or_missing_key_gets_401_on_every_v1_route(server):
    for key in ("wrong", None):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "unused", max_retries=0,
                               default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as raised:
            client.models.list()
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=server.model, messages=user("hi"), max_tokens=2)
    assert server.post("/v1/completions", b"{not json", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # health stays open


def test_unknown_routes_get_openai_errors(server):
    response = httpx.get(server.url + "/v1/engines", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    wrong_method = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


def test_metrics_are_prometheus_text(server):
    response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    kinds = {family.name: family.type for family in text_string_to_metric_families(response.text)}
    for name, kind in [("moetrt_requests", "counter"), ("moetrt_prompt_tokens", "counter"),
                       ("moetrt_generated_tokens", "counter"), ("moetrt_decode_rows", "counter"),
                       ("moetrt_queue_depth", "gauge"), ("moetrt_batch_rows", "gauge"),
                       ("moetrt_e2e_request_latency_seconds", "histogram"),
                       ("moetrt_time_to_first_token_seconds", "histogram"),
                       ("moetrt_inter_token_latency_seconds", "histogram"),
                       ("moetrt_request_queue_time_seconds", "histogram"),
                       ("process_resident_memory_bytes", "gauge")]:
        assert kinds.get(name) == kind, name


def test_a_streamed_request_lands_in_the_latency_histograms_and_token_counters(server):
    """TTFT and queue time once, inter-token latency once per token after the first (as vLLM counts it),
    end-to-end once; the token counters rise by the usage the response reported."""
    before = server.metrics()
    stream = server.client().chat.completions.create(
        model=server.model, messages=user("What is 4+28?"), temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    usage = read_chat_stream(stream)[3]
    e2e = "moetrt_e2e_request_latency_seconds_count"
    deadline = time.monotonic() + 10  # the scheduler records the end just after it hands over the last event
    while (after := server.metrics())[e2e] == before[e2e]:
        assert time.monotonic() < deadline, after
        time.sleep(0.005)
    rose = {name: after[name] - before[name] for name in after if name in before}
    assert usage.completion_tokens > 1
    assert rose["moetrt_time_to_first_token_seconds_count"] == rose["moetrt_request_queue_time_seconds_count"] == 1
    assert rose["moetrt_inter_token_latency_seconds_count"] == usage.completion_tokens - 1
    assert rose["moetrt_generated_tokens_total"] == usage.completion_tokens
    assert rose["moetrt_prompt_tokens_total"] == usage.prompt_tokens
    assert rose[e2e] == 1


def wait_for(server: Server, metric: str, value: float, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while server.metrics().get(metric, 0) != value:
        assert time.monotonic() < deadline, (metric, server.metrics())
        time.sleep(0.005)


@pytest.fixture(scope="module")
def one_slot_server(chat_engine_dir, tmp_path_factory):
    """One slot and one queue place, so a third concurrent request is refused deterministically."""
    with serving(chat_engine_dir, tmp_path_factory, max_batch=1, max_queue=1) as running:
        yield running


def test_a_full_queue_gets_429_and_disconnects_free_their_slots(one_slot_server):
    server = one_slot_server
    client = server.client()
    # The fixture model's greedy continuation of "RRRR" never meets EOS: 1000 tokens, hundreds of milliseconds.
    long = dict(model=server.model, prompt="RRRR", temperature=0, max_tokens=1000, stream=True)
    running = client.completions.create(**long)
    next(iter(running))
    queued = client.completions.create(**long)
    with pytest.raises(openai.RateLimitError) as raised:
        client.completions.create(**long)
    assert raised.value.status_code == 429 and raised.value.code == "queue_full"

    running.close()  # disconnect: the slot goes to the queued request, which starts streaming
    next(iter(queued))
    queued.close()
    wait_for(server, 'moetrt_requests_total{outcome="cancelled"}', 2)
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as raw:  # not streamed
        body = json.dumps({**long, "stream": False}).encode()
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + API_KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(server, "moetrt_batch_rows", 1)
    wait_for(server, 'moetrt_requests_total{outcome="cancelled"}', 3)  # closed while running, not finished
    metrics = server.metrics()
    assert metrics["moetrt_batch_rows"] == 0 and metrics["moetrt_queue_depth"] == 0
    assert metrics['moetrt_requests_total{outcome="rejected"}'] == 1
    answer = client.completions.create(**{**long, "stream": False, "max_tokens": 5})
    assert answer.usage.completion_tokens == 5


def test_the_server_and_scheduler_import_no_torch():
    code = "import sys, moetrt.runtime.server.launch, moetrt.runtime.scheduler; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
