"""`make gpu-check-quick`: the GPU checks that fit one lent H200 in 8 minutes from a bare machine (torch, Triton and
cuda-python; no TensorRT, no network, moetrt not installed), reported in one markdown file.

1. A trimmed correctness set of the tests marked `gpu` (SELECTION): the stage nodes chained as a TensorRT engine runs
   them, JIT and AOT, on both tactics; each stage kernel on autotuner-like garbage in guarded buffers; the PTX at the
   ISA a CUDA 12 TensorRT takes; the session's CUDA layer, recovery from a failed capture included; one Triton shape.
2. The engine's own stage kernels timed at T = 1, 64, 4096 at DeepSeek-V3's expert shapes (E=256, H=7168, I=2048,
   k=8, bf16) as GB/s and TFLOP/s against 4.8 TB/s and ~790 TFLOP/s (bench/gpu_experts.py), beside the JIT kernels
   and the torch reference.

    python -m tests.gpu_check_quick [--out bench/results/gpu_check_quick.md]

Exits 1 with one line where torch sees no GPU; otherwise 1 when a check fails or a phase runs out of its time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tests.checkout import ROOT, make_importable

SELECTION = (
    "tests/plugins/gpu/test_stage_plugins.py",
    "tests/plugins/gpu/test_aot_launch.py::test_driver_launched_ptx_matches_the_reference[48KiB]",
    "tests/plugins/gpu/test_aot_launch.py::test_driver_launched_ptx_matches_the_reference[48KiB-cuda12-tensorrt]",
    "tests/runtime/test_cuda_memory.py",
    "tests/plugins/gpu/test_triton_experts.py::"
    "test_triton_matches_the_reference_writes_every_row_and_repeats_bitwise[T300-H1000-I520-E64-k8-bfloat16]",
)
BENCH_ARGS = ("--experts", "256", "--tokens", "1", "64", "4096", "--paths", "engine", "triton", "reference",
              "--advisory-targets")
BUDGET_S = 8 * 60 - 30  # the whole check, less the machine's Python and torch start-up
PYTEST_S = 270  # with 4 workers where pytest-xdist is installed: compiling the kernels dominates
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check_quick.md"


def pytest_command() -> list[str]:
    workers = ["-n", "4", "--dist", "loadfile"] if importlib.util.find_spec("xdist") else []
    return [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *workers, *SELECTION]


def bench_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "tests.gpu_check_quick", "--bench", *BENCH_ARGS, "--out", str(out)]


def run_phase(command: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, output, seconds) of `command`, its output echoed as it comes."""
    start = time.perf_counter()
    env = {**os.environ, "MOETRT_QUIET": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        print(output, end="")
        return None, output, time.perf_counter() - start
    print(output, end="")
    return process.returncode, output, time.perf_counter() - start


def machine_line() -> str:
    import torch
    import triton

    from moetrt import hardware

    driver = hardware.cuda_driver_version() or 0
    return (f"{torch.cuda.get_device_name()}, CUDA driver {driver // 1000}.{driver % 1000 // 10}, torch "
            f"{torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def verdict(name: str, status: int | None, seconds: float) -> str:
    state = "timed out" if status is None else ("passed" if status == 0 else f"FAILED (exit {status})")
    return f"- {name}: {state} in {seconds:.0f} s"


def quick_check(out: Path) -> int:
    make_importable()
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    bench_out = out.with_name(out.stem + "_timings.md")
    header = f"# gpu-check-quick\n\n{machine_line()}\n"
    out.write_text(header + "\n(running)\n")
    tests_status, tests_output, tests_s = run_phase(pytest_command(), PYTEST_S)
    remaining = BUDGET_S - (time.perf_counter() - started)
    bench_status, bench_output, bench_s = run_phase(bench_command(bench_out), max(remaining, 30))
    timings = bench_out.read_text() if bench_out.is_file() else "(no timings written)\n" + bench_output[-3000:]
    summary = "\n".join([verdict("correctness (pytest -m gpu, " + str(len(SELECTION)) + " selections)",
                                 tests_status, tests_s),
                         verdict("timings (bench/gpu_experts.py " + " ".join(BENCH_ARGS) + ")", bench_status, bench_s)])
    tail = "\n".join(tests_output.strip().splitlines()[-40:])
    out.write_text(f"{header}\n## Verdict\n\n{summary}\n\n## Correctness\n\n```\n{tail}\n```\n\n"
                   f"## Timings\n\n{timings.replace('# ', '### ', 1)}")
    bench_out.unlink(missing_ok=True)
    print(f"\n{summary}\nwrote {out}")
    return 0 if tests_status == 0 and bench_status == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bench"]:  # the timing phase, in its own process
        make_importable()
        from moetrt.bench.gpu_experts import main as bench

        return bench(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown report")
    args = parser.parse_args(argv)
    from tests.gpu_check import main as guard

    return guard("gpu-check-quick") or quick_check(args.out)


if __name__ == "__main__":
    sys.exit(main())
