"""Arithmetic problems answered R1-style: generation from a seed, scratchpad targets, answer parsing (torch-free).

A problem is `a + b` or `a - b` (a >= b) with operands of 1-4 digits. The thinking restates the problem with
both operands zero-padded to 4 digits (`4827+0593`), works one column per line from the right (`7+3+0=10`:
digit, digit, carry in, two-digit value), and ends with the result's 5 digits (`05420`: final carry, then one
digit from each step). Every scratchpad of an operator therefore has the same layout, so each token either
looks up one small table or copies a token at a fixed distance back: the easiest thing for attention with
rotary positions to learn. (Scratchpads that rewrote the shrinking operands on every line left a tiny model
copying the wrong digit in about one problem in ten.)

Train and held-out problems are split by a hash of the problem text, so an eval problem is never trained on.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

OPERATORS = ("+", "-")
MAX_DIGITS = 4
HELD_OUT_PERCENT = 10  # share of all problems reserved for evaluation
SPLITS = ("train", "eval")
ANSWER = re.compile(r"-?\d+")
THINK_END = "</think>"
# Room for the longest target (9999 + 9999: 84 tokens with the tiny-r1 tokenizer) and some slack.
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def key(self) -> str:
        """Canonical text, e.g. `4827+593`: what the split hashes."""
        return f"{self.a}{self.op}{self.b}"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"


def split_of(problem: Problem) -> str:
    """`"eval"` for the held-out share of problems (by sha256 of the key), `"train"` otherwise."""
    digest = hashlib.sha256(problem.key.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "little") % 100 < HELD_OUT_PERCENT else "train"


def _number(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randrange(low, 10**digits)


def draw_problem(rng: random.Random) -> Problem:
    """One problem from the full distribution (either split)."""
    op = rng.choice(OPERATORS)
    a = _number(rng, rng.randint(1, MAX_DIGITS))
    b = _number(rng, rng.randint(1, MAX_DIGITS))
    if op == "-" and b > a:
        a, b = b, a
    return Problem(a, op, b)


def iter_problems(seed: int, split: str) -> Iterator[Problem]:
    """An endless stream of `split` ("train" or "eval") problems, reproducible from `seed`; repeats possible."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"arithmetic:{split}:{seed}")
    while True:
        problem = draw_problem(rng)
        if split_of(problem) == split:
            yield problem


def draw_problems(count: int, seed: int, split: str) -> list[Problem]:
    """`count` distinct problems of `split`, reproducible from `seed`."""
    problems: dict[str, Problem] = {}
    for problem in iter_problems(seed, split):
        if len(problems) == count:
            break
        problems.setdefault(problem.key, problem)
    return list(problems.values())


def column(op: str, x: int, y: int, carry: int) -> tuple[str, int, int]:
    """One column's step line, result digit and outgoing carry. Values are always two digits, so every step
    line of an operator has one layout; subtraction borrows ten up front (`12-9-1=02`: borrow 1)."""
    if op == "+":
        value = x + y + carry
        return f"{x}+{y}+{carry}={value:02d}", value % 10, value // 10
    value = 10 + x - y - carry
    return f"1{x}-{y}-{carry}={value:02d}", value % 10, 1 - value // 10


def thinking(problem: Problem) -> str:
    """The scratchpad: the zero-padded problem, one step line per column from the right, then the result's
    digits (final carry first; a subtraction's final borrow is always 0)."""
    a, b = f"{problem.a:0{MAX_DIGITS}d}", f"{problem.b:0{MAX_DIGITS}d}"
    lines = [f"{a}{problem.op}{b}"]
    carry, result = 0, ""
    for x, y in zip(reversed(a), reversed(b)):
        step, digit, carry = column(problem.op, int(x), int(y), carry)
        lines.append(step)
        result = f"{digit}{result}"
    lines.append(f"{carry}{result}")
    return "\n".join(lines) + "\n"


def completion(problem: Problem) -> str:
    """What the model writes after the generation prompt's `<think>\\n`: scratchpad, `</think>`, answer."""
    return f"{thinking(problem)}{THINK_END}\n\n{problem.a} {problem.op} {problem.b} = {problem.answer}"


def category(problem: Problem) -> str:
    """The group a problem is reported under: its operator."""
    return problem.op


def parse_answer(text: str) -> int | None:
    """The last integer after `</think>` in a model's output; None without a closed thinking or a number."""
    if THINK_END not in text:
        return None
    numbers = ANSWER.findall(text.split(THINK_END)[-1])
    return int(numbers[-1]) if numbers else None
