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


# NVIDIA publishes TensorRT per CUDA major version: tensorrt-cu12, tensorrt-cu13 (and their -bindings / -libs).
TENSORRT_CUDA_DISTRIBUTIONS = {major: (f"tensorrt-cu{major}", f"tensorrt-cu{major}-bindings", f"tensorrt-cu{major}-libs")
                               for major in (13, 12, 11)}


def tensorrt_cuda_major() -> int | None:
    """The CUDA major version the installed TensorRT was built for, from its distribution's name; None when no
    such distribution is installed (a TensorRT from a system package or container says nothing here)."""
    for major, names in TENSORRT_CUDA_DISTRIBUTIONS.items():
        if any(package_version(name) for name in names):
            return major
    return None
