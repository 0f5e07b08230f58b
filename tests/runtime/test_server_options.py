"""`moetrt serve` options as a real process on loopback: --max-connections N serves N open connections and
answers the next with an OpenAI-style 503, --port 0 --log-level warning still logs the chosen port, and a blank
--served-model-name or --api-key is refused at start-up."""

import json
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.runtime.test_server import serving
from tests.runtime.test_server_production import AUTH, raw_request, read_to_eof

HEALTH = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
CONNECTIONS = 2


def answer_on(sock) -> bytes:
    """The response to the request just sent on `sock` (the server closes or keeps it; read its head and body)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", data.lower()).group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_max_connections_n_serves_n_open_connections_and_answers_the_next_with_json_503(
        chat_engine_dir, tmp_path_factory):
    with serving(chat_engine_dir, tmp_path_factory, 1, 1, "--max-connections", str(CONNECTIONS),
                 "--header-timeout", "60") as server:
        held = [raw_request(server, b"") for _ in range(CONNECTIONS)]  # open, nothing sent yet
        for sock in reversed(held):  # the N-th first: it was the one uvicorn's own check refused
            sock.sendall(HEALTH)
            assert answer_on(sock).startswith(b"HTTP/1.1 200 ")
        extra = raw_request(server, HEALTH)
        refused = read_to_eof(extra)
        head, body = refused.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 "), refused
        assert b"\r\nretry-after: 1\r\n" in head.lower() + b"\r\n" and b"application/json" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        for sock in held:
            sock.close()


def test_port_0_with_log_level_warning_still_logs_the_chosen_port(chat_engine_dir, tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "moetrt.cli", "serve", str(chat_engine_dir), "--port", "0",
                                    "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not (found := re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", log_path.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert httpx.get(found[1] + "/health", timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    assert " INFO " not in log_path.read_text()  # the level holds for everything else


@pytest.mark.parametrize("option, value", [("--served-model-name", ""), ("--served-model-name", "  "),
                                           ("--api-key", " "), ("--api-key", ""), ("--api-key", "key ")])
def test_a_blank_served_model_name_or_api_key_is_one_line_and_exit_1(chat_engine_dir, option, value):
    result = subprocess.run([sys.executable, "-m", "moetrt.cli", "serve", str(chat_engine_dir), "--port", "0",
                             option, value], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} "), result.stderr


def test_the_429_message_counts_requests_not_their_choices(chat_engine_dir, tmp_path_factory):
    with serving(chat_engine_dir, tmp_path_factory, 2, 0) as server:
        body = {"model": server.model, "prompt": "RRRR", "temperature": 0, "max_tokens": 1000, "stream": True,
                "n": 2}  # one request, both slots
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: closing it would close the stream
            next(line for line in lines if line.startswith("data: {"))
            refused = server.post("/v1/completions", {**body, "n": 1, "stream": False, "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["message"].startswith("1 requests are running and 0 waiting"), refused.text
