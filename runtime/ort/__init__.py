"""The ONNX Runtime runtime backend: the load-time checks of an ort engine (its onnxruntime version policy
among them), its session (session.py), and the `moetrt info` lines."""

from __future__ import annotations

from moetrt import hardware
from moetrt.errors import MoetrtError
from moetrt.formats import EngineManifest, OrtSection
from moetrt.versions import package_version


def check_environment(manifest: EngineManifest) -> None:
    """An offline-optimised graph is tied to the onnxruntime major.minor, execution provider and CPU architecture it
    was built for (and to the CPU flags it records, none for graphs saved at level "extended"); an engine with
    moetrt's CPU kernel also needs a build of the kernel this CPU runs. Each mismatch is one MoetrtError."""
    import onnxruntime

    section = manifest.section
    assert isinstance(section, OrtSection)
    check_onnxruntime_version(section.package, manifest.versions.get(section.package),
                              package_version(section.package))
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
    if section.segmented:
        from moetrt.plugins.cpu_experts import expert_kernel

        expert_kernel(section.kernels, manifest.directory)  # refuses when no build runs here


def minor_version(version: str) -> str:
    """The major.minor of an onnxruntime version ("1.32.4" -> "1.32"): what an offline-optimised graph depends on."""
    return ".".join(version.split(".")[:2])


def check_onnxruntime_version(package: str, recorded: str | None, installed: str | None) -> None:
    """Engines load under the onnxruntime major.minor that optimised them (a patch release changes no op schema
    or fusion); pyproject.toml pins the same range. Raises MoetrtError naming both versions and both fixes."""
    if recorded and installed and minor_version(recorded) == minor_version(installed):
        return
    fix = (f"rebuild the engine, or pip install '{package}=={minor_version(recorded)}.*' "
           f"(any {minor_version(recorded)}.x loads it)" if recorded else "rebuild the engine")
    raise MoetrtError(f"engine was optimised by {package} {recorded} but {installed or 'none'} is installed: "
                      f"an offline-optimised model is tied to its onnxruntime version; {fix}")


def open_session(manifest: EngineManifest, threads: int | None = None, expert_group=None):
    """An OrtSession; with an expert-parallel group (runtime/parallel), one holding this rank's experts."""
    from moetrt.runtime.ort.session import OrtSession

    return OrtSession(manifest, threads=threads, expert_group=expert_group)


def describe(manifest: EngineManifest) -> list[str]:
    """`moetrt info` lines for an ort engine: where it runs, who computes the routed experts, and with which
    build of moetrt's kernel on this machine."""
    section = manifest.section
    assert isinstance(section, OrtSection)
    quantized = manifest.quantization
    if section.segmented:
        bits = {layer.bits for layer in section.expert_layers}
        held = f" on {quantized.scheme} blocks" if quantized and bits != {32} else ""
        drafting = section.draft_segments
        module = f" ({drafting} of them the MTP module's, run only on drafting steps)" if drafting else ""
        experts = f"moetrt's CPU kernel{held}, {len(section.segments)} graph segments{module}"
    else:
        # experts whose widths are not whole groups stay float32 (export/ort/plan.py quantized_experts)
        model = manifest.model_config
        held = quantized is not None and not (model.hidden_size % quantized.group_size
                                              or model.moe_intermediate_size % quantized.group_size)
        experts = f"onnxruntime's QMoE op ({quantized.scheme})" if held else "onnxruntime's MoE op"
    lines = [f"runs on          {section.provider} ({section.cpu_arch})",
             f"routed experts   {experts}, {section.expert_slices} slice{'s' if section.expert_slices != 1 else ''} "
             "per expert"]
    if section.segmented:
        from moetrt.plugins.cpu_experts import expert_kernel

        from moetrt.plugins import ort_ops

        choice = expert_kernel(section.kernels, manifest.directory)
        lines.append(f"CPU kernel       {choice.description}")
        # (a build from before moetrt_experts_on lacks the symbol's name among its bytes)
        has_entry_point = choice.path is None or b"moetrt_experts_on" in choice.path.read_bytes()
        why = ort_ops.segmented_reason(has_entry_point, ort_ops.CARRIED in manifest.artifacts)
        module = (f"; a drafting call also runs the MTP module's {section.draft_segments} segments"
                  if section.draft_segments else "")
        lines.append("each call        " + (
            "one onnxruntime run: the main model's segments joined into one graph, the experts in it as moetrt's "
            f"onnxruntime op (MOETRT_SEGMENTED=1: one run per segment){module}" if why is None else
            f"one onnxruntime run per segment, the kernel called between them ({why})"))
    return lines
