"""The engine directory's `manifest.json`: what was built, by what, for which machine, and its checks.

Loading checks what is cheap every time (format, artifacts present with their recorded sizes, the backend's
version, execution provider, CPU instruction sets, GPU compute capability); hashing every artifact is
`check_integrity`, run on request (`moetrt verify --integrity`) so huge engines still load fast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.export.config import ModelConfig
from moetrt.runtime import hardware
from moetrt.versions import package_version

MANIFEST = "manifest.json"
FORMAT = "moetrt-engine"
# 2: ONNX Runtime engines may be segments around moetrt's CPU expert kernel (`ort.segments`); 1 still loads.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
BACKENDS = ("ort", "trt")


@dataclass(frozen=True)
class Manifest:
    directory: Path
    data: dict[str, Any]

    @property
    def backend(self) -> str:
        return self.data["backend"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.data["model_config"])

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.data["artifacts"]

    @property
    def profile(self) -> dict[str, int]:
        return self.data["profile"]

    @property
    def has_tokenizer(self) -> bool:
        return bool(self.data.get("tokenizer"))

    def path(self, name: str) -> Path:
        return self.directory / name


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def artifact_records(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `directory` but the manifest, by relative path."""
    return {
        str(path.relative_to(directory)): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(engine_dir: str | Path) -> Manifest:
    directory = Path(engine_dir)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise MoetrtError(f"engine directory {directory} does not exist; build one with `moetrt build-engine`")
    if not path.is_file():
        raise MoetrtError(f"{directory} has no {MANIFEST}: not an engine directory (or an interrupted build)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoetrtError(f"{path} is not valid JSON ({error}); rebuild the engine") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MoetrtError(f"{path} is not a moetrt engine manifest")
    if data.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise MoetrtError(
            f"{path} has format version {data.get('format_version')}, this moetrt reads "
            f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}: rebuild the engine with this moetrt"
        )
    if data.get("backend") not in BACKENDS:
        raise MoetrtError(f"{path}: unknown backend {data.get('backend')!r}")
    return Manifest(directory, data)


def check_environment(manifest: Manifest) -> None:
    """The cheap load-time checks; each mismatch is one MoetrtError naming what differs."""
    for name, record in manifest.artifacts.items():
        path = manifest.path(name)
        if not path.is_file():
            raise MoetrtError(f"engine artifact {name} is missing from {manifest.directory}; rebuild the engine")
        if path.stat().st_size != record["bytes"]:
            raise MoetrtError(
                f"engine artifact {name} is {path.stat().st_size} bytes, the manifest records {record['bytes']}: "
                "the engine is damaged; rebuild it"
            )
    if manifest.backend == "ort":
        _check_ort(manifest)
    else:
        _check_trt(manifest)


def _check_ort(manifest: Manifest) -> None:
    ort = manifest.data["ort"]
    recorded = manifest.data["versions"].get(ort["package"])
    installed = package_version(ort["package"])
    if installed != recorded:
        raise MoetrtError(
            f"engine was optimised by {ort['package']} {recorded} but {installed or 'none'} is installed: "
            "an offline-optimised model is tied to its onnxruntime version; rebuild the engine"
        )
    import onnxruntime

    if ort["provider"] not in onnxruntime.get_available_providers():
        raise MoetrtError(
            f"engine was optimised for {ort['provider']}, which this onnxruntime does not offer "
            f"({', '.join(onnxruntime.get_available_providers())}); rebuild the engine here"
        )
    if ort["cpu_arch"] != hardware.cpu_arch():
        raise MoetrtError(f"engine was built on {ort['cpu_arch']}, this machine is {hardware.cpu_arch()}; rebuild")
    missing = sorted(set(ort["cpu_flags"]) - set(hardware.cpu_flags()))
    if missing:
        raise MoetrtError(
            f"engine was optimised on a CPU with {', '.join(missing)}, which this CPU lacks; rebuild the engine here"
        )


def _check_trt(manifest: Manifest) -> None:
    trt = manifest.data["trt"]
    installed = package_version("tensorrt") or package_version("tensorrt-cu12") or package_version("tensorrt-cu13")
    if installed is None:
        raise MoetrtError("this is a TensorRT engine and TensorRT is not installed; build an ort engine instead")
    if installed != trt["version"]:
        raise MoetrtError(f"engine was built by TensorRT {trt['version']} but {installed} is installed; rebuild it")
    devices = hardware.cuda_devices()
    if not devices:
        raise MoetrtError("this is a TensorRT engine and no CUDA GPU is visible; build an ort engine instead")
    capability = tuple(trt["compute_capability"])
    if devices[0].compute_capability != capability:
        raise MoetrtError(
            f"engine was built for compute capability {capability[0]}.{capability[1]}, this GPU is "
            f"{devices[0].compute_capability[0]}.{devices[0].compute_capability[1]}; rebuild it here"
        )


def check_integrity(manifest: Manifest) -> None:
    """Hash every artifact against the manifest (slow on big engines); raises naming the first mismatch."""
    for name, record in manifest.artifacts.items():
        path = manifest.path(name)
        if not path.is_file():
            raise MoetrtError(f"engine artifact {name} is missing")
        digest = file_sha256(path)
        if digest != record["sha256"]:
            raise MoetrtError(
                f"engine artifact {name} has sha256 {digest[:16]}..., the manifest records "
                f"{record['sha256'][:16]}...: the file was modified or damaged; rebuild the engine"
            )


def load_manifest(engine_dir: str | Path, integrity: bool = False) -> Manifest:
    """Read and check an engine directory's manifest (cheap checks; hashes too with `integrity`)."""
    manifest = read_manifest(engine_dir)
    check_environment(manifest)
    if integrity:
        check_integrity(manifest)
    return manifest
