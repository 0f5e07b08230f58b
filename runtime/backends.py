"""The runtime backends, in one table: each checks an engine against this machine and opens a session on it.

A backend is a package under runtime/ (`runtime/ort`, `runtime/trt`) exposing `check_environment(manifest)` and
`open_session(manifest, threads)`; nothing else in the runtime branches on the backend. The build side has its
own table (export/backends.py).
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from moetrt.errors import MoetrtError
from moetrt.formats import EngineManifest
from moetrt.runtime.session import Session

REGISTRY = {"ort": "moetrt.runtime.ort", "trt": "moetrt.runtime.trt"}


class RuntimeBackend(Protocol):
    def check_environment(self, manifest: EngineManifest) -> None:
        """Raise MoetrtError naming what differs between the engine's build machine and this one."""
        ...

    def open_session(self, manifest: EngineManifest, threads: int | None = None, expert_group=None) -> Session:
        """A session over the engine (threads: CPU threads, where the backend uses them; expert_group: this
        rank's place in an expert-parallel job, runtime/parallel, or MoetrtError where the backend cannot)."""
        ...

    def describe(self, manifest: EngineManifest) -> list[str]:
        """Lines `moetrt info` prints about the engine's backend section."""
        ...


def get_backend(name: str) -> RuntimeBackend:
    if name not in REGISTRY:
        raise MoetrtError(f"this moetrt runs {', '.join(REGISTRY)} engines, not {name!r}")
    return cast(RuntimeBackend, importlib.import_module(REGISTRY[name]))
