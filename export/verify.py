"""`moetrt verify ENGINE CHECKPOINT`: does compilation leave the model's answers unchanged?

Runs the engine and the fp32 torch reference on the same prompts: max |Δlogit| over whole sequences,
greedy continuations (equal, or diverging only where the reference's top-2 margin is a near-tie), and for
a checkpoint trained on a moetrt task (config.json `moetrt_task`) the task accuracy of both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from moetrt.errors import MoetrtError
from moetrt.export.reference_session import ReferenceSession, load_reference_session
from moetrt.runtime.engine import Engine
from moetrt.runtime.generate import GenerationOptions, continuation_logits, generate

# (atol, rtol against the reference's largest |logit|, near-tie margin) per engine dtype.
TOLERANCES = {"float32": (1e-4, 1e-5, 1e-3), "float16": (2e-2, 1e-2, 5e-2), "bfloat16": (1e-1, 5e-2, 2e-1)}


@dataclasses.dataclass
class VerifyReport:
    dtype: str
    prompts: int
    max_abs_logit_diff: float
    logit_tolerance: float
    greedy_rows_agreeing: int
    greedy_tokens_compared: int
    greedy_failures: list[str]
    task: str | None = None
    engine_accuracy: float | None = None
    reference_accuracy: float | None = None
    answers_differing: int | None = None

    @property
    def passed(self) -> bool:
        same_task = self.task is None or self.answers_differing == 0
        return self.max_abs_logit_diff <= self.logit_tolerance and not self.greedy_failures and same_task

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}

    def describe(self) -> str:
        lines = [
            f"logits      max |Δ| {self.max_abs_logit_diff:.3g} over {self.prompts} prompts "
            f"(tolerance {self.logit_tolerance:.3g} for {self.dtype})",
            f"greedy      {self.greedy_rows_agreeing}/{self.prompts} continuations agree "
            f"({self.greedy_tokens_compared} tokens compared; near-ties allowed)",
            *(f"            {failure}" for failure in self.greedy_failures),
        ]
        if self.task:
            lines.append(
                f"{self.task:<11} engine {self.engine_accuracy:.1%}, reference {self.reference_accuracy:.1%}, "
                f"{self.answers_differing} answers differ"
            )
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _random_prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(4, 40))).tolist() for _ in range(count)]


def _greedy_agreement(engine_tokens, reference_tokens, reference_logits, margin: float) -> tuple[int, str | None]:
    """Tokens compared, and a failure message if they diverge where the reference is not near a tie.

    reference_logits `[steps, vocab]`: the reference's logits at each of its greedy steps."""
    for step, (want, got) in enumerate(zip(reference_tokens, engine_tokens)):
        if want != got:
            top2 = np.sort(reference_logits[step])[-2:]
            if top2[1] - top2[0] >= margin:
                return step, f"diverged at step {step} ({got} vs {want}), reference margin {top2[1] - top2[0]:.3g}"
            return step, None
    return min(len(reference_tokens), len(engine_tokens)), None


def verify_engine(
    engine_dir: str | Path, checkpoint_dir: str | Path, prompts: int = 8, new_tokens: int = 32, seed: int = 0,
    task: str | None = "auto", task_problems: int = 200,
) -> VerifyReport:
    """Compare an engine with the fp32 torch reference of `checkpoint_dir`."""
    if prompts < 1:
        raise MoetrtError(f"--prompts must be at least 1, got {prompts}")
    if task_problems < 1:
        raise MoetrtError(f"--task-problems must be at least 1, got {task_problems}")
    engine = Engine.load(engine_dir)
    reference = load_reference_session(checkpoint_dir, dtype="float32")
    if reference.config != engine.config:
        raise MoetrtError(f"{checkpoint_dir} is not the checkpoint this engine was built from (configs differ)")
    atol, rtol, margin = TOLERANCES[engine.manifest.dtype]
    token_prompts = _random_prompts(engine.config.vocab_size, prompts, seed)

    max_diff, scale = 0.0, 1.0
    for prompt in token_prompts:
        with torch.no_grad():
            want = reference.model(torch.tensor([prompt])).numpy()
        got = engine.logits(np.array([prompt]))
        max_diff = max(max_diff, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))

    eos = tuple(engine.eos_ids)
    engine_runs = engine.generate(token_prompts, max_new_tokens=new_tokens, greedy=True)
    greedy = GenerationOptions(max_new_tokens=new_tokens, stop_token_ids=eos)
    reference_tokens = [run.token_ids for run in generate(reference, token_prompts, greedy)]
    # the margins come from one scoring call over prompt + greedy tokens: the logits each greedy step chose from
    reference_logits = continuation_logits(reference, token_prompts, reference_tokens)
    agreeing, compared, failures = 0, 0, []
    for row, result in enumerate(engine_runs):
        steps, failure = _greedy_agreement(result.token_ids, reference_tokens[row], reference_logits[row], margin)
        compared += steps
        agreeing += failure is None
        if failure:
            failures.append(f"prompt {row}: {failure}")

    report = VerifyReport(engine.manifest.dtype, prompts, max_diff, atol + rtol * scale, agreeing, compared, failures)
    task = _detect_task(checkpoint_dir) if task == "auto" else task
    if task:
        _compare_task(report, task, engine, reference, checkpoint_dir, task_problems, seed)
    return report


def _detect_task(checkpoint_dir) -> str | None:
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return config.get("moetrt_task")


def _compare_task(report, task, engine: Engine, reference: ReferenceSession, checkpoint_dir, problems, seed) -> None:
    from moetrt.runtime.evaluate import engine_continuer, evaluate_session
    from moetrt.tasks.chat import ChatTokenizer
    from moetrt.tasks.evaluate import evaluate

    tokenizer = ChatTokenizer.load(checkpoint_dir)
    ours = evaluate(task, tokenizer, engine_continuer(engine), problems, seed, 64)
    theirs = evaluate_session(reference, tokenizer, task, problems, seed, 64)
    report.task = task
    report.engine_accuracy, report.reference_accuracy = ours.accuracy, theirs.accuracy
    report.answers_differing = sum(a.predicted != b.predicted for a, b in zip(ours.results, theirs.results))
