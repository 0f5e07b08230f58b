"""Versions of the tools that produce and run engines, read from package metadata (no imports)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTIONS = ("moetrt", "torch", "onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "tensorrt", "triton")


def package_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str]:
    """Installed versions of the distributions that matter to an export or engine (absent ones omitted)."""
    versions = {name: package_version(name) for name in DISTRIBUTIONS}
    return {name: version for name, version in versions.items() if version}
