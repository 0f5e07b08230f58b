"""The ONNX Runtime runtime backend: the load-time checks of an ort engine, and its session (session.py)."""

from __future__ import annotations

from moetrt import hardware
from moetrt.errors import MoetrtError
from moetrt.formats import EngineManifest, OrtSection
from moetrt.versions import package_version


def check_environment(manifest: EngineManifest) -> None:
    """An offline-optimised graph is tied to the onnxruntime version, execution provider and CPU it was built for."""
    import onnxruntime

    section = manifest.section
    assert isinstance(section, OrtSection)
    recorded = manifest.versions.get(section.package)
    installed = package_version(section.package)
    if installed != recorded:
        raise MoetrtError(
            f"engine was optimised by {section.package} {recorded} but {installed or 'none'} is installed: "
            "an offline-optimised model is tied to its onnxruntime version; rebuild the engine"
        )
    if section.provider not in onnxruntime.get_available_providers():
        raise MoetrtError(
            f"engine was optimised for {section.provider}, which this onnxruntime does not offer "
            f"({', '.join(onnxruntime.get_available_providers())}); rebuild the engine here"
        )
    if section.cpu_arch != hardware.cpu_arch():
        raise MoetrtError(f"engine was built on {section.cpu_arch}, this machine is {hardware.cpu_arch()}; rebuild")
    missing = sorted(set(section.cpu_flags) - set(hardware.cpu_flags()))
    if missing:
        raise MoetrtError(
            f"engine was optimised on a CPU with {', '.join(missing)}, which this CPU lacks; rebuild the engine here"
        )


def open_session(manifest: EngineManifest, threads: int | None = None):
    from moetrt.runtime.ort.session import OrtSession

    return OrtSession(manifest, threads=threads)


def describe(manifest: EngineManifest) -> list[str]:
    """`moetrt info` lines for an ort engine: where it runs and who computes the routed experts."""
    section = manifest.section
    assert isinstance(section, OrtSection)
    experts = (f"moetrt's CPU kernel, {len(section.segments)} graph segments" if section.segmented
               else "onnxruntime's MoE op")
    return [f"runs on          {section.provider} ({section.cpu_arch})",
            f"routed experts   {experts}, {section.expert_slices} slices per expert"]
