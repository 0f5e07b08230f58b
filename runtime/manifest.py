"""Loading an engine directory's manifest and checking it against this machine.

Loading checks what is cheap every time (format, artifacts present with their recorded sizes, then the backend's
own checks: its version, execution provider, CPU instruction sets or GPU compute capability, in
runtime/<backend>/); hashing every artifact is `check_integrity`, run on request (`moetrt verify --integrity`) so
huge engines still load fast. The format itself, and every JSON key, is moetrt/formats.py's.
"""

from __future__ import annotations

from pathlib import Path

from moetrt.errors import MoetrtError
from moetrt.formats import EngineManifest, file_sha256, read_manifest
from moetrt.runtime.backends import get_backend


def check_environment(manifest: EngineManifest) -> None:
    """The cheap load-time checks; each mismatch is one MoetrtError naming what differs."""
    for name, record in manifest.artifacts.items():
        path = manifest.path(name)
        if not path.is_file():
            raise MoetrtError(f"engine artifact {name} is missing from {manifest.directory}; rebuild the engine")
        if path.stat().st_size != record.bytes:
            raise MoetrtError(
                f"engine artifact {name} is {path.stat().st_size} bytes, the manifest records {record.bytes}: "
                "the engine is damaged; rebuild it"
            )
    get_backend(manifest.backend).check_environment(manifest)


def check_integrity(manifest: EngineManifest) -> None:
    """Hash every artifact against the manifest (slow on big engines); raises naming the first mismatch."""
    for name, record in manifest.artifacts.items():
        path = manifest.path(name)
        if not path.is_file():
            raise MoetrtError(f"engine artifact {name} is missing")
        digest = file_sha256(path)
        if digest != record.sha256:
            raise MoetrtError(
                f"engine artifact {name} has sha256 {digest[:16]}..., the manifest records "
                f"{record.sha256[:16]}...: the file was modified or damaged; rebuild the engine"
            )


def load_manifest(engine_dir: str | Path, integrity: bool = False) -> EngineManifest:
    """Read and check an engine directory's manifest (cheap checks; hashes too with `integrity`)."""
    manifest = read_manifest(engine_dir)
    check_environment(manifest)
    if integrity:
        check_integrity(manifest)
    return manifest
