"""`moetrt serve` in production (issue 17), as a real process on loopback: slow clients are cut off and a
connection limit holds, the API key is exact `Bearer <key>`, a graceful drain on SIGTERM, operator logs,
`--served-model-name`, GET /v1/models/{id}, Retry-After, WWW-Authenticate and SSE keep-alive comments."""

import concurrent.futures
import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from moetrt.errors import MoetrtError
from moetrt.runtime.server import ServerLimits, exposure_warning, serve
from tests.runtime.test_server import API_KEY, free_port, serving, start_server

SERVED_NAME = "r1-served"
TIMEOUT = 4  # --header-timeout and --body-timeout of the module's server
MAX_CONNECTIONS = 64
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The fixture model's greedy continuation of "RRRR" never meets EOS: 1000 tokens, hundreds of milliseconds.
LONG = {"prompt": "RRRR", "temperature": 0, "max_tokens": 1000, "stream": True}
ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) \S+: ")


@pytest.fixture(scope="module")
def server(chat_engine_dir, tmp_path_factory):
    """One slot, one queue place, small read timeouts and connection limit, a keep-alive comment every 20 ms."""
    options = ["--served-model-name", SERVED_NAME,
               "--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT),
               "--max-connections", str(MAX_CONNECTIONS), "--sse-keepalive", "0.02"]
    with serving(chat_engine_dir, tmp_path_factory, 1, 1, *options) as running:
        yield dataclasses.replace(running, model=SERVED_NAME)


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw_request(server, head: bytes, body: bytes = b"") -> socket.socket:
    """A connection that has sent `head` (and `body`) and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=30)
    sock.sendall(head + body)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (socket.timeout if it does not within 30 s)."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data


def completion_head(length: int, path: bytes = b"/v1/completions") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + API_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)


def small_completion(server) -> httpx.Response:
    body = {"model": server.model, "prompt": "1+1=", "max_tokens": 2}
    return httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)


def test_stalled_clients_are_closed_and_the_connection_limit_holds(server):
    """Half a head or half a body and then nothing: such connections are closed (408 for the body), a normal
    request goes through meanwhile, and beyond --max-connections open connections a request gets 503."""
    body = json.dumps({"model": server.model, "prompt": "1+1=", "max_tokens": 2}).encode()
    half_heads = [raw_request(server, completion_head(len(body))[:40]) for _ in range(25)]
    half_bodies = [raw_request(server, completion_head(len(body)), body[: len(body) // 2]) for _ in range(25)]
    assert small_completion(server).status_code == 200  # 51 connections: under the limit
    more = [raw_request(server, completion_head(len(body))[:40]) for _ in range(30)]
    refused = small_completion(server)  # 81 connections
    assert refused.status_code == 503, refused.text

    for sock in half_heads + more:
        assert read_to_eof(sock) == b""  # closed without an answer: no head, no request
    for sock in half_bodies:
        answer = read_to_eof(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert small_completion(server).status_code == 200


# (Spaces around the whole value are no part of it in HTTP: h11 strips them, as RFC 9110 says.)
@pytest.mark.parametrize("header", [f"Bearer  {API_KEY}", f"Bearer {API_KEY}  x", f"Bearer\t{API_KEY}",
                                    f'Bearer "{API_KEY}"', API_KEY, f"Basic {API_KEY}", "Bearer"])
def test_only_an_exact_bearer_key_is_accepted(server, header):
    response = httpx.get(server.url + "/v1/models", headers={"Authorization": header}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    for scheme in ("Bearer", "bearer"):  # RFC 7235: the scheme is case-insensitive
        ok = httpx.get(server.url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=30)
        assert ok.status_code == 200


def test_the_served_model_name_is_listed_and_looked_up(server):
    listed = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert [model["id"] for model in listed] == [SERVED_NAME]
    one = httpx.get(server.url + f"/v1/models/{SERVED_NAME}", headers=AUTH, timeout=30)
    assert one.status_code == 200 and one.json() == listed[0]
    other = httpx.get(server.url + "/v1/models/deepseek-ai/DeepSeek-R1", headers=AUTH, timeout=30)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/models/x", timeout=30).status_code == 401
    assert small_completion(server).json()["model"] == SERVED_NAME


def stream_lines(server, body: dict, first_data: threading.Event | None = None,
                 submitted: threading.Event | None = None) -> list[str]:
    """The non-empty SSE lines of a streamed completion, to its end. `submitted` is set once the response has
    begun (the request is in the scheduler), `first_data` once its first chunk arrived."""
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": server.model, **body}, headers=AUTH,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        if submitted is not None:
            submitted.set()
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if line.startswith("data: {") and first_data is not None:
                first_data.set()
    return lines


def test_a_full_queue_gets_retry_after_and_a_queued_stream_keep_alive_comments(server):
    running, waiting = threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(stream_lines, server, LONG, running)
        assert running.wait(30)
        queued = pool.submit(stream_lines, server, LONG, None, waiting)
        assert waiting.wait(30)
        third = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                           json={"model": server.model, **LONG, "stream": False, "max_tokens": 5})
        assert third.status_code == 429 and third.headers["Retry-After"] == "1", third.text
        assert third.json()["error"]["code"] == "queue_full"
        first_lines, queued_lines = first.result(), queued.result()
    assert first_lines[-1] == queued_lines[-1] == "data: [DONE]"
    before_tokens = queued_lines[: next(i for i, line in enumerate(queued_lines) if line.startswith("data: {"))]
    assert ": keep-alive" in before_tokens  # it waited in the queue behind 1000 tokens
    texts = ["".join(json.loads(line[6:])["choices"][0]["text"] for line in lines if line.startswith("data: {"))
             for lines in (first_lines, queued_lines)]
    assert texts[0] == texts[1]  # the comments change nothing else


def test_logs_have_iso_timestamps_an_access_line_per_request_and_listening_after_bind(server):
    small_completion(server)
    log = server.log_path.read_text().splitlines()
    assert log and all(ISO_LINE.match(line) for line in log), log
    listening = [i for i, line in enumerate(log) if f"listening on {server.url}/v1" in line]
    startup = [i for i, line in enumerate(log) if "Application startup complete" in line]
    assert len(listening) == 1 and startup and startup[0] < listening[0]
    access = [line for line in log if '"POST /v1/completions" 200 prompt_tokens=' in line]
    assert access and re.search(r" completion_tokens=2 finish=length \d+\.\d{3}s$", access[-1]), access
    assert any('"GET /v1/models" 401 ' in line for line in log)  # refusals are logged too


def read_stream_ending(lines: list[str]) -> tuple[str | None, dict | None]:
    """A stream's finish reason and error event, if any."""
    finish, error = None, None
    for line in lines:
        if line.startswith("data: {"):
            data = json.loads(line[6:])
            error = data.get("error", error)
            for choice in data.get("choices", []):
                finish = choice.get("finish_reason") or finish
    return finish, error


