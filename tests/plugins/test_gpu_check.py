"""`make gpu-check`: refuses clearly without a GPU, runs its logic on the CPU with --dry-run, passes on a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def gpu_check(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moetrt.plugins.gpu_check", *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_cuda_fails_with_one_line():
    done = gpu_check()
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("gpu-check: no CUDA GPU") and done.stderr.count("\n") == 1


def test_gpu_check_dry_run_passes_on_the_cpu():
    done = gpu_check("--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "driver launch skipped" in done.stdout
    assert done.stdout.rstrip().endswith("gpu-check: PASS")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_gpu_check_correctness_and_aot_launches_pass_on_a_gpu():
    done = gpu_check("--skip-bench")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
