"""The TensorRT runtime backend: the load-time checks of a trt engine, and its session (session.py, which imports
TensorRT and cuda-python; this module does not)."""

from __future__ import annotations

from moetrt import hardware
from moetrt.errors import MoetrtError
from moetrt.formats import EngineManifest, TrtSection
from moetrt.versions import package_version


def check_environment(manifest: EngineManifest) -> None:
    """A TensorRT plan runs only on the TensorRT version and GPU compute capability it was built for."""
    section = manifest.section
    assert isinstance(section, TrtSection)
    installed = package_version("tensorrt") or package_version("tensorrt-cu12") or package_version("tensorrt-cu13")
    if installed is None:
        raise MoetrtError("this is a TensorRT engine and TensorRT is not installed; build an ort engine instead")
    if installed != section.version:
        raise MoetrtError(f"engine was built by TensorRT {section.version} but {installed} is installed; rebuild it")
    devices = hardware.cuda_devices()
    if not devices:
        raise MoetrtError("this is a TensorRT engine and no CUDA GPU is visible; build an ort engine instead")
    capability = tuple(section.compute_capability)
    if devices[0].compute_capability != capability:
        raise MoetrtError(
            f"engine was built for compute capability {capability[0]}.{capability[1]}, this GPU is "
            f"{devices[0].compute_capability[0]}.{devices[0].compute_capability[1]}; rebuild it here"
        )


def open_session(manifest: EngineManifest, threads: int | None = None, expert_group=None):
    """A TrtSession (threads is unused: the GPU runs the graph). TensorRT engines do not split their experts
    over processes: MoetrtError with an expert-parallel group."""
    from moetrt.runtime.trt.session import TrtSession

    if expert_group is not None:
        raise MoetrtError("--expert-parallel runs ONNX Runtime engines built with `--moe-kernel moetrt`; this is a "
                          "TensorRT engine")
    return TrtSession(manifest)


def describe(manifest: EngineManifest) -> list[str]:
    """`moetrt info` lines for a trt engine: the GPU and TensorRT it was built for, the plugin form."""
    section = manifest.section
    assert isinstance(section, TrtSection)
    major, minor = section.compute_capability[:2]
    return [f"runs on          {section.gpu} (sm{major}{minor}), TensorRT {section.version}",
            f"routed experts   {section.plugin_form} plugin" + (" (Python at run time)" if section.python_at_runtime
                                                                else "")]
