"""The committed embedded model, `models/tiny-r1`: its layout, transformers' view of it, its routing bias and
its held-out accuracy through `moetrt eval`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moetrt
from moetrt.export.model import route_tokens
from moetrt.tasks.arithmetic import completion, draw_problems, parse_answer
from moetrt.tasks.chat import ChatTokenizer

TINY_R1 = Path(__file__).parents[2] / "models" / "tiny-r1"


@pytest.fixture(scope="module")
def reference():
    return moetrt.load_reference(TINY_R1)


@pytest.fixture(scope="module")
def chat():
    return ChatTokenizer.load(TINY_R1)


def test_checkpoint_is_a_small_deepseek_v3_in_hugging_face_layout():
    files = sorted(p.name for p in TINY_R1.iterdir())
    assert files == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sum(p.stat().st_size for p in TINY_R1.iterdir()) < 10 * 2**20
    config = json.loads((TINY_R1 / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["q_lora_rank"]
    assert config["num_hidden_layers"] - config["first_k_dense_replace"] >= 2 and config["first_k_dense_replace"] >= 1
    assert config["n_routed_experts"] >= 8 and config["n_shared_experts"] >= 1
    assert config["scoring_func"] == "sigmoid" and config["topk_method"] == "noaux_tc"
    assert 1 < config["topk_group"] < config["n_group"]


def test_transformers_reads_the_tokenizer_and_renders_r1s_chat_template(chat):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_R1)
    digits = tokenizer("4827", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([t]) for t in digits] == ["4", "8", "2", "7"]  # one token per digit
    messages = [{"role": "user", "content": "What is 4827 + 593?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<｜begin▁of▁sentence｜><｜User｜>What is 4827 + 593?<｜Assistant｜><think>\n"
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == chat.prompt_ids("What is 4827 + 593?")
    # Earlier assistant turns keep only their answer, as R1's template does.
    history = messages + [{"role": "assistant", "content": "<think>\nwork\n</think>\n\n5420"}]
    assert tokenizer.apply_chat_template(history, tokenize=False).endswith("<｜Assistant｜>\n\n5420<｜end▁of▁sentence｜>")


def test_transformers_loads_the_weights_and_agrees_with_the_reference(reference, chat):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_R1, dtype=torch.float32).eval()
    problem = draw_problems(1, seed=5, split="eval")[0]
    ids = torch.tensor([chat.prompt_ids(problem.question) + chat.encode(completion(problem))])
    with torch.no_grad():
        want = model(ids).logits
        got = reference(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert chat.decode(want[0, -2].argmax(-1, keepdim=True).tolist()) == completion(problem)[-1]


def _router_inputs(reference, chat) -> dict[int, torch.Tensor]:
    """Each MoE layer's router input `[T, H]` over prompts and answers of held-out problems."""
    problems = draw_problems(40, seed=11, split="eval")
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in reference.config.moe_layers}
    hooks = [
        reference.model.layers[i].mlp.gate.register_forward_pre_hook(
            lambda module, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i in reference.config.moe_layers
    ]
    try:
        with torch.no_grad():
            for problem in problems:
                reference(torch.tensor([chat.prompt_ids(problem.question) + chat.encode(completion(problem))]))
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(rows) for i, rows in captured.items()}


def test_the_trained_correction_bias_changes_at_least_five_percent_of_expert_selections(reference, chat):
    config = reference.config
    changed = total = 0
    for layer, x in _router_inputs(reference, chat).items():
        router = reference.model.layers[layer].mlp.gate
        assert router.e_score_correction_bias.abs().max() > 0
        with_bias = route_tokens(x, router.weight, router.e_score_correction_bias, config)[0].sort(-1).values
        without = route_tokens(x, router.weight, torch.zeros_like(router.e_score_correction_bias), config)[0]
        changed += (with_bias != without.sort(-1).values).any(-1).sum().item()
        total += len(x)
    assert changed / total >= 0.05, f"the bias changes {changed}/{total} token routings"


def _eval(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moetrt.cli", "eval", str(TINY_R1), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_eval_answers_equal_transformers_greedy_generation(chat):
    """`moetrt eval` on the checkpoint, problem by problem, against transformers' own greedy `generate`."""
    from transformers import AutoModelForCausalLM

    result = _eval("--task", "arithmetic", "--num-problems", "12", "--seed", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 12 and report["parsed"] == 12 and 0.5 <= report["accuracy"] <= 1
    model = AutoModelForCausalLM.from_pretrained(TINY_R1, dtype=torch.float32).eval()
    for problem, row in zip(draw_problems(12, seed=3, split="eval"), report["problems"]):
        assert row["question"] == problem.question
        ids = torch.tensor([chat.prompt_ids(problem.question)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=200, do_sample=False, eos_token_id=1, pad_token_id=1)
        assert row["predicted"] == parse_answer(chat.decode(out[0, ids.shape[1] :].tolist())), problem.question


def test_eval_rejects_an_unknown_task_naming_the_choices():
    result = _eval("--num-problems", "2", "--task", "poetry")
    assert result.returncode == 2  # click's usage error: usage, hint, then one line naming the value and the choices
    error = result.stderr.strip().splitlines()[-1]
    assert "poetry" in error and "arithmetic" in error
