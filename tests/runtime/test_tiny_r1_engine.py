"""The embedded model's engine, built as `make build-engine` builds it: verify passes, eval answers as the
reference does, and generation shows R1's thinking and answer apart."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY_R1 = Path(__file__).parents[2] / "models" / "tiny-r1"


def moetrt_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-r1"
    result = moetrt_cli("build-engine", TINY_R1, "-o", out, "--backend", "auto")
    assert result.returncode == 0, result.stderr
    return out


def test_verify_passes_with_the_references_task_accuracy(engine):
    result = moetrt_cli("verify", engine, TINY_R1, "--prompts", "4", "--task-problems", "48", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["task"] == "arithmetic"
    assert report["engine_accuracy"] == report["reference_accuracy"] and report["answers_differing"] == 0
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"] <= 1e-3  # fp32: 1e-4 + 1e-5 * max |logit|


def test_eval_of_the_engine_answers_as_the_checkpoint_does(engine):
    runs = [moetrt_cli("eval", source, "-n", "40", "--seed", "7", "--json") for source in (engine, TINY_R1)]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    ours, theirs = (json.loads(run.stdout) for run in runs)
    assert [p["predicted"] for p in ours["problems"]] == [p["predicted"] for p in theirs["problems"]]
    assert [p["output"] for p in ours["problems"]] == [p["output"] for p in theirs["problems"]]
    assert ours["accuracy"] == theirs["accuracy"] >= 0.5


def test_generate_splits_thinking_from_the_answer(engine):
    result = moetrt_cli("generate", engine, "What is 4827 + 593?", "--greedy", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    # The scratchpad's first line restates the problem; the answer line parses whatever the model computed.
    assert reply["reasoning"].startswith("4827+0593\n") and "</think>" not in reply["reasoning"] + reply["text"]
    assert reply["text"].startswith("4827 + 593 = ")


def test_info_describes_the_engine_and_its_model(engine):
    result = moetrt_cli("info", engine)
    assert result.returncode == 0, result.stderr
    assert "deepseek_v3: 4 layers (1 dense, 3 MoE)" in result.stdout
    manifest = json.loads((engine / "manifest.json").read_text())
    assert f"engine           {manifest['backend']} (" in result.stdout and "batch 8, 512 tokens per call" in result.stdout
