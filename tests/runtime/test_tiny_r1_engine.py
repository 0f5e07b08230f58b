"""The embedded model's engine, built as `make build-engine` builds it: verify passes, eval answers as the
reference does, and generation shows R1's thinking and answer apart. Its float16 engine passes verify too."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moetrt.formats import read_manifest

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


def test_float16_engine_passes_verify_within_what_float16_arithmetic_moves(tmp_path):
    """On random-token prompts float16 moves tiny-r1's logits by about 2.3 whoever computes them (the engine, the
    torch reference in float16, transformers in float16), where the fixed float16 tolerance is 0.35; verify allows
    each position the tolerance plus twice the float16 reference's own distance from float32 there, and the engine's
    next-token KL stays ~1e-8. The same engine with its lm_head scaled by 1.1 fails."""
    out = tmp_path / "fp16"
    result = moetrt_cli("build-engine", TINY_R1, "-o", out, "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    result = moetrt_cli("verify", out, TINY_R1, "--prompts", "8", "--task-problems", "0", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["passed"], result.stdout + result.stderr
    print(f"float16: max |Δ| {report['max_abs_logit_diff']:.3g}, float16 reference "
          f"{report['dtype_reference_diff']:.3g}, share of the allowance {report['dtype_logit_share']:.2f}, "
          f"KL {report['kl_mean']:.2g}")
    assert report["logit_tolerance"] < report["max_abs_logit_diff"]  # the fixed tolerance alone would fail it
    assert report["dtype_logit_share"] <= 1.0 and report["dtype_reference_diff"] > 1.0
    assert report["kl_mean"] < 1e-6 and report["top1_agreement"] == 1.0 and report["greedy_failures"] == []

    head = _scale_lm_head(out, 1.1)
    result = moetrt_cli("verify", out, TINY_R1, "--prompts", "8", "--task-problems", "0", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and not report["passed"], result.stdout + result.stderr
    print(f"lm_head ({head}) x 1.1: share {report['dtype_logit_share']:.2f}")
    assert report["dtype_logit_share"] > 2.0


def _scale_lm_head(engine: Path, factor: float) -> str:
    """Multiply the engine's lm_head weight (the float16 initializer of shape [vocab, hidden] or its transpose that
    is not the input embedding) by `factor` in place, in its external data file; returns the initializer's name."""
    import numpy as np
    import onnx

    from moetrt.config import load_config

    config = load_config(TINY_R1)
    wanted = {(config.vocab_size, config.hidden_size), (config.hidden_size, config.vocab_size)}
    for path in sorted(engine.glob("*.onnx")):
        model = onnx.load(path, load_external_data=False)
        for tensor in model.graph.initializer:
            if (tuple(tensor.dims) in wanted and tensor.data_type == onnx.TensorProto.FLOAT16
                    and "embed_tokens" not in tensor.name):  # the input embedding has the same shape
                where = {entry.key: entry.value for entry in tensor.external_data}
                data = engine / where["location"]
                offset, length = int(where.get("offset", 0)), int(where["length"])
                raw = bytearray(data.read_bytes())
                values = np.frombuffer(bytes(raw[offset : offset + length]), np.float16) * np.float16(factor)
                raw[offset : offset + length] = values.astype(np.float16).tobytes()
                data.write_bytes(bytes(raw))
                return tensor.name
    raise AssertionError(f"no float16 lm_head initializer in {engine}")


def test_eval_of_the_engine_answers_as_the_checkpoint_does(engine):
    runs = [moetrt_cli("eval", source, "--num-problems", "40", "--seed", "7", "--json") for source in (engine, TINY_R1)]
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
    assert f"engine           {read_manifest(engine).backend}, float32, " in result.stdout
    assert "batch 8, 512 tokens per call" in result.stdout and "runs on          CPUExecutionProvider" in result.stdout


SCRATCHPAD_4827_593 = "4827+0593\n7+3+0=10\n2+9+1=12\n8+5+1=14\n4+0+1=05\n05420"


@pytest.mark.parametrize("budget", [0, 1, 2])
def test_a_thinking_budget_of_n_gives_exactly_n_thinking_tokens(engine, budget):
    from moetrt.runtime.engine import Engine

    loaded = Engine.load(engine)
    think_end = loaded.tokenizer.token_id("</think>")
    reply = loaded.chat([{"role": "user", "content": "What is 75 - 38?"}], greedy=True, max_reasoning_tokens=budget)
    assert reply.token_ids[: budget + 1] == [50, 50][:budget] + [think_end]  # "00", then the forced </think>
    assert reply.reasoning == "00"[:budget] and "</think>" not in reply.text


def test_after_a_forced_close_the_models_own_end_tag_stays_out_of_the_answer(engine):
    result = moetrt_cli("generate", engine, "What is 75 - 38?", "--greedy", "--max-reasoning-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["reasoning"] == "0075-" and reply["token_ids"][:6] == [50, 50, 57, 55, 47, 261]
    # tiny-r1 never saw a cut-short scratchpad: it writes the rest, then its own </think> (token 261 again), which
    # is dropped; what follows the forced close is the answer.
    assert reply["token_ids"].count(261) == 2
    own_close = reply["token_ids"].index(261, 6)
    from moetrt.runtime.engine import Engine

    answer = Engine.load(engine).tokenizer.decode(reply["token_ids"][6:own_close] + reply["token_ids"][own_close + 1:])
    assert reply["text"] == answer.replace("<｜end▁of▁sentence｜>", "").strip()
    assert "</think>" not in reply["text"] and "\n" in reply["text"]  # the rest of the scratchpad, then the answer


@pytest.mark.parametrize("flags, reasoning, text", [
    ((), SCRATCHPAD_4827_593, "4827"),  # stop strings end the answer; the scratchpad's "+" does not stop
    (("--stop-in-reasoning",), "4827", ""),
])
def test_stop_strings_end_the_answer_unless_asked_to_end_the_thinking(engine, flags, reasoning, text):
    result = moetrt_cli("generate", engine, "What is 4827 + 593?", "--greedy", "--json", "--stop", "+", *flags)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert (reply["reasoning"], reply["text"], reply["finish_reason"]) == (reasoning, text, "stop")
