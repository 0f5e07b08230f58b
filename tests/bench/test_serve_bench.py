"""`moetrt bench serve`: the percentile and prefill-window math on synthetic timelines, the workload, and one tiny
run against a real `moetrt serve` of the chat engine whose report holds every figure."""

import asyncio
import json
import random

import pytest
from typer.testing import CliRunner

from moetrt.bench import serve
from moetrt.bench.serve import RequestRecord
from moetrt.cli import app
from moetrt.errors import MoetrtError
from tests.chat_checkpoint import build_tokenizer


def test_percentiles_interpolate_linearly_between_order_statistics():
    assert serve.percentile([4, 1, 3, 2], 50) == 2.5
    assert serve.percentile([0, 10], 90) == 9.0
    assert serve.percentile(list(range(101)), 99) == 99.0
    assert serve.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        serve.percentile([], 50)


def test_summary_scales_to_milliseconds_and_is_empty_without_values():
    assert serve.summarize([0.001, 0.003], 1e3) == pytest.approx(
        {"count": 2, "mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98})
    assert serve.summarize([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}


def _record(sent, chunks, long=False):
    return RequestRecord(long=long, sent=sent, chunks=list(chunks), end=chunks[-1] if chunks else sent,
                         output_tokens=len(chunks))


def test_gaps_overlapping_a_long_prompts_prefill_window_are_counted_apart():
    # the long request is sent at 1.0 and streams its first token at 2.0: its window is (1.0, 2.0)
    long = _record(1.0, [2.0, 2.25], long=True)
    short = _record(0.0, [0.5, 0.9, 1.2, 1.5, 2.5, 2.6])
    touching = _record(0.0, [0.2, 1.0, 2.0, 2.1])  # gaps that end at the window's start or begin at its end
    assert serve.prefill_windows([long, short, touching]) == [(1.0, 2.0)]
    during, outside = serve.split_gaps([long, short, touching], [(1.0, 2.0)])
    assert during == pytest.approx([0.3, 0.3, 1.0, 1.0])  # short's (0.9,1.2) (1.2,1.5) (1.5,2.5); touching's (1,2)
    assert outside == pytest.approx([0.25, 0.4, 0.1, 0.8, 0.1])


def test_a_long_request_without_tokens_holds_its_window_until_it_ended():
    failed = RequestRecord(long=True, sent=1.0, end=3.0, error="HTTP 500")
    assert serve.prefill_windows([failed, _record(0.0, [0.5])]) == [(1.0, 3.0)]


def test_report_pools_runs_and_keeps_failures_out_of_the_latencies():
    first = serve.RunResult([_record(0.0, [0.1, 0.2, 0.4]), _record(0.5, [0.6, 1.6], long=True)], 2.0)
    second = serve.RunResult([RequestRecord(long=False, sent=0.0, end=0.1, error="HTTP 429: busy")], 1.0)
    figures = serve.report([first, second])
    assert (figures["completed"], figures["failed"], figures["errors"]) == (2, 1, ["HTTP 429: busy"])
    assert figures["request_throughput"] == pytest.approx(2 / 3)
    assert figures["output_throughput"] == pytest.approx(5 / 3)
    assert figures["ttft_ms"]["mean"] == pytest.approx(100.0)
    assert figures["ttft_long_ms"]["count"] == 1
    # the long request's window (0.5, 0.6) overlaps no gap: (0.2, 0.4) ends before it, (0.6, 1.6) starts at its end
    assert figures["itl_prefill_ms"]["count"] == 0
    assert figures["itl_outside_ms"]["count"] == figures["itl_ms"]["count"] == 3
    assert figures["e2e_ms"]["p50"] == pytest.approx(750.0)


def test_a_request_refused_as_invalid_stops_the_benchmark_and_busy_answers_do_not():
    busy = serve.RunResult([RequestRecord(long=False, sent=0.0, end=0.1, error="HTTP 429: queue full")], 1.0)
    assert serve.check_accepted(busy) is busy
    refused = serve.RunResult([RequestRecord(long=True, sent=0.0, end=0.1, error="HTTP 400: a prompt of 485 "
                                             "tokens plus 64 new tokens (549) exceeds the engine's context")], 1.0)
    with pytest.raises(MoetrtError, match="exceeds the engine's context.*--long-prompt-tokens"):
        serve.check_accepted(refused)


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    async def aiter_lines(self):
        for line in self.lines:
            yield line


def _sse(event) -> str:
    return "data: " + json.dumps(event)


def test_stream_chunks_with_text_are_timed_and_usage_counts_the_tokens():
    lines = [_sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), "", ": keep-alive",
             _sse({"choices": [{"delta": {"reasoning_content": "1", "reasoning": "1"}}]}),
             _sse({"choices": [{"delta": {"content": "ab"}}]}),
             _sse({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
             _sse({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}), "data: [DONE]"]
    record = RequestRecord(long=False, sent=0.0)
    assert asyncio.run(serve._read_stream(_Lines(lines), record)) is True
    assert (len(record.chunks), record.output_tokens, record.prompt_tokens, record.error) == (2, 3, 9, None)
    cut = RequestRecord(long=False, sent=0.0)
    assert asyncio.run(serve._read_stream(_Lines(lines[:4]), cut)) is False
    failed = RequestRecord(long=False, sent=0.0)
    asyncio.run(serve._read_stream(_Lines([_sse({"error": {"message": "shutting down"}}), "data: [DONE]"]), failed))
    assert failed.error == "stream error: shutting down"


def test_long_prompts_are_spread_evenly_and_never_first():
    assert serve.long_positions(8, 0.25) == {3, 7}
    assert serve.long_positions(4, 0.0) == set()
    assert serve.long_positions(3, 1.0) == {0, 1, 2}
    assert len(serve.long_positions(64, 0.125)) == 8


def test_long_prompts_have_the_asked_token_count_and_need_a_tokenizer():
    tokenizer = build_tokenizer()
    requests = serve.make_workload(8, 0.25, 200, tokenizer, seed=3)
    assert [r.long for r in requests] == [i in (3, 7) for i in range(8)]
    long_text = requests[3].messages[0]["content"]
    assert len(tokenizer.encode(long_text, add_special_tokens=False).ids) == 200
    assert long_text.endswith("?") and requests[0].messages[0]["content"].startswith("What is ")
    assert serve.make_workload(8, 0.25, 200, tokenizer, seed=3) == requests
    with pytest.raises(MoetrtError, match="--tokenizer"):
        serve.make_workload(8, 0.25, 200, None, seed=3)
    with pytest.raises(MoetrtError, match="--long-prompt-tokens"):
        serve.make_workload(8, 0.25, 3, tokenizer, seed=3)


def test_poisson_arrivals_average_the_rate_and_inf_sends_all_at_once():
    offsets = serve.arrival_offsets(4000, 20.0, random.Random(0))
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert offsets[-1] / 3999 == pytest.approx(1 / 20, rel=0.1)
    assert serve.arrival_offsets(5, float("inf"), random.Random(0)) == [0.0] * 5


def test_compare_specs_are_label_equals_flags():
    assert serve.parse_config("whole=--max-prefill-tokens 0") == serve.ServeConfig(
        "whole", ("--max-prefill-tokens", "0"))
    assert serve.parse_config("default=") == serve.ServeConfig("default", ())
    with pytest.raises(MoetrtError, match="label=serve flags"):
        serve.parse_config("--max-prefill-tokens 0")


def test_bench_serve_needs_exactly_one_target(tmp_path):
    with pytest.raises(MoetrtError, match="engine directory or --url"):
        serve.main(["--out", str(tmp_path / "x.md")])
    with pytest.raises(MoetrtError, match="--compare starts its own servers"):
        serve.main(["--url", "http://127.0.0.1:1", "--compare", "a=", "--long-fraction", "0"])


def test_moetrt_bench_serve_dispatches_to_the_serving_benchmark():
    result = CliRunner().invoke(app, ["bench", "serve", "--help-bench"])
    assert result.exit_code == 0 and "--request-rate" in result.output and "--compare" in result.output


def test_compared_configurations_share_one_table_with_ratios_to_the_first():
    # the long request's window (0, its first token) holds the short request's gap; its own gap lies outside
    fast = serve.report([serve.RunResult([_record(0.0, [0.1, 0.2]), _record(0.0, [0.2, 0.25], long=True)], 1.0)])
    slow = serve.report([serve.RunResult([_record(0.0, [0.2, 0.6]), _record(0.0, [0.6, 0.7], long=True)], 2.0)])
    lines = serve.table({"chunked": fast, "whole": slow}).splitlines()
    assert lines[0] == "| figure | chunked | whole | whole / chunked |"
    assert "| request throughput (req/s) | 2.00 | 1.00 | 0.50x |" in lines
    assert "| TTFT p50 (ms) | 150.00 | 400.00 | 2.67x |" in lines
    assert "| ITL during long prefill p99 (ms) | 100.00 | 400.00 | 4.00x |" in lines
    assert "| ITL outside long prefill p99 (ms) | 50.00 | 100.00 | 2.00x |" in lines
    assert "| p99 ITL during / outside long prefill | 2.00 | 4.00 | 2.00x |" in lines
    assert "| gaps during long prefill (count) | 1 | 1 | 1.00x |" in lines


def test_a_tiny_run_against_moetrt_serve_reports_every_figure(chat_engine_dir, tmp_path):
    out = tmp_path / "serve.md"
    reports = serve.main([str(chat_engine_dir), "--num-prompts", "4", "--max-tokens", "4", "--long-fraction", "0.5",
                          "--long-prompt-tokens", "100", "--temperature", "0", "--rounds", "1", "--no-warmup",
                          "--serve-flags", "--max-batch 4", "--out", str(out)])
    figures = reports[None]["serve"]
    assert (figures["completed"], figures["failed"]) == (4, 0)
    assert 0 < figures["output_tokens"] <= 16
    assert 100 <= figures["prompt_tokens_long"] < 110 and figures["prompt_tokens_short"] < 40
    for key in ("ttft_ms", "ttft_long_ms", "itl_ms", "e2e_ms"):
        assert all(figures[key][s] is not None for s in ("mean", "p50", "p90", "p99")), key
    assert figures["itl_prefill_ms"]["count"] + figures["itl_outside_ms"]["count"] == figures["itl_ms"]["count"]
    assert figures["request_throughput"] > 0 and figures["output_throughput"] > 0
    text = out.read_text()
    for title, *_ in serve.ROWS:
        assert f"| {title} |" in text
    assert "| figure | serve |" in text and "`moetrt serve ENGINE --max-batch 4`" in text
