"""`moetrt eval ENGINE`: the engine behind the torch-free evaluation core (same problems, same scoring)."""

from __future__ import annotations

from pathlib import Path

from moetrt.errors import MoetrtError
from moetrt.runtime.engine import Engine
from moetrt.tasks.evaluate import ContinueBatch, EvalReport, check_options, evaluate


def engine_continuer(engine: Engine) -> ContinueBatch:
    """Batched greedy continuation through the engine, each row stopping at an EOS id."""

    def continue_batch(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        results = engine.generate(prompts, max_new_tokens=max_new_tokens, greedy=True)
        return [result.token_ids for result in results]

    return continue_batch


def evaluate_engine(
    engine_dir: str | Path, task: str = "arithmetic", n: int = 500, seed: int = 0, batch_size: int = 64
) -> EvalReport:
    """Held-out accuracy of an engine directory."""
    check_options(task, n, batch_size)
    engine = Engine.load(engine_dir)
    if engine.tokenizer is None:
        raise MoetrtError(f"{engine_dir} has no tokenizer; task evaluation needs one")
    return evaluate(task, engine.tokenizer, engine_continuer(engine), n, seed, batch_size)
