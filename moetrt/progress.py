"""Progress bars and notes on stderr (rich), shared by export, engine builds, the runtime and benchmarks."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
