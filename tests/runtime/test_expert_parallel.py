"""Expert parallelism (runtime/parallel): placement, routing counts, the wire format between ranks, the options'
errors, and real `mpiexec.gforker` jobs of tiny-r1 against the single-process engine, which is the reference:
the same greedy tokens, logits equal up to summation order, the same continuous-batching streams, the same CLI
output and HTTP streams, and no socket off loopback anywhere in the job's process tree.

Jobs run under MPICH's `mpiexec.gforker` (forks every rank on this host, opens no sockets; hydra's `mpiexec`
listens on 0.0.0.0) from the venv's bin, each under a timeout so nothing hangs CI (tests/runtime/mpi_helpers.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from moetrt.errors import MoetrtError
from moetrt.formats import RoutingCounts, read_routing_counts, write_routing_counts
from moetrt.runtime.parallel.mirror import decode, encode
from moetrt.runtime.parallel.options import ExpertParallelOptions
from moetrt.runtime.parallel.placement import balanced, imbalance, placement, round_robin
from tests.runtime import mpi_helpers as mpi

JOB_TIMEOUT = 180  # seconds any one MPI job may take before the test fails (a hang, not a slow machine)
LOGIT_TOLERANCE = 1e-5  # of the largest |logit|: the ranks' expert outputs are summed in another order

needs_mpi = pytest.mark.skipif(mpi.mpi_available() is not None, reason=str(mpi.mpi_available()))


# -- placement ------------------------------------------------------------------------------------------------

def test_round_robin_puts_expert_e_on_rank_e_mod_n():
    assert round_robin(8, 3).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert round_robin(5, 1).tolist() == [0] * 5
    assert round_robin(8, 3).dtype == np.int32


@pytest.mark.parametrize("experts,ranks", [(8, 2), (8, 3), (64, 4), (7, 7), (3, 4), (256, 8), (10, 4)])
def test_balanced_gives_every_rank_ceil_or_floor_of_the_experts(experts, ranks):
    counts = np.random.default_rng(experts * ranks).zipf(1.5, experts).clip(max=10**6)
    owner = balanced(counts, ranks)
    held = np.bincount(owner, minlength=ranks)
    assert owner.dtype == np.int32 and owner.shape == (experts,) and held.sum() == experts
    assert set(held.tolist()) <= {experts // ranks, -(-experts // ranks)}, held
    assert np.array_equal(balanced(counts, ranks), owner), "the same counts must give the same placement"


def test_balanced_deals_the_busiest_experts_to_the_least_loaded_rank():
    """Experts in descending count (ties by id) each go to the least-loaded rank with room: by hand, 0 (100) to
    rank 0, 4 (90) to rank 1, then 1, 2, 3 to rank 1 (lighter) until it holds 4, and 5, 6, 7 to rank 0."""
    counts = np.array([100, 1, 1, 1, 90, 1, 1, 1])
    owner = balanced(counts, 2)
    assert owner.tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert imbalance(owner, counts, 2) == pytest.approx(103 / 98)
    assert imbalance(round_robin(8, 2), counts, 2) == pytest.approx(192 / 98)  # 100 and 90 both on rank 0


@pytest.mark.parametrize("seed", range(5))
def test_balanced_evens_a_skewed_load_better_than_round_robin(seed):
    rng = np.random.default_rng(seed)
    counts = (rng.zipf(1.3, 64) * 10).clip(max=5000)  # a few hot experts, as routing on real workloads
    counts[rng.choice(64, 4, replace=False)] += 3000
    for ranks in (2, 4, 8):
        assert imbalance(balanced(counts, ranks), counts, ranks) < imbalance(round_robin(64, ranks), counts, ranks)


def test_imbalance_is_one_for_an_even_load():
    assert imbalance(round_robin(8, 4), np.full(8, 7), 4) == 1.0
    assert imbalance(round_robin(8, 4), np.zeros(8), 4) == 1.0  # nothing routed: nothing uneven


def test_placement_is_round_robin_without_counts_and_balanced_with_them():
    assert [o.tolist() for o in placement([4, 4], 2)] == [[0, 1, 0, 1]] * 2
    counts = RoutingCounts(4, ((9, 8, 1, 1), (1, 1, 8, 9)))
    assert [o.tolist() for o in placement([4, 4], 2, counts)] == [balanced(np.array(layer), 2).tolist()
                                                                   for layer in counts.counts]
    assert placement([4, 4], 2, counts)[0].tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("engine_experts", [[4, 4, 4], [4], [8, 8]])
def test_placement_refuses_counts_recorded_on_an_engine_of_another_shape(engine_experts):
    counts = RoutingCounts(4, ((1, 2, 3, 4), (4, 3, 2, 1)))
    with pytest.raises(MoetrtError, match=r"routing counts describe 2 MoE layers of 4 experts.*--record-routing") \
            as error:
        placement(engine_experts, 2, counts)
    assert "\n" not in str(error.value)


# -- routing counts -------------------------------------------------------------------------------------------

def test_routing_counts_round_trip(tmp_path):
    counts = RoutingCounts(4, ((1, 2, 3, 4), (0, 0, 5, 1), (7, 0, 0, 0)))
    write_routing_counts(tmp_path / "counts.json", counts)
    assert read_routing_counts(tmp_path / "counts.json") == counts


def _damaged(text: dict | str) -> str:
    return text if isinstance(text, str) else json.dumps(text)


GOOD = {"format": "moetrt-routing-counts", "format_version": 1, "engine_experts": 4, "counts": [[1, 2, 3, 4]]}


@pytest.mark.parametrize("content,message", [
    ('{"format": "moetrt-routing-counts", "format_v', "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({**GOOD, "counts": [[1, -2, 3, 4]]}, "must not be negative"),
    ({**GOOD, "counts": [[1, 2, 3]]}, "must list 4 experts"),
    ({**GOOD, "counts": [["a", 2, 3, 4]]}, "should be int"),
    ({**GOOD, "format_version": 99}, "format version 99"),
    ({k: v for k, v in GOOD.items() if k != "engine_experts"}, "engine_experts"),
])
def test_a_damaged_routing_counts_file_is_one_line_naming_the_fix(tmp_path, content, message):
    path = tmp_path / "counts.json"
    path.write_text(_damaged(content))
    with pytest.raises(MoetrtError, match=re.escape(message)) as error:
        read_routing_counts(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert "--record-routing" in str(error.value)


def test_a_missing_routing_counts_file_names_the_fix(tmp_path):
    with pytest.raises(MoetrtError, match="does not exist; record it again"):
        read_routing_counts(tmp_path / "nothing.json")


# -- the wire format between ranks ----------------------------------------------------------------------------

def test_records_round_trip_through_the_wire_format():
    rng = np.random.default_rng(0)
    records = [
        (1, 3, [2, 512], []),
        (11, 7, [5], [rng.integers(-2**40, 2**40, (3, 5)), rng.standard_normal((2, 3, 4)).astype(np.float32),
                      rng.standard_normal(7).astype(np.float16), rng.integers(-9, 9, (1, 1, 3), dtype=np.int32)]),
        (2, 0, [], [np.zeros((0,), np.int64), np.zeros((4, 0), np.float32), np.zeros((0, 3), np.float16)]),
        (3, 1, [-1, 0, 2**62], [np.array([7], np.int64), np.arange(3, dtype=np.float16)]),  # 6 bytes: padded
        (13, 0, [], []),
        (5, 2, [1], [np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]]),  # not contiguous
    ]
    buffer = encode(records)
    assert buffer.dtype == np.uint8 and buffer.size % 8 == 0
    decoded = decode(buffer)
    assert len(decoded) == len(records)
    for (op, cache, ints, arrays), (op2, cache2, ints2, arrays2) in zip(records, decoded):
        assert (op, cache, ints) == (op2, cache2, ints2)
        assert len(arrays) == len(arrays2)
        for sent, got in zip(arrays, arrays2):
            assert got.dtype == sent.dtype and got.shape == sent.shape and np.array_equal(got, sent)
            assert got.flags.writeable  # a copy, not a view of the receive buffer
    assert decode(encode([])) == []


# -- options and the CLI's errors -----------------------------------------------------------------------------

def test_options_refuse_an_unknown_combine_or_a_short_timeout():
    with pytest.raises(MoetrtError, match="combine must be one of allreduce, alltoallv"):
        ExpertParallelOptions(combine="gather")  # type: ignore[arg-type]
    with pytest.raises(MoetrtError, match=r"--ep-timeout must lie in \[1, 86400\] seconds"):
        ExpertParallelOptions(timeout=0.5)


def moetrt(*args, env=None, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *map(str, args)], cwd=mpi.ROOT,
                          env=env or mpi.job_env(), capture_output=True, text=True, timeout=timeout)


def job(command: list[str], timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """Run an MPI job in its own session, then SIGKILL whatever of it is left (on a timeout the ranks would
    outlive their launcher); TimeoutExpired after `timeout` seconds."""
    process = subprocess.Popen(command, cwd=mpi.ROOT, env=mpi.job_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        mpi.kill_group(process)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.parametrize("options,named", [
    (["--expert-placement", "counts.json"], "--expert-placement only applies"),
    (["--record-routing", "out.json"], "--record-routing only applies"),
    (["--ep-combine", "alltoallv", "--ep-timeout", "5"], "--ep-combine, --ep-timeout only apply"),
])
def test_expert_parallel_options_without_expert_parallel_are_an_error(tmp_path, options, named):
    done = moetrt("generate", tmp_path / "engine", "hi", *options)
    assert done.returncode == 1 and done.stderr == f"error: {named} with --expert-parallel\n", done.stderr


def test_a_short_ep_timeout_is_refused_before_mpi_starts(tmp_path):
    done = moetrt("generate", tmp_path / "engine", "hi", "--expert-parallel", "--ep-timeout", "0.5")
    assert done.returncode == 1 and done.stderr == "error: --ep-timeout must lie in [1, 86400] seconds, got 0.5\n", \
        done.stderr


# Runs the CLI with mpi4py unimportable, as after `pip install moetrt` without the mpi extra.
WITHOUT_MPI4PY = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "mpi4py":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = ["moetrt", *sys.argv[1:]]
from moetrt.cli import main
main()
"""


