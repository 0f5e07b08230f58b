"""Issue 22's targets on the Moonlight-16B-A3B-shaped FP8 checkpoint (bench/moonlight.py, 16.6 GB): `slow` (about
half an hour on 2 cores, and 10-30 GB of disk), never in CI; `make test-slow` runs it.

The checkpoint is MOETRT_MOONLIGHT_DIR, else bench/checkpoints/moonlight (`make moonlight`) when it is there, else
written to a temporary directory. Each command runs in its own process, which prints its peak RSS (the kernel's
VmHWM) as it exits: the int4 build must peak at 3 GB or less, `verify --stream-reference` at the engine's own bytes
plus 2 GB or less.

Fidelity: these random weights are chaotic. Rounding them to int8 alone (no engine) moves the next-token
distributions by a mean KL of 0.11 nats, int4 by 0.40, about as far as unrelated distributions of this model are
(bench/NOTES.md), so `verify` FAILs the int4 thresholds on any engine and the test does not require it to pass.
What it requires instead is that the engine adds little to its weights' rounding: KL(rounded reference || engine)
well below KL(reference || rounded reference) (`bench/moonlight.py --kl-source`), which a wrong weight, scale or
expert would not give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moonlight(tmp_path_factory) -> Path:
    for candidate in (os.environ.get("MOETRT_MOONLIGHT_DIR"), ROOT / "bench" / "checkpoints" / "moonlight"):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    from moetrt.bench.moonlight import write_moonlight

    return Path(write_moonlight(tmp_path_factory.mktemp("moonlight") / "checkpoint"))


# Runs `python -m MODULE ARGS...` in this process and prints its peak RSS (VmHWM, kB) to stderr at exit.
PEAK = """
import atexit, runpy, sys
def peak():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("peak-rss-kb", hwm.split()[1], file=sys.stderr)
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run(module: str, *args) -> tuple[subprocess.CompletedProcess, int]:
    """`python -m module args...` in a child: (its result, its peak RSS in bytes)."""
    done = subprocess.run([sys.executable, "-c", PEAK, module, *map(str, args)], capture_output=True, text=True,
                          timeout=3 * 3600, env={**os.environ, "MOETRT_QUIET": "1"})
    marks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("peak-rss-kb ")]
    assert marks, done.stderr[-2000:]
    return done, int(marks[-1]) * 1024


@pytest.mark.timeout(3 * 3600)  # pyproject's 900 s is for CI's tests: this one takes about 40 minutes
def test_int4_build_verify_and_decode_on_the_moonlight_shape(moonlight, tmp_path):
    engine = tmp_path / "engine"
    build, build_peak = _run("moetrt.cli", "build-engine", moonlight, "-o", engine, "--quantize", "int4")
    assert build.returncode == 0, build.stderr[-2000:]
    engine_bytes = sum(path.stat().st_size for path in engine.rglob("*") if path.is_file())
    print(f"build: peak RSS {build_peak / 1e9:.2f} GB, engine {engine_bytes / 1e9:.2f} GB")
    assert build_peak <= 3e9

    verify, verify_peak = _run("moetrt.cli", "verify", engine, moonlight, "--prompts", "2", "--json",
                                   "--stream-reference")
    assert verify.returncode in (0, 1), verify.stderr[-2000:]  # 1: FAIL on KL (module docstring)
    report = json.loads(verify.stdout)
    print(f"verify: peak RSS {verify_peak / 1e9:.2f} GB; mean KL {report['kl_mean']:.3g}, p99 {report['kl_p99']:.3g}, "
          f"top-1 {report['top1_agreement']:.1%}")
    assert verify_peak <= engine_bytes + 2e9

    split, _ = _run("moetrt.bench.moonlight", moonlight, "--kl-source", engine, "--sequences", "3")
    assert split.returncode == 0, split.stderr[-2000:]
    kl = {pair: stats["kl_mean"] for pair, stats in json.loads(split.stdout[split.stdout.index("{"):]).items()}
    print(f"KL split: {kl}")
    assert kl["rounded-engine"] < 0.5 * kl["reference-rounded"], kl

    bench, _ = _run("moetrt.bench.moonlight", "--bench", engine)
    assert bench.returncode == 0, bench.stderr[-2000:]
    figures = json.loads(bench.stdout)
    print(f"decode: b1 {figures['b1']:.2f} tok/s ({figures['roofline_fraction_b1']:.0%} of the roofline), "
          f"b8 {figures['b8']:.2f} tok/s, TTFT(512) {figures['ttft512']:.1f} s")
    assert figures["b1"] > 0 and figures["b8"] > 0
