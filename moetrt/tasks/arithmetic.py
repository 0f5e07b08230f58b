"""Arithmetic problems answered R1-style: generation from a seed, scratchpad targets, answer parsing (torch-free).

A problem is `a + b`, `a - b` (a >= b) or `a * d` (d one digit), operands of 1-5 digits. The thinking works
digit by digit from the right: a step line does one column (`7+3+0=10`), then a state line carries what is
left of the operands, the carry and the result digits so far (`482+59 c1 0`), so every token copies from
the line above or looks up one small table. The answer follows `</think>`.

Train and held-out problems are split by a hash of the problem text, so an eval problem is never trained on.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

OPERATORS = ("+", "-", "*")
MAX_DIGITS = 5
HELD_OUT_PERCENT = 10  # share of all problems reserved for evaluation
SPLITS = ("train", "eval")
ANSWER = re.compile(r"-?\d+")
THINK_END = "</think>"
# Room for the longest scratchpad (5-digit operands: about 150 tokens) and the answer line.
MAX_NEW_TOKENS = 256


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
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        return self.a * self.b

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
    if op == "*":
        return Problem(a, op, rng.randrange(10))
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
    """One column's step line, result digit and outgoing carry. Values are always two digits, so every
    step line of an operator has the same layout; subtraction borrows ten up front (`12-9-1=02`: borrow 1)."""
    if op == "+":
        value = x + y + carry
        return f"{x}+{y}+{carry}={value:02d}", value % 10, value // 10
    if op == "-":
        value = 10 + x - y - carry
        return f"1{x}-{y}-{carry}={value:02d}", value % 10, 1 - value // 10
    value = x * y + carry
    return f"{x}*{y}+{carry}={value:02d}", value % 10, value // 10


def thinking(problem: Problem) -> str:
    """The scratchpad: the problem, then per column a step line and a state line (what is left of the
    operands, the carry, the result digits so far); the last state line holds the result."""
    a, b, op = str(problem.a), str(problem.b), problem.op
    lines = [f"{a}{op}{b}"]
    carry, result = 0, ""
    while a or (b and op != "*") or carry:
        x = int(a[-1]) if a else 0
        y = int(b) if op == "*" else int(b[-1]) if b else 0
        step, digit, carry = column(op, x, y, carry)
        a, b = a[:-1], b if op == "*" else b[:-1]
        result = f"{digit}{result}"
        lines += [step, f"{a}{op}{b} c{carry} {result}"]
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
