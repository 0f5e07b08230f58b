"""Progress bars and notes on stderr (rich), shared by export, engine builds, the runtime and benchmarks."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

T = TypeVar("T")
console = Console(stderr=True, highlight=False)


def quiet() -> bool:
    """MOETRT_QUIET=1 silences bars and notes (tests, services)."""
    return os.environ.get("MOETRT_QUIET", "") not in ("", "0")


def note(message: str) -> None:
    if not quiet():
        console.print(message)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar when stderr is a terminal; silently otherwise."""
    if quiet() or not sys.stderr.isatty():
        yield from items
        return
    with _progress() as progress:
        task = progress.add_task(description, total=total if total is not None else _len(items))
        for item in items:
            yield item
            progress.advance(task)


@contextlib.contextmanager
def stage(description: str, total: float | None = None) -> Iterator[callable]:
    """A bar for work driven by callbacks: yields `advance(amount=1, description=None)`."""
    if quiet() or not sys.stderr.isatty():
        yield lambda amount=1, description=None: None
        return
    with _progress() as progress:
        task = progress.add_task(description, total=total)

        def advance(amount: float = 1, description: str | None = None) -> None:
            progress.update(task, advance=amount, **({"description": description} if description else {}))

        yield advance


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _len(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


class Phases:
    """Nested phases with step counts (a TensorRT engine build): one bar per open phase, gone when it finishes.

    Silent under MOETRT_QUIET or when stderr is not a terminal. Use as a context manager.
    """

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._depth: dict[str, int] = {}

    def __enter__(self) -> Phases:
        if not quiet() and sys.stderr.isatty():
            self._progress = _progress()
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, name: str, parent: str | None, steps: int) -> None:
        if self._progress is not None:
            self._depth[name] = self._depth.get(parent, -1) + 1 if parent else 0
            self._tasks[name] = self._progress.add_task("  " * self._depth[name] + name, total=max(steps, 1))

    def step(self, name: str, step: int) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.update(self._tasks[name], completed=step + 1)

    def finish(self, name: str) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.remove_task(self._tasks.pop(name))
