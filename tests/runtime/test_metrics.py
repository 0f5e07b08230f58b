"""runtime/metrics.py on prometheus_client: label escaping, histogram buckets, counters, process metrics and one
registry per Metrics. Every check parses the exposition with prometheus_client's own text parser."""

import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moetrt.runtime.metrics import CONTENT_TYPE, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the rendered text by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.render()) for s in family.samples}


def families(metrics: Metrics) -> dict[str, str]:
    """Family name -> type, as the parser reads them (counters without `_total`)."""
    return {family.name: family.type for family in text_string_to_metric_families(metrics.render())}


def bucket(values: dict, histogram: str, le: str) -> float:
    return values[(f"{histogram}_bucket", (("le", le),))]


def test_a_label_value_with_quote_backslash_and_newline_round_trips():
    metrics = Metrics()
    hostile = 'a"b\\c\nd} x="y'
    metrics.count_response(hostile, 200)
    text = metrics.render()
    assert 'route="a\\"b\\\\c\\nd} x=\\"y"' in text  # escaped as the text format requires, on one line
    assert samples(metrics)[("moetrt_http_responses_total", (("route", hostile), ("status", "200")))] == 1


def test_histograms_observe_into_the_right_buckets():
    metrics = Metrics()
    metrics.queued(0.0)
    metrics.first_token(0.3, prompt_tokens=7)
    metrics.next_tokens([0.0005, 0.04, 0.04, 20.0])  # 0.04 is a bound: `le` includes it
    metrics.finished("stop", 1.0)
    values = samples(metrics)

    assert bucket(values, "moetrt_request_queue_time_seconds", "0.001") == 1
    ttft = "moetrt_time_to_first_token_seconds"
    assert (bucket(values, ttft, "0.25"), bucket(values, ttft, "0.5"), bucket(values, ttft, "+Inf")) == (0, 1, 1)
    assert values[(f"{ttft}_sum", ())] == pytest.approx(0.3)
    itl = "moetrt_inter_token_latency_seconds"
    assert [bucket(values, itl, le) for le in ("0.001", "0.03", "0.04", "10.0", "+Inf")] == [1, 1, 3, 3, 4]
    assert values[(f"{itl}_count", ())] == 4
    e2e = "moetrt_e2e_request_latency_seconds"
    assert (bucket(values, e2e, "0.5"), bucket(values, e2e, "1.0"), values[(f"{e2e}_count", ())]) == (0, 1, 1)
    assert values[("moetrt_requests_total", (("outcome", "stop"),))] == 1


def test_tokens_are_counters_that_only_go_up_and_no_rate_gauge_is_kept():
    metrics = Metrics()
    metrics.first_token(0.1, prompt_tokens=5)
    metrics.next_tokens([0.01, 0.01])
    metrics.next_tokens([])
    assert (metrics.prompt_tokens, metrics.generated_tokens) == (5, 3)
    with pytest.raises(ValueError):  # prometheus_client refuses to decrease a counter
        metrics.first_token(0.1, prompt_tokens=-1)
    assert (metrics.prompt_tokens, metrics.generated_tokens) == (5, 3)
    kinds = families(metrics)
    assert kinds["moetrt_prompt_tokens"] == kinds["moetrt_generated_tokens"] == "counter"
    assert not any("per_second" in name for name in kinds)  # throughput is rate() over the counter


def test_gauges_follow_the_scheduler_and_the_batch():
    metrics = Metrics()
    waiting = [1, 2, 3]
    metrics.follow_scheduler(8, lambda: len(waiting))
    metrics.batch(rows=2, width=5)
    values = samples(metrics)
    assert [values[(name, ())] for name in ("moetrt_queue_depth", "moetrt_batch_rows", "moetrt_batch_width",
                                            "moetrt_batch_capacity")] == [3, 2, 5, 8]
    waiting.clear()
    assert samples(metrics)[("moetrt_queue_depth", ())] == 0  # read at each scrape


@pytest.mark.skipif(sys.platform != "linux", reason="process metrics come from /proc")
def test_process_and_python_metrics_are_exported():
    kinds = families(Metrics())
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info",
                 "python_gc_collections"):
        assert name in kinds, sorted(kinds)


def test_two_metrics_objects_in_one_process_keep_separate_registries():
    first, second = Metrics(), Metrics()
    first.count_request("cancelled")
    first.count_request("cancelled")
    second.count_request("failed")
    assert first.requests == {"cancelled": 2} and second.requests == {"failed": 1}
    assert ("moetrt_requests_total", (("outcome", "failed"),)) not in samples(first)


def test_the_content_type_is_the_text_format_render_writes():
    metrics = Metrics()
    assert metrics.content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE moetrt_e2e_request_latency_seconds histogram" in metrics.render()
