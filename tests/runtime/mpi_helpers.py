"""Launching expert-parallel jobs in tests, and looking at them from outside.

- `gforker(n, *args)`: the command line of an `mpiexec.gforker -n N` job (MPICH's launcher that forks every rank
  on this host and opens no sockets of its own), `job_env()` its environment (the venv's bin on PATH: gforker
  execs the program by name).
- `process_tree`, `ranks_of`: the launcher's processes (from /proc), and each rank's pid (its `PMI_RANK`).
- `inet_sockets`: every TCP/UDP socket (IPv4 and IPv6) a set of processes holds, from /proc/PID/fd matched
  against /proc/net/{tcp,tcp6,udp,udp6}, with both addresses decoded; `is_loopback` says whether an address is
  127.0.0.0/8 or ::1 (an IPv4-mapped ::ffff:127.x too).
- `python -m tests.runtime.mpi_helpers MODE ENGINE ...`: the driver every rank of a test job runs (`main`).
  `workload` (the same function the tests run in one process for the reference) writes greedy token ids of a
  batch, Engine.logits and a continuous-batching run with staggered joins; `spin` generates until killed,
  printing a line once rank 0 has loaded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# Prompts of different lengths (tiny-r1's arithmetic), and the length of each greedy continuation.
PROMPTS = ["12+35=", "7*8=", "123-45=", "9+9+9+9+9=", "1000-1=", "3*"]
NEW_TOKENS = 24
# Staggered joins for the scheduler: (prompt, tokens of the previous request seen before this one is submitted).
STAGGERED = [("123-45=", 0), ("7*8=", 3), ("9+9+9+9+9=", 5), ("3*", 1)]
LOGIT_IDS = [[5, 17, 23, 9, 41, 12, 7, 33], [60, 2, 14, 14, 8, 51, 19, 3], [1, 1, 2, 3, 5, 8, 13, 21]]


def mpi_available() -> str | None:
    """None when this environment can launch MPI jobs (mpiexec.gforker beside the venv's python and mpi4py
    importable), else why not."""
    if not (VENV_BIN / "mpiexec.gforker").is_file():
        return f"no mpiexec.gforker in {VENV_BIN} (pip install 'moetrt[mpi]')"
    try:
        import mpi4py  # noqa: F401  (importing the package does not start MPI)
    except ImportError:
        return "mpi4py is not installed (pip install 'moetrt[mpi]')"
    return None


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a test job: this one with the venv's bin first on PATH, MOETRT_QUIET=1, and `extra`."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MOETRT_QUIET": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def gforker(ranks: int, *args: str | Path) -> list[str]:
    """`mpiexec.gforker -n ranks ARGS...` with the venv's launcher."""
    return [str(VENV_BIN / "mpiexec.gforker"), "-n", str(ranks), *map(str, args)]


def moetrt_job(ranks: int, *args: str | Path) -> list[str]:
    """The CLI under gforker: `mpiexec.gforker -n ranks moetrt ARGS...`."""
    return gforker(ranks, str(VENV_BIN / "moetrt"), *args)


def driver_job(ranks: int, *args: str | Path) -> list[str]:
    """This module's driver (`main`) under gforker."""
    return gforker(ranks, sys.executable, "-m", "tests.runtime.mpi_helpers", *args)


def start(command: list[str], log: Path, errors: Path | None = None) -> subprocess.Popen:
    """Start `command` in its own session (so `kill_group` ends all it started), in the repository root with
    `job_env()`: its stdout into `log`, its stderr into `errors` (default: `log` too)."""
    with open(log, "wb") as out, open(errors or os.devnull, "wb") as err:
        return subprocess.Popen(command, cwd=ROOT, env=job_env(), stdout=out,
                                stderr=err if errors else subprocess.STDOUT, start_new_session=True)


def gone(pid: int) -> bool:
    """The process has ended (a zombie its parent has not reaped yet counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_gone(pids: list[int], timeout: float) -> bool:
    """True once every pid has ended, False if one still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return all(gone(pid) for pid in pids)


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `text` appears in the file `path`; AssertionError if `process` ends first or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear (exit status {process.poll()}):\n{path.read_text()}")


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL every process of `process`'s session (its group) and reap it; for finally blocks."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def start_server(engine, log: Path, ranks: int = 2, *options: str | Path, timeout: float = 120):
    """`mpiexec.gforker -n ranks moetrt serve ENGINE --expert-parallel --port 0 OPTIONS` on 127.0.0.1, in its own
    session: (process, base url) once /health answers 200. AssertionError (the log attached) if it exits first or
    does not come up within `timeout` seconds; the caller kills the group (`kill_group`) in any case."""
    import re

    import httpx

    process = start(moetrt_job(ranks, "serve", engine, "--expert-parallel", "--port", "0", "--host", "127.0.0.1",
                               *options), log)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if found:
            url = found.group(1)
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not come up within {timeout}s (url {url}):\n{log.read_text()}")


# -- /proc ----------------------------------------------------------------------------------------------------

