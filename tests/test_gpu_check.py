"""`make gpu-check`: refuses clearly without a GPU, then runs every test marked `gpu`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Under `make test` a child make inherits MAKELEVEL/MAKEFLAGS and prints "Entering directory" lines: not here.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_cuda_fails_with_one_line():
    done = subprocess.run([sys.executable, "-m", "tests.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("gpu-check: no CUDA GPU") and done.stderr.count("\n") == 1


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_runs_the_guard_then_pytest_on_the_gpu_tests():
    # -n: print the recipe, run nothing; -o: take the venv as installed, never (re)install it from here.
    command = ["make", "-n", "-o", ".venv/.installed-stamp", "gpu-check", "VENV=.venv", "PY=python"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True, env=MAKE_ENV)
    guard, run = done.stdout.strip().splitlines()
    assert guard == "python -m tests.gpu_check"
    assert "python -m pytest" in run and "-m gpu" in run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_quick_without_cuda_fails_with_one_line(tmp_path):
    report = tmp_path / "quick.md"
    done = subprocess.run([sys.executable, "-m", "tests.gpu_check_quick", "--out", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("gpu-check-quick: no CUDA GPU") and done.stderr.count("\n") == 1
    assert not report.exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_quick_needs_no_install():
    """A bare GPU machine has no venv: the target runs python3 straight from the checkout."""
    command = ["make", "-n", "gpu-check-quick", "VENV=/nonexistent", "PY=/nonexistent/bin/python"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True, env=MAKE_ENV)
    assert done.stdout.strip() == "python3 -m tests.gpu_check_quick --out bench/results/gpu_check_quick.md"


def test_the_quick_selection_collects_only_gpu_tests():
    from tests.gpu_check_quick import SELECTION

    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *SELECTION], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(collected) >= 20 and all(line.startswith(("tests/plugins/gpu/", "tests/runtime/test_cuda_memory"))
                                        for line in collected)
    unmarked = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "-m", "not gpu", *SELECTION], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "::" not in unmarked.stdout  # every selected test is marked gpu


def test_the_quick_timings_are_the_engines_kernels_at_three_token_counts():
    from moetrt.bench.gpu_experts import parse_args
    from tests.gpu_check_quick import BENCH_ARGS

    args = parse_args(list(BENCH_ARGS))
    assert args.experts == [256] and args.tokens == [1, 64, 4096] and args.paths[0] == "engine"
    assert args.advisory_targets


def test_a_checkout_that_is_not_installed_imports_its_folders_as_moetrt():
    """As on a bare GPU machine: without the editable install's finder, tests.checkout maps the folders."""
    script = ("import sys, importlib.util; "
              "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]; "
              "assert importlib.util.find_spec('moetrt.plugins') is None, 'the editable install still maps moetrt'; "
              "from tests.checkout import make_importable; make_importable(); "
              "import moetrt.plugins.moe_launch as m, moetrt.bench.gpu_experts as b; print(m.__file__, b.__file__)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    launch, bench = done.stdout.split()
    assert launch == str(ROOT / "plugins" / "moe_launch.py") and bench == str(ROOT / "bench" / "gpu_experts.py")