def test_expert_parallel_without_mpi4py_says_which_extra_to_install(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_MPI4PY, "generate", str(tmp_path / "engine"), "hi",
                           "--expert-parallel"], cwd=mpi.ROOT, env=mpi.job_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(r"error: --expert-parallel needs mpi4py .*No module named 'mpi4py'.*: "
                        r"pip install 'moetrt\[mpi\]'.*\n", done.stderr), done.stderr


# -- real jobs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel_engine(tiny_r1_quantized):
    """tiny-r1, float32, its routed experts in moetrt's CPU kernel (what --expert-parallel runs)."""
    return tiny_r1_quantized("none", "moetrt")


@pytest.fixture(scope="module")
def reference(kernel_engine):
    """mpi_helpers.workload on the single-process engine."""
    from moetrt.runtime.engine import Engine

    return mpi.workload(Engine.load(kernel_engine))


@pytest.fixture(scope="module")
def two_ranks(kernel_engine, tmp_path_factory):
    """mpi_helpers.workload under `mpiexec.gforker -n 2` with Engine.load(expert_parallel=...), and what scanning
    the job's process tree every 50 ms while it ran found: the processes (pid: command line, rank or None), the
    scans that saw both ranks alive, and every TCP/UDP socket seen."""
    if mpi.mpi_available():
        pytest.skip(mpi.mpi_available())
    work = tmp_path_factory.mktemp("ep2")
    process = mpi.start(mpi.driver_job(2, "workload", kernel_engine, work / "out.json", "--ep"), work / "log")
    processes: dict[int, tuple[str, int | None]] = {}
    sockets: set[mpi.InetSocket] = set()
    scans_with_both_ranks = 0
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            tree = mpi.process_tree(process.pid)
            ranks = mpi.ranks_of(process.pid)
            for pid in tree:
                # a process seen while it execs has an empty command line, and a rank is known only once it
                # registered: keep what later scans learn
                command, rank = processes.get(pid, ("", None))
                processes[pid] = (command or " ".join(mpi.command_line(pid)),
                                  rank if rank is not None else next((r for r, p in ranks.items() if p == pid), None))
            sockets.update(mpi.inet_sockets(tree))
            scans_with_both_ranks += len(ranks) == 2
            time.sleep(0.05)
    finally:
        mpi.kill_group(process)
    log = (work / "log").read_text()
    assert process.returncode == 0, log
    return {"out": json.loads((work / "out.json").read_text()), "processes": processes, "sockets": sockets,
            "scans": scans_with_both_ranks}


