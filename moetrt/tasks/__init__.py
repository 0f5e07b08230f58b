"""Evaluation tasks (torch-free): problems drawn from a seed, R1-style targets, answer parsing, and scoring.

A task module provides `draw_problems(count, seed, split)`, `completion(problem)`, `parse_answer(text)`,
`category(problem)` and `MAX_NEW_TOKENS`; its problems have `question` and `answer`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from moetrt.errors import MoetrtError

TASKS = {"arithmetic": "moetrt.tasks.arithmetic"}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise MoetrtError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name])
