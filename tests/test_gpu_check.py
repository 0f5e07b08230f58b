"""`make gpu-check`: refuses clearly without a GPU, then runs every test marked `gpu`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    guard, run = done.stdout.strip().splitlines()
    assert guard == "python -m tests.gpu_check"
    assert "python -m pytest" in run and "-m gpu" in run
