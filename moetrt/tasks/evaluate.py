"""Accuracy of a model on a task's held-out problems, whatever runs the model (torch-free core).

The caller supplies `continue_batch(prompts, max_new_tokens) -> new token ids per prompt`, a greedy
continuation that stops a row at an EOS id: `moetrt.runtime.evaluate.continuer` over an engine's session or the
torch reference's.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.progress import track
from moetrt.tasks import get_task
from moetrt.tasks.chat import THINK_END, ChatTokenizer

ContinueBatch = Callable[[list[list[int]], int], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    question: str
    expected: int
    predicted: int | None
    thinking_tokens: int  # generated tokens before `</think>` (all of them if it never closed)
    output: str

    @property
    def correct(self) -> bool:
        return self.predicted == self.expected


@dataclasses.dataclass
class EvalReport:
    task: str
    seed: int
    results: list[ProblemResult]
    categories: list[str]
    seconds: float
    drafts: tuple[int, int] | None = None  # speculative decoding: drafts (verified, accepted); None without

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.results)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def parsed(self) -> int:
        return sum(r.predicted is not None for r in self.results)

    @property
    def mean_thinking_tokens(self) -> float:
        return sum(r.thinking_tokens for r in self.results) / self.n

    def accuracy_by_category(self) -> dict[str, float]:
        groups: dict[str, list[bool]] = defaultdict(list)
        for category, result in zip(self.categories, self.results):
            groups[category].append(result.correct)
        return {name: sum(hits) / len(hits) for name, hits in sorted(groups.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "seed": self.seed,
            "n": self.n,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "parsed": self.parsed,
            "mean_thinking_tokens": self.mean_thinking_tokens,
            "accuracy_by_category": self.accuracy_by_category(),
            "seconds": self.seconds,
            **({"drafts_verified": self.drafts[0], "drafts_accepted": self.drafts[1]} if self.drafts else {}),
            "problems": [{**dataclasses.asdict(r), "correct": r.correct} for r in self.results],
        }


def check_options(task_name: str, n: int, batch_size: int):
    """The task module, or MoetrtError for a bad task name or count (before any model is loaded)."""
    if n < 1:
        raise MoetrtError(f"--num-problems must be at least 1, got {n}")
    if batch_size < 1:
        raise MoetrtError(f"--batch-size must be at least 1, got {batch_size}")
    return get_task(task_name)


def evaluate(
    task_name: str,
    tokenizer: ChatTokenizer,
    continue_batch: ContinueBatch,
    n: int = 500,
    seed: int = 0,
    batch_size: int = 64,
) -> EvalReport:
    """Greedy accuracy on `n` held-out problems of `task_name` drawn from `seed`, prompts batched by length."""
    task = check_options(task_name, n, batch_size)
    think_end = tokenizer.token_id(THINK_END)
    problems = task.draw_problems(n, seed, "eval")
    prompts = [tokenizer.prompt_ids(problem.question) for problem in problems]
    # Similar prompt lengths share a batch: less padding, and rows tend to finish together.
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    outputs: list[list[int]] = [[] for _ in range(n)]
    start = time.perf_counter()
    for batch in track(batches, f"{task_name}: {n} problems"):
        for index, tokens in zip(batch, continue_batch([prompts[i] for i in batch], task.MAX_NEW_TOKENS)):
            outputs[index] = tokens
    seconds = time.perf_counter() - start
    results = [_score(problem, tokens, tokenizer, task, think_end) for problem, tokens in zip(problems, outputs)]
    return EvalReport(task_name, seed, results, [task.category(p) for p in problems], seconds)


def _score(problem, tokens: list[int], tokenizer: ChatTokenizer, task, think_end: int | None) -> ProblemResult:
    tokens = [t for t in tokens if t not in tokenizer.eos_ids]
    thinking = tokens.index(think_end) if think_end in tokens else len(tokens)
    text = tokenizer.decode(tokens)
    return ProblemResult(problem.question, problem.answer, task.parse_answer(text), thinking, text)


def format_report(report: EvalReport, source: str) -> str:
    """The lines `moetrt eval` prints."""
    by_category = "  ".join(f"{name} {value:.1%}" for name, value in report.accuracy_by_category().items())
    return "\n".join(
        [
            f"source     {source}",
            f"task       {report.task}: {report.n} held-out problems, seed {report.seed}, greedy",
            f"accuracy   {report.accuracy:.1%} ({report.correct}/{report.n})   by kind: {by_category}",
            f"parsed     {report.parsed}/{report.n} answers after </think>",
            f"thinking   {report.mean_thinking_tokens:.1f} tokens on average",
            f"time       {report.seconds:.1f} s ({report.n / report.seconds:.2f} problems/s)",
            *([f"drafts     {report.drafts[1]}/{report.drafts[0]} MTP drafts accepted "
               f"({report.drafts[1] / max(1, report.drafts[0]):.1%})"] if report.drafts else []),
        ]
    )
