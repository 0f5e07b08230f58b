"""Progress off a terminal: plain timestamped lines at a bounded rate; notes never wrapped."""

import re

import pytest

from moetrt import progress

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ build-engine: (?P<text>.*)$")


@pytest.fixture
def log(monkeypatch, capsys):
    """stderr as a log file (capsys: no terminal), not quiet, a clock that advances 1 s per reading."""
    monkeypatch.setenv("MOETRT_QUIET", "0")
    monkeypatch.setattr(progress, "command", "build-engine")
    monkeypatch.setattr(progress._Lines, "last_line", None)
    seconds = iter(range(10**6))
    monkeypatch.setattr(progress, "_clock", lambda: float(next(seconds)))

    def lines() -> list[str]:
        out = capsys.readouterr().err.splitlines()
        assert all(LINE.match(line) for line in out), out
        return [LINE.match(line)["text"] for line in out]

    return lines


def test_track_off_a_terminal_prints_its_first_and_last_step_and_one_line_per_interval(log):
    assert list(progress.track(range(200), "optimise segment")) == list(range(200))
    lines = log()
    assert lines[0] == "optimise segment 0/200" and lines[-1] == "optimise segment 200/200"
    assert 200 / progress.LINE_INTERVAL_S - 1 <= len(lines) <= 200 / progress.LINE_INTERVAL_S + 3


def test_lines_between_first_and_last_carry_the_time_remaining_at_the_rate_so_far(log):
    list(progress.track(range(200), "optimise segment"))
    middle = log()[1:-1]
    assert middle, "no line between the first and the last"
    for line in middle:
        done, minutes, seconds = map(int, re.fullmatch(r"optimise segment (\d+)/200, ETA 0:(\d\d):(\d\d)", line).groups())
        # the clock reads 1 s more per reading, one reading per step: n steps in n s leave 200 - n steps, 200 - n s
        assert abs(minutes * 60 + seconds - (200 - done)) <= 0.05 * (200 - done) + 1, line


def test_stage_lines_carry_the_current_description_and_a_count_without_total(log):
    with progress.stage("exporting", total=4) as advance:
        for step in ("loading checkpoint", "tracing", "lowering", "saving"):
            advance(1, step)
    with progress.stage("calibrating") as advance:
        advance(3)
    assert log() == ["exporting 0/4", "saving 4/4", "calibrating 0", "calibrating 3"]


def test_nested_phases_print_top_level_starts_and_ends_and_the_rest_at_the_bounded_rate(log):
    with progress.Phases() as phases:
        phases.start("Building engine", None, 2)
        for layer in range(100):
            phases.start(f"layer {layer}", "Building engine", 1)
            phases.step(f"layer {layer}", 0)
            phases.finish(f"layer {layer}")
        phases.finish("Building engine")
    lines = log()
    assert lines[0] == "Building engine 0/2" and lines[-1] == "Building engine 2/2"
    assert len(lines) <= 300 / progress.LINE_INTERVAL_S + 3  # 300 clock readings, not 100 layers' lines


def test_quiet_prints_nothing(log, monkeypatch):
    monkeypatch.setenv("MOETRT_QUIET", "1")
    list(progress.track(range(5), "loading weights"))
    progress.note("backend: ort")
    assert log() == []


def test_a_note_off_a_terminal_is_one_line_however_long_and_keeps_brackets(monkeypatch, capsys):
    monkeypatch.setenv("MOETRT_QUIET", "0")
    message = "experts: moetrt's CPU kernel [float32], " + "the graph cut into segments " * 8
    progress.note(message)
    assert capsys.readouterr().err == message + "\n"
