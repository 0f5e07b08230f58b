"""`moetrt eval` on a checkpoint directory: the torch reference model behind the torch-free evaluation core."""

from __future__ import annotations

from pathlib import Path

from moetrt.errors import MoetrtError
from moetrt.export.checkpoint import load_reference
from moetrt.export.generate import generate_greedy
from moetrt.export.model import DeepseekForCausalLM
from moetrt.tasks.chat import ChatTokenizer
from moetrt.tasks.evaluate import ContinueBatch, EvalReport, check_options, evaluate


def reference_continuer(model: DeepseekForCausalLM, stop_ids: tuple[int, ...]) -> ContinueBatch:
    """Batched greedy continuation with the reference model, each row stopping at a stop id."""

    def continue_batch(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return generate_greedy(model, prompts, max_new_tokens, stop_ids=stop_ids).tokens

    return continue_batch


def evaluate_checkpoint(
    checkpoint_dir: str | Path, task: str = "arithmetic", n: int = 500, seed: int = 0, batch_size: int = 64
) -> EvalReport:
    """Held-out accuracy of a Hugging Face checkpoint directory, run by the fp32 torch reference."""
    check_options(task, n, batch_size)
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise MoetrtError(f"{directory} is not a directory: point at a checkpoint directory")
    model = load_reference(directory)
    tokenizer = ChatTokenizer.load(directory)
    return evaluate(task, tokenizer, reference_continuer(model, tokenizer.eos_ids), n, seed, batch_size)
