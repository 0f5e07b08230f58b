"""The training script end to end at toy length: a loadable checkpoint, written atomically over the old one."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import moetrt

SCRIPT = Path(__file__).parents[2] / "models" / "train_tiny_r1.py"


def test_two_training_steps_write_a_complete_checkpoint_in_place_of_the_old(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    args = ["--out", str(out), "--steps", "2", "--batch-size", "4", "--eval-n", "2", "--seed", "3"]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temp or backup directory left
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    model = moetrt.load_reference(out)
    biases = [model.model.layers[i].mlp.gate.e_score_correction_bias for i in model.config.moe_layers]
    assert all(bias.abs().sum() > 0 for bias in biases)  # the balancing moved them
    assert torch.isfinite(model(torch.tensor([[0, 5, 6]]))).all()
    with_mtp = moetrt.load_reference(out, mtp=True)  # the MTP module was trained and balanced with the model
    assert with_mtp.mtp[0].mlp.gate.e_score_correction_bias.abs().sum() > 0
    assert torch.equal(with_mtp(torch.tensor([[0, 5, 6]])), model(torch.tensor([[0, 5, 6]])))


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny_r1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_examples_are_the_rendered_prompt_and_target_with_heavier_computed_tokens():
    from moetrt.tasks.arithmetic import Problem, completion
    from moetrt.tasks.chat import ChatTokenizer

    script = _script()
    chat = ChatTokenizer.load(SCRIPT.parent / "tiny-r1")
    problem = Problem(482, "-", 59)
    ids, prompt_len, weights = script.encode_example(chat, problem)
    assert ids == chat.encode(chat.render([{"role": "user", "content": problem.question}]) + completion(problem)) + [1]
    assert chat.decode(ids[:prompt_len]).endswith("<｜Assistant｜><think>\n")
    heavy = "".join(chat.decode([t]) for t, w in zip(ids[prompt_len:], weights) if w > 1)
    assert heavy == "03\n12\n14\n10\n 423"  # each column's value and the final answer