@needs_mpi
def test_two_ranks_generate_the_single_process_greedy_tokens(reference, two_ranks):
    assert len(reference["batch"]) == len(mpi.PROMPTS) >= 4 and len({len(p) for p in mpi.PROMPTS}) > 1
    assert two_ranks["out"]["batch"] == reference["batch"]


@needs_mpi
def test_two_ranks_give_the_single_process_logits_up_to_summation_order(reference, two_ranks):
    want, got = np.array(reference["logits"]), np.array(two_ranks["out"]["logits"])
    assert got.shape == want.shape == (len(mpi.LOGIT_IDS), len(mpi.LOGIT_IDS[0]), got.shape[-1])
    assert np.abs(got - want).max() <= LOGIT_TOLERANCE * np.abs(want).max()


@needs_mpi
def test_requests_joining_at_different_times_get_their_solo_tokens_on_two_ranks(reference, two_ranks):
    assert reference["scheduled"] == reference["solo"]  # the single process's continuous batching, as a check
    assert two_ranks["out"]["scheduled"] == reference["solo"]
    assert two_ranks["out"]["solo"] == reference["solo"]


@needs_mpi
def test_a_two_rank_job_holds_no_socket_off_loopback(two_ranks):
    """Every TCP/UDP socket of gforker and both ranks, scanned throughout the job, is on 127.0.0.0/8 or ::1 (the
    launch this project documents opens none). The scan must have seen the launcher and both ranks."""
    processes = two_ranks["processes"]
    assert any("mpiexec.gforker" in command for command, _ in processes.values()), processes
    assert sorted(rank for _, rank in processes.values() if rank is not None) == [0, 1], processes
    assert two_ranks["scans"] >= 3, "the scan must have run while both ranks were alive"
    assert mpi.off_loopback(sorted(two_ranks["sockets"], key=str)) == []


