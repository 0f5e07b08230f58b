"""Expert parallelism when a rank fails: a rank killed mid-generation ends the whole `mpiexec.gforker` job; a
hung (SIGSTOPped) rank makes rank 0 exit 1 after --ep-timeout with one line naming it; while the group is stalled
the HTTP server answers 503. Every job runs in its own session and is SIGKILLed as a group afterwards, whatever
happened (tests/runtime/mpi_helpers.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.runtime import mpi_helpers as mpi

pytestmark = pytest.mark.skipif(mpi.mpi_available() is not None, reason=str(mpi.mpi_available()))

# Every generation that must still be running when a rank is hit: far more tokens than the test needs, EOS off.
ENDLESS = {"max_tokens": 400, "temperature": 0, "logit_bias": {"1": -100}}


@pytest.fixture(scope="module")
def kernel_engine(tiny_r1_quantized):
    return tiny_r1_quantized("none", "moetrt")


def rank_report(text: str, rank: int) -> str | None:
    """gforker's line about how `rank` ended ("Return code = 1" or "Return code = 0, signaled with Killed")."""
    found = re.search(rf"^\[0\]{rank}:Return code = (.*)$", text, re.MULTILINE)
    return found.group(1) if found else None


@pytest.fixture(scope="module")
def killed_rank(kernel_engine, tmp_path_factory):
    """A 2-rank job generating without end (the driver's `spin`) whose rank 1 gets SIGKILL: what became of
    rank 0 and the launcher within 30 s."""
    work = tmp_path_factory.mktemp("killed")
    process = mpi.start(mpi.driver_job(2, "spin", kernel_engine, "--ep"), work / "out", work / "err")
    try:
        mpi.wait_for_text(work / "out", "loaded", process)
        ranks = mpi.wait_for_ranks(process.pid, 2)
        time.sleep(0.5)  # well into generating (rank 0 printed `loaded` after every rank had loaded)
        assert process.poll() is None and not mpi.gone(ranks[0])
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        rank0_gone = mpi.wait_gone([ranks[0]], 30)
        try:
            status = process.wait(timeout=max(0.1, 30 - (time.monotonic() - killed)))
        except subprocess.TimeoutExpired:
            status = None
    finally:
        mpi.kill_group(process)
    return {"rank0_gone": rank0_gone, "status": status, "err": (work / "err").read_text()}


def test_a_killed_rank_ends_rank_0_and_the_launcher_within_30_seconds(killed_rank):
    assert killed_rank["rank0_gone"], killed_rank["err"]
    assert killed_rank["status"] is not None, "mpiexec.gforker still ran 30 s after rank 1 was killed"
    assert rank_report(killed_rank["err"], 1) == "0, signaled with Killed", killed_rank["err"]
    assert rank_report(killed_rank["err"], 0) not in (None, "0"), killed_rank["err"]  # rank 0 did not end well


def test_a_killed_rank_makes_the_job_exit_non_zero(killed_rank):
    """gforker sends the survivors SIGINT, then SIGQUIT a second later, and counts only exit codes: the ranks
    exit 1 with one line (naming the dead rank when the liveness check ends first), so the job's status is 1."""
    assert killed_rank["status"] not in (None, 0), killed_rank["err"]
    assert rank_report(killed_rank["err"], 0) == "1", killed_rank["err"]
    errors = [line for line in killed_rank["err"].splitlines() if line.startswith("error:")]
    assert errors and all(re.fullmatch(
        r"error: expert parallelism: (rank 1 \(of 2\) did not reach .* \(found on an interrupt\)|stopped by the "
        r"launcher \(signal 3\), which does so when another rank exits); rank 0 exits", line) for line in errors), \
        killed_rank["err"]
    assert "Traceback" not in killed_rank["err"]


def test_a_hung_rank_makes_rank_0_exit_1_naming_it(kernel_engine, tmp_path):
    """SIGSTOP rank 1 with --ep-timeout 3: rank 0 gives up on its wait, asks who is alive, and exits 1 with one
    line; the stopped rank is killed afterwards."""
    process = mpi.start(mpi.driver_job(2, "spin", kernel_engine, "--ep", "--ep-timeout", "3"), tmp_path / "out",
                        tmp_path / "err")
    try:
        mpi.wait_for_text(tmp_path / "out", "loaded", process)
        ranks = mpi.wait_for_ranks(process.pid, 2)
        time.sleep(0.5)
        os.kill(ranks[1], signal.SIGSTOP)
        assert mpi.wait_gone([ranks[0]], 20), "rank 0 still ran 20 s after rank 1 stopped (--ep-timeout 3)"
        os.kill(ranks[1], signal.SIGKILL)  # gforker waits for every rank before it reports
        process.wait(timeout=30)
    finally:
        mpi.kill_group(process)
    err = (tmp_path / "err").read_text()
    assert rank_report(err, 0) == "1", err  # a plain exit status 1, not a signal
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: expert parallelism: rank 1 \(of 2\) did not reach MoE layer \d+ \(dead or hung\) within 3s; "
        r"rank 0 exits", errors[0]), err
    assert "Traceback" not in err


def test_the_server_answers_503_while_a_rank_is_stalled(kernel_engine, tmp_path):
    """Serve under 2 ranks with --ep-timeout 15; stop rank 1 while a stream is in flight (rank 0 waits in a MoE
    combine): /health and a new request get 503 well before the timeout ends the job."""
    process, url = mpi.start_server(kernel_engine, tmp_path / "log", 2, "--ep-timeout", "15")
    chunks: list[str] = []
    try:
        ranks = mpi.wait_for_ranks(process.pid, 2)
        assert httpx.get(url + "/health", timeout=5).status_code == 200

        def stream():
            body = {"model": kernel_engine.name, "prompt": "12+35=", "stream": True, **ENDLESS}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                    chunks.extend(response.iter_lines())
            except httpx.HTTPError as error:
                chunks.append(repr(error))

        threading.Thread(target=stream, daemon=True).start()
        deadline = time.monotonic() + 60
        while len(chunks) < 3 and time.monotonic() < deadline:  # tokens are flowing
            time.sleep(0.02)
        assert len(chunks) >= 3, chunks
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        health = None
        while time.monotonic() - stopped < 12:  # the timeout (15 s) has not fired yet
            health = httpx.get(url + "/health", timeout=5)
            if health.status_code == 503:
                break
            time.sleep(0.2)
        assert health is not None and health.status_code == 503, health and health.text
        assert "have not answered" in health.json()["status"]
        refused = httpx.post(url + "/v1/completions", json={"model": kernel_engine.name, "prompt": "1+1=",
                                                            "max_tokens": 4}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable", refused.text
        assert time.monotonic() - stopped < 15 and process.poll() is None
    finally:
        mpi.kill_group(process)
