"""Progress on stderr, shared by export, engine builds, the runtime and benchmarks: rich bars on a terminal, and
elsewhere (a log, a pipe, a service) plain timestamped lines at a bounded rate, such as
`2026-11-30T08:01:02Z build-engine: optimise segment 3/8`. MOETRT_QUIET=1 silences both, and notes."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

T = TypeVar("T")
console = Console(stderr=True, highlight=False)
# Off a terminal: at most one line per this many seconds, besides each bar's first and last.
LINE_INTERVAL_S = 30.0
# What the lines are prefixed with: the CLI sets the running command's name.
command = "moetrt"
_clock: Callable[[], float] = time.monotonic


def quiet() -> bool:
    """MOETRT_QUIET=1 silences bars and notes (tests, services)."""
    return os.environ.get("MOETRT_QUIET", "") not in ("", "0")


def note(message: str) -> None:
    """One message on stderr, never wrapped (rich wraps at 80 columns off a terminal) nor read as markup."""
    if not quiet():
        console.print(message, soft_wrap=True, markup=False)


def _plain() -> bool:
    """Whether progress goes out as plain lines: not quiet, and stderr is no terminal."""
    return not quiet() and not sys.stderr.isatty()


class _Lines:
    """One bar's progress as plain lines, each printed when LINE_INTERVAL_S has passed since the last line any bar
    printed; with `milestones`, also its first update and the one that completes it."""

    last_line: float | None = None  # shared by every bar: the bound is on the whole stream

    def __init__(self, description: str, total: float | None, milestones: bool = True) -> None:
        self.description, self.total, self.completed, self.milestones = description, total, 0.0, milestones
        self.finished = False
        self.started: float | None = None  # the first update's clock reading
        self.update(force=milestones)

    def update(self, advance: float = 0, completed: float | None = None, description: str | None = None,
               force: bool = False) -> None:
        self.completed = completed if completed is not None else self.completed + advance
        self.description = description or self.description
        finishing = self.total is not None and self.completed >= self.total and not self.finished
        self.finished = self.finished or finishing
        now = _clock()
        self.started = now if self.started is None else self.started
        if (force or (finishing and self.milestones) or _Lines.last_line is None
                or now - _Lines.last_line >= LINE_INTERVAL_S):
            _Lines.last_line = now
            count = f"{self.completed:g}" + (f"/{self.total:g}" if self.total is not None else "")
            if self.total is not None and 0 < self.completed < self.total:  # the rate so far, carried on
                count += f", ETA {_clock_text((now - self.started) / self.completed * (self.total - self.completed))}"
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"{stamp} {command}: {self.description} {count}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """The end of the work: its last line, unless the update that completed it printed one."""
        if self.milestones and not self.finished:
            self.finished = True
            self.update(force=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on a terminal, plain progress lines elsewhere; both with the time remaining
    (ETA, at the rate so far) when the total is known."""
    if quiet():
        yield from items
        return
    if _plain():
        lines = _Lines(description, total if total is not None else _len(items))
        for item in items:
            yield item
            lines.update(1)
        lines.close()
        return
    with _progress() as progress:
        task = progress.add_task(description, total=total if total is not None else _len(items))
        for item in items:
            yield item
            progress.advance(task)


@contextlib.contextmanager
def stage(description: str, total: float | None = None) -> Iterator[callable]:
    """A bar for work driven by callbacks: yields `advance(amount=1, description=None)`."""
    if quiet():
        yield lambda amount=1, description=None: None
        return
    if _plain():
        lines = _Lines(description, total)
        yield lambda amount=1, description=None: lines.update(amount, description=description)
        lines.close()
        return
    with _progress() as progress:
        task = progress.add_task(description, total=total)

        def advance(amount: float = 1, description: str | None = None) -> None:
            progress.update(task, advance=amount, **({"description": description} if description else {}))

        yield advance


@contextlib.contextmanager
def byte_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A bar over `total` bytes with the rate and the time remaining (ETA): yields `advance(nbytes)`. Off a terminal,
    lines such as `writing weights 3.21/8.50 GB, 95 MB/s, ETA 0:00:56` at the usual bounded rate."""
    if quiet():
        yield lambda nbytes: None
        return
    if _plain():
        started, done = _clock(), [0]

        def line(force: bool = False) -> None:
            now = _clock()
            if not force and _Lines.last_line is not None and now - _Lines.last_line < LINE_INTERVAL_S:
                return
            _Lines.last_line = now
            rate = done[0] / max(now - started, 1e-9)
            eta = (total - done[0]) / rate if rate > 0 else 0.0
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"{stamp} {command}: {description} {done[0] / 1e9:.2f}/{total / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, "
                  f"ETA {_clock_text(eta)}", file=sys.stderr, flush=True)

        def advance(nbytes: int) -> None:
            done[0] += nbytes
            line()

        line(force=True)
        yield advance
        line(force=True)
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=console, transient=False)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda nbytes: progress.advance(task, nbytes)


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _len(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


class Phases:
    """Nested phases with step counts (a TensorRT engine build): one bar per open phase, gone when it finishes;
    plain lines off a terminal (each top-level phase's start and end, the rest at a bounded rate).

    Silent under MOETRT_QUIET. Use as a context manager.
    """

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._depth: dict[str, int] = {}
        self._lines: dict[str, _Lines] | None = None

    def __enter__(self) -> Phases:
        if _plain():
            self._lines = {}
        elif not quiet():
            self._progress = _progress()
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, name: str, parent: str | None, steps: int) -> None:
        self._depth[name] = self._depth.get(parent, -1) + 1 if parent else 0
        if self._lines is not None:
            self._lines[name] = _Lines(name, max(steps, 1), milestones=self._depth[name] == 0)
        if self._progress is not None:
            self._tasks[name] = self._progress.add_task("  " * self._depth[name] + name, total=max(steps, 1))

    def step(self, name: str, step: int) -> None:
        if self._lines is not None and name in self._lines:
            self._lines[name].update(completed=step + 1)
        if self._progress is not None and name in self._tasks:
            self._progress.update(self._tasks[name], completed=step + 1)

    def finish(self, name: str) -> None:
        if self._lines is not None and name in self._lines:
            lines = self._lines.pop(name)
            lines.update(completed=lines.total)
        if self._progress is not None and name in self._tasks:
            self._progress.remove_task(self._tasks.pop(name))