def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants alive now (breadth first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def ranks_of(root: int) -> dict[int, int]:
    """{rank: pid} of the MPI ranks under `root` (the processes whose environment has PMI_RANK)."""
    ranks = {}
    for pid in process_tree(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"PMI_RANK="):
                ranks[int(item[9:])] = pid
    return ranks


def wait_for_ranks(root: int, count: int, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} once `count` ranks run under `root`; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = ranks_of(root)
        if len(ranks) == count:
            return ranks
        time.sleep(0.05)
    raise AssertionError(f"{count} ranks did not start under pid {root} within {timeout}s (saw {ranks_of(root)})")


@dataclass(frozen=True)
class InetSocket:
    """A TCP or UDP socket of a process: `kind` tcp, tcp6, udp or udp6; addresses as (ip text, port)."""

    kind: str
    local: tuple[str, int]
    remote: tuple[str, int]
    pid: int


def socket_inodes(pids: list[int]) -> dict[int, int]:
    """{socket inode: pid} for every socket descriptor the processes hold."""
    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[int(target[8:-1])] = pid
    return inodes


def decode_address(text: str, ipv6: bool) -> tuple[str, int]:
    """/proc/net's `HEX_IP:HEX_PORT` (the IP as 32-bit words in host byte order, little-endian here) -> text."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return socket.inet_ntop(socket.AF_INET6 if ipv6 else socket.AF_INET, words), int(port, 16)


def inet_sockets(pids: list[int]) -> list[InetSocket]:
    """The TCP and UDP sockets (IPv4 and IPv6) the processes `pids` hold."""
    inodes = socket_inodes(pids)
    found = []
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{kind}").read_text().splitlines()[1:]
        except OSError:  # a kernel without IPv6
            continue
        for line in lines:
            fields = line.split()
            inode = int(fields[9])
            if inode in inodes:
                ipv6 = kind.endswith("6")
                found.append(InetSocket(kind, decode_address(fields[1], ipv6), decode_address(fields[2], ipv6),
                                        inodes[inode]))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1 (or an IPv4-mapped loopback address). The unspecified address (0.0.0.0, ::) is not:
    a listener bound there takes connections from every network."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_unconnected(address: tuple[str, int]) -> bool:
    """A remote address of a listening or unconnected socket (0.0.0.0:0 or [::]:0)."""
    return address[1] == 0 and ipaddress.ip_address(address[0]).is_unspecified


def off_loopback(sockets: list[InetSocket]) -> list[InetSocket]:
    """The sockets whose local address, or remote address when connected, is not loopback."""
    return [s for s in sockets if not is_loopback(s.local[0])
            or not (is_unconnected(s.remote) or is_loopback(s.remote[0]))]


# -- the driver the ranks run ---------------------------------------------------------------------------------

def workload(engine, new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy token ids of PROMPTS as one batch, Engine.logits of LOGIT_IDS, and a continuous-batching run with
    joins at different times (STAGGERED) plus each of its prompts generated alone; JSON-ready."""
    import numpy as np

    from moetrt.runtime.scheduler import Scheduler

    batch = engine.generate(PROMPTS, max_new_tokens=new_tokens, greedy=True)
    logits = engine.logits(np.array(LOGIT_IDS, dtype=np.int64))
    options = engine.options(max_new_tokens=new_tokens, greedy=True)
    scheduled: list[list[int]] = [[] for _ in STAGGERED]
    streams = []
    with Scheduler(engine.session, engine.tokenizer, max_context=engine.max_context, max_batch=4) as scheduler:
        for index, (prompt, seen_before) in enumerate(STAGGERED):
            for _ in range(seen_before if streams else 0):  # the previous request runs on meanwhile
                event = next(streams[-1], None)
                if event is not None:
                    scheduled[index - 1].extend(event.token_ids)
            streams.append(scheduler.submit(engine.encode(prompt), options).events())
        for tokens, stream in zip(scheduled, streams):
            for event in stream:
                tokens.extend(event.token_ids)
    solo = [engine.generate(prompt, max_new_tokens=new_tokens, greedy=True).token_ids for prompt, _ in STAGGERED]
    return {"batch": [result.token_ids for result in batch], "logits": logits.tolist(), "scheduled": scheduled,
            "solo": solo}


def main(argv: list[str]) -> int:
    """`workload ENGINE OUT [--ep] [--combine C] [--new-tokens N]`: write `workload`'s JSON to OUT (rank 0).
    `spin ENGINE [--ep] [--ep-timeout S]`: print `loaded` once rank 0 has the engine, then generate until killed.
    With --ep the engine loads with expert parallelism (ranks other than 0 never return from Engine.load)."""
    from moetrt.runtime.engine import Engine
    from moetrt.runtime.parallel.options import ExpertParallelOptions

    mode, engine_dir, *rest = argv
    options = None
    if "--ep" in rest:
        combine = rest[rest.index("--combine") + 1] if "--combine" in rest else "allreduce"
        timeout = float(rest[rest.index("--ep-timeout") + 1]) if "--ep-timeout" in rest else 20.0
        options = ExpertParallelOptions(combine=combine, timeout=timeout)  # type: ignore[arg-type]
    engine = Engine.load(engine_dir, expert_parallel=options)
    if mode == "workload":
        new_tokens = int(rest[rest.index("--new-tokens") + 1]) if "--new-tokens" in rest else NEW_TOKENS
        Path(rest[0]).write_text(json.dumps(workload(engine, new_tokens)))
        return 0
    if mode == "spin":
        print(f"loaded pid {os.getpid()}", flush=True)
        while True:
            engine.generate(PROMPTS[:2], max_new_tokens=64, greedy=True)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