def test_the_socket_scan_sees_sockets_and_tells_loopback_from_the_network():
    """The scanner finds this process's own sockets: one on 127.0.0.1 (loopback), one on 0.0.0.0 (not)."""
    import os
    import socket

    with socket.socket() as local, socket.socket() as everywhere, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
        local.bind(("127.0.0.1", 0))
        local.listen()
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        datagram.bind(("127.0.0.1", 0))
        found = {(s.kind, s.local) for s in mpi.inet_sockets([os.getpid()])}
        assert ("tcp", local.getsockname()) in found and ("udp", datagram.getsockname()) in found
        assert ("tcp", everywhere.getsockname()) in found
        off = mpi.off_loopback(mpi.inet_sockets([os.getpid()]))
        assert [s.local for s in off if s.kind == "tcp"] == [everywhere.getsockname()]
    assert mpi.is_loopback("127.3.4.5") and mpi.is_loopback("::1") and mpi.is_loopback("::ffff:127.0.0.1")
    assert not mpi.is_loopback("0.0.0.0") and not mpi.is_loopback("::") and not mpi.is_loopback("10.0.0.1")


@needs_mpi
def test_the_cli_under_two_ranks_prints_what_one_process_prints(kernel_engine):
    args = ["generate", kernel_engine, "12+35=", "--raw", "--greedy", "--json", "-n", "30"]
    one = moetrt(*args)
    two = job(mpi.moetrt_job(2, *args, "--expert-parallel"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert json.loads(one.stdout)["usage"]["completion_tokens"] > 5
    assert two.stdout == one.stdout


@needs_mpi
def test_alltoallv_combine_on_an_int8_engine_matches_one_process(tiny_r1_quantized):
    engine = tiny_r1_quantized("int8", "moetrt")  # shared with tests/export/test_quantized_engine.py
    args = ["generate", engine, "123-45=", "--raw", "--greedy", "--json", "-n", "30"]
    one = moetrt(*args)
    two = job(mpi.moetrt_job(2, *args, "--expert-parallel", "--ep-combine", "alltoallv"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout == one.stdout


@needs_mpi
@pytest.mark.slow
def test_four_ranks_with_alltoallv_give_the_single_process_results(kernel_engine, reference, tmp_path):
    process = mpi.start(mpi.driver_job(4, "workload", kernel_engine, tmp_path / "out.json", "--ep", "--combine",
                                       "alltoallv"), tmp_path / "log")
    try:
        assert process.wait(timeout=JOB_TIMEOUT * 2) == 0, (tmp_path / "log").read_text()
    finally:
        mpi.kill_group(process)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["batch"] == reference["batch"] and out["scheduled"] == reference["solo"]
    want = np.array(reference["logits"])
    assert np.abs(np.array(out["logits"]) - want).max() <= LOGIT_TOLERANCE * np.abs(want).max()


@pytest.fixture(scope="module")
def onnxruntime_engine(tiny_r1_quantized):
    """tiny-r1 with its experts in onnxruntime's MoE op (shared with tests/export/test_verify_kl.py)."""
    return tiny_r1_quantized("int4", "onnxruntime")


@needs_mpi
def test_expert_parallel_on_an_engine_without_the_cpu_kernel_names_the_fix(onnxruntime_engine):
    engine = onnxruntime_engine
    done = job(mpi.moetrt_job(1, "generate", engine, "1+1=", "--raw", "--expert-parallel"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --expert-parallel runs engines"), \
        done.stderr
    assert "rebuild it with `--moe-kernel moetrt`" in done.stderr


@needs_mpi
def test_two_ranks_that_both_fail_to_load_end_with_the_error(onnxruntime_engine):
    """Every rank refuses the engine: each prints the one line and the job ends at once (the ranks' exit handlers
    meet in the loading barrier and the stop message instead of waiting STARTUP_TIMEOUT for each other)."""
    engine = onnxruntime_engine
    done = job(mpi.moetrt_job(2, "generate", engine, "1+1=", "--raw", "--expert-parallel"), timeout=30)
    assert done.returncode == 1 and "rebuild it with `--moe-kernel moetrt`" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@needs_mpi
def test_routing_counts_of_another_engine_are_refused_under_mpi(kernel_engine, tmp_path):
    write_routing_counts(tmp_path / "counts.json", RoutingCounts(4, ((1, 2, 3, 4),)))
    done = job(mpi.moetrt_job(1, "generate", kernel_engine, "1+1=", "--raw", "--expert-parallel",
                              "--expert-placement", tmp_path / "counts.json"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.fullmatch(r"error: the routing counts describe 1 MoE layers of 4 experts, this engine has \d+ of \d+; "
                        r"record them on this engine \(`--record-routing FILE`\)\n", done.stderr), done.stderr


@needs_mpi
def test_concurrent_streams_from_a_two_rank_server_equal_each_request_alone(kernel_engine, tmp_path):
    """`mpiexec.gforker -n 2 moetrt serve --expert-parallel` on 127.0.0.1: each of several streaming completions
    sent together (they join the running batch at different steps) equals the same request sent alone, which
    equals the single-process engine's greedy text; every socket of the job's processes is on loopback, the
    server's listener among them (so the scan sees this tree's sockets)."""
    import asyncio

    import httpx

    from moetrt.runtime.engine import Engine

    prompts = [prompt for prompt, _ in mpi.STAGGERED]
    process, url = mpi.start_server(kernel_engine, tmp_path / "log", 2)
    try:
        async def stream(client: httpx.AsyncClient, prompt: str, delay: float) -> str:
            await asyncio.sleep(delay)
            body = {"model": kernel_engine.name, "prompt": prompt, "max_tokens": mpi.NEW_TOKENS, "temperature": 0,
                    "stream": True}
            text = []
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        text.extend(choice["text"] for choice in json.loads(line[6:])["choices"])
            return "".join(text)

        async def run(together: bool) -> list[str]:
            async with httpx.AsyncClient(timeout=120) as client:
                if not together:
                    return [await stream(client, prompt, 0) for prompt in prompts]
                return list(await asyncio.gather(*(stream(client, p, 0.05 * i) for i, p in enumerate(prompts))))

        alone = asyncio.run(run(together=False))
        together = asyncio.run(run(together=True))
        tree = mpi.process_tree(process.pid)
        sockets = mpi.inet_sockets(tree)
        ranks = mpi.ranks_of(process.pid)
    finally:
        mpi.kill_group(process)
    engine = Engine.load(kernel_engine)
    want = [engine.generate(p, max_new_tokens=mpi.NEW_TOKENS, greedy=True) for p in prompts]
    assert alone == [engine.tokenizer.decode(w.token_ids[:-1] if w.finish_reason == "stop" else w.token_ids)
                     for w in want]  # a raw completion keeps <think> tags; the stop token is not text
    assert together == alone
    assert sorted(ranks) == [0, 1]
    port = int(url.rsplit(":", 1)[1])
    assert any(s.kind == "tcp" and s.local == ("127.0.0.1", port) for s in sockets), sockets
    assert mpi.off_loopback(sockets) == []


# -- rough edges found by a break test ------------------------------------------------------------------------------

@pytest.mark.parametrize("timeout", [0.5, float("inf"), 1e12, float("nan")])
def test_a_timeout_outside_a_second_to_a_day_is_refused(timeout):
    with pytest.raises(MoetrtError, match=r"--ep-timeout must lie in \[1, 86400\] seconds"):
        ExpertParallelOptions(timeout=timeout)


def test_only_a_launcher_without_hydras_variables_gets_ascii_escaped_output():
    from moetrt.runtime.parallel.group import ascii_output_only

    assert ascii_output_only({"PMI_FD": "8", "PMI_RANK": "0", "PMI_SIZE": "2"})  # MPICH's gforker
    assert not ascii_output_only({"PMI_FD": "9", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "PMI_HOSTNAME": "vm"})
    assert not ascii_output_only({})  # no launcher


@needs_mpi
def test_under_gforker_non_ascii_output_arrives_as_escapes_with_everything_after_it(kernel_engine):
    """gforker stops forwarding a stream at its first non-ASCII byte; tiny-r1's chat output starts with
    "Thinking…": the reply must arrive whole, the ellipsis as an escape."""
    done = job(mpi.moetrt_job(2, "generate", kernel_engine, "What is 2+3?", "--expert-parallel", "--greedy",
                              "-n", "24"))
    assert done.returncode == 0, done.stderr
    alone = subprocess.run([sys.executable, "-m", "moetrt.cli", "generate", str(kernel_engine), "What is 2+3?",
                            "--greedy", "-n", "24"], capture_output=True, text=True, env=mpi.job_env(), timeout=120)
    assert "Thinking\\u2026" in done.stdout and "…" in alone.stdout, (done.stdout, alone.stdout)
    assert done.stdout.encode().decode("unicode_escape") == alone.stdout


@needs_mpi
def test_an_unwritable_record_routing_path_is_refused_before_any_work(kernel_engine, tmp_path):
    done = job(mpi.moetrt_job(1, "generate", kernel_engine, "1+1=", "--raw", "--expert-parallel",
                              "--record-routing", tmp_path / "missing-dir" / "counts.json"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.fullmatch(r"error: cannot write --record-routing \S+counts\.json \(No such file or directory\); give "
                        r"a writable path\n", done.stderr), done.stderr
    assert done.stdout == ""


@needs_mpi
def test_ranks_launched_without_expert_parallel_get_a_warning_once(kernel_engine):
    done = job(mpi.moetrt_job(2, "generate", kernel_engine, "1+1=", "--raw", "--greedy", "-n", "2", "--json"))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: launched as one of 2 MPI ranks without --expert-parallel: every rank runs the "
                        "whole command on its own; add --expert-parallel to split the experts over them"], done.stderr
    assert len(done.stdout.splitlines()) == 2  # two independent answers


@needs_mpi
def test_a_second_expert_parallel_engine_in_one_job_is_refused_at_once(kernel_engine, tmp_path):
    script = tmp_path / "twice.py"
    script.write_text(
        "import sys\n"
        "from moetrt.errors import MoetrtError\n"
        "from moetrt.runtime.engine import Engine\n"
        f"first = Engine.load({str(kernel_engine)!r}, expert_parallel=True)\n"
        "try:\n"
        f"    Engine.load({str(kernel_engine)!r}, expert_parallel=True)\n"
        "except MoetrtError as error:\n"
        "    print('refused:', error)\n"
        "print(first.generate('1+1=', max_new_tokens=2, greedy=True).token_ids)\n")
    done = job(mpi.gforker(2, sys.executable, script), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: this MPI job already runs an expert-parallel engine"), done.stdout