def start_streams(server, count: int) -> tuple[concurrent.futures.ThreadPoolExecutor, list]:
    """`count` long streams on a one-slot server; returns once one of them is generating and the others wait in
    the queue (a request still being prepared when a shutdown begins is refused with 503, not admitted)."""
    pool = concurrent.futures.ThreadPoolExecutor(count)
    generating = threading.Event()
    streams = [pool.submit(stream_lines, server, LONG, generating) for _ in range(count)]
    assert generating.wait(30)
    deadline = time.monotonic() + 30
    while server.metrics().get("moetrt_queue_depth") != count - 1:
        assert time.monotonic() < deadline, "the other streams never reached the queue"
        time.sleep(0.01)
    return pool, streams


def stop_with_sigterm(server) -> str:
    """SIGTERM; the server must exit 0 and log no traceback. Returns the log."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
    return log


def test_sigterm_ends_the_streams_still_running_after_the_shutdown_timeout_with_an_error_and_done(
        chat_engine_dir, tmp_path):
    server = start_server(chat_engine_dir, tmp_path / "server.log", "--max-batch", "1", "--max-queue", "8",
                          "--shutdown-timeout", "0")
    pool, streams = start_streams(server, 3)
    stop_with_sigterm(server)
    endings = [read_stream_ending(stream.result()) for stream in streams]
    pool.shutdown()
    for stream in streams:
        assert stream.result()[-1] == "data: [DONE]"
    errors = [error for _, error in endings if error is not None]
    assert errors and all(error["code"] == "server_shutting_down" for error in errors), endings
    assert all(finish == "length" for finish, error in endings if error is None)


def test_sigterm_lets_running_requests_finish_and_refuses_new_ones_with_503(chat_engine_dir, tmp_path):
    server = start_server(chat_engine_dir, tmp_path / "server.log", "--max-batch", "1", "--max-queue", "8",
                          "--shutdown-timeout", "120", "--header-timeout", "60")
    idle = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) for _ in range(2)]
    body = json.dumps({"model": server.model, "prompt": "1+1=", "max_tokens": 2}).encode()
    half_body = raw_request(server, completion_head(len(body)), body[:10])  # --body-timeout is 30 s
    pool, streams = start_streams(server, 3)  # three times 1000 tokens, one at a time: the drain takes a while
    server.process.send_signal(signal.SIGTERM)
    while True:  # until it stops listening: the drain has begun
        try:
            socket.create_connection(("127.0.0.1", port_of(server)), timeout=30).close()
        except ConnectionRefusedError:
            break
        time.sleep(0.01)
    idle[0].sendall(completion_head(len(body)) + body)
    idle[1].sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
    refused, health = read_to_eof(idle[0]), read_to_eof(idle[1])
    assert refused.startswith(b"HTTP/1.1 503 ") and b"server_shutting_down" in refused, refused
    assert health.startswith(b"HTTP/1.1 503 ") and b'"draining"' in health, health
    slow = read_to_eof(half_body)  # a body still arriving cannot hold the shutdown
    assert slow.startswith(b"HTTP/1.1 503 ") and b"server_shutting_down" in slow, slow
    for stream in streams:
        lines = stream.result()
        assert lines[-1] == "data: [DONE]" and read_stream_ending(lines) == ("length", None)
    pool.shutdown()
    assert server.process.wait(timeout=60) == 0
    assert "Traceback" not in server.log_path.read_text()



@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_a_second_sigint_during_the_drain_cuts_it_and_exits_0_without_a_traceback(chat_engine_dir, tmp_path, first):
    server = start_server(chat_engine_dir, tmp_path / "server.log", "--max-batch", "1", "--max-queue", "8",
                          "--shutdown-timeout", "120")
    pool, streams = start_streams(server, 3)  # three times 1000 tokens, one at a time: the drain takes a while
    server.process.send_signal(first)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=60) == 0
    for stream in streams:
        assert stream.result()[-1] == "data: [DONE]"
    pool.shutdown()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "still running at shutdown" in log  # the second signal came during the drain and cut it
    assert "Application shutdown complete" in log  # and the scheduler was still closed

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrt.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_a_busy_port_or_a_port_out_of_range_is_one_line_and_exit_1(chat_engine_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_cli(str(chat_engine_dir), "--port", str(port))
    assert busy.returncode == 1 and busy.stdout == ""
    assert busy.stderr.splitlines() == [f"error: port {port} is in use on 127.0.0.1: stop the other server or "
                                        "choose another --port"]
    out_of_range = run_cli(str(chat_engine_dir), "--port", "80000")
    assert out_of_range.returncode == 1 and out_of_range.stdout == ""
    assert out_of_range.stderr.splitlines() == ["error: --port must lie in [0, 65535], got 80000"]


@pytest.mark.parametrize("limits, match", [({"header_timeout": 0}, "--header-timeout"),
                                           ({"body_timeout": -1}, "--body-timeout"),
                                           ({"max_connections": 0}, "--max-connections"),
                                           ({"shutdown_timeout": -1}, "--shutdown-timeout")])
def test_bad_server_limits_are_user_errors(limits, match):
    with pytest.raises(MoetrtError, match=match):
        ServerLimits(**limits)


def test_a_bad_log_level_is_a_user_error_before_anything_loads(tmp_path):
    with pytest.raises(MoetrtError, match="--log-level"):  # tmp_path holds no engine
        serve(tmp_path, port=free_port(), log_level="loud")


@pytest.mark.parametrize("address, api_key, warns", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True), ("0.0.0.0", "key", False),
    ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("::1", None, False)])
def test_a_non_loopback_address_without_a_key_warns(address, api_key, warns):
    warning = exposure_warning(address, api_key)
    assert (warning is not None) == warns
    if warns:
        assert address in warning and "--api-key" in warning
