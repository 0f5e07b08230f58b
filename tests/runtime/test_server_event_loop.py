"""A request that takes long to prepare (a huge prompt to tokenize and render) does not hold the event loop: the
streams already running and /health go on being answered meanwhile. Real `moetrt serve` on loopback."""

import concurrent.futures
import threading
import time

import httpx

from tests.runtime.test_server import serving
from tests.runtime.test_server_production import AUTH, LONG

HUGE = 1_000_000  # characters of the huge prompt: seconds of tokenizing


def test_a_huge_prompt_is_refused_while_a_stream_and_health_go_on(chat_engine_dir, tmp_path_factory):
    with serving(chat_engine_dir, tmp_path_factory, 2, 2, "--max-body-bytes", str(2 * HUGE)) as server:
        streaming, arrivals = threading.Event(), []

        def stream() -> list[str]:
            lines = []
            with httpx.stream("POST", server.url + "/v1/completions", json={"model": server.model, **LONG},
                              headers=AUTH, timeout=120) as response:
                for line in filter(None, response.iter_lines()):
                    arrivals.append(time.perf_counter())
                    streaming.set()
                    lines.append(line)
            return lines

        def huge() -> httpx.Response:
            content = ("hello world " * (HUGE // 12 + 1))[:HUGE]
            return server.post("/v1/chat/completions", {"model": server.model, "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": content}]},
                               timeout=120)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streamed = pool.submit(stream)
            assert streaming.wait(60)
            refused = pool.submit(huge)
            health = []
            while not refused.done():
                health.append(httpx.get(server.url + "/health", timeout=120).status_code)
            lines = streamed.result()
        assert refused.result().status_code == 400, refused.result().text
        assert refused.result().json()["error"]["code"] == "context_length_exceeded"
        assert health and set(health) == {200}  # answered while the huge prompt was being prepared
        assert lines[-1] == "data: [DONE]"  # the stream went on to its end
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        print(f"\nlongest gap between a stream's lines: {max(gaps):.3f} s; {len(health)} health answers while "
              "the huge prompt was prepared")
