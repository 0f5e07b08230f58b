"""`build_trt`: an export directory -> a TensorRT plan in the engine directory, and the manifest's "trt" section.

A strongly typed network from TensorRT's ONNX parser (the export's dtypes are the engine's: no precision flags),
the moetrt plugins registered first (plugins/trt_plugin.py; the network flag picks their AOT or JIT form), the
prefill and decode optimization profiles of export/trt/plan.py, the builder's optimization level, a timing cache
reused across builds, a progress bar per build phase, and the plan written atomically. Needs TensorRT and a GPU;
export/engine.py says so in one line where they are missing.
"""

from __future__ import annotations

from pathlib import Path

import tensorrt as trt

from moetrt.atomic import write_bytes
from moetrt.errors import MoetrtError
from moetrt.export.trt.plan import TrtBuildPlan, plan_trt_build, timing_cache_path
from moetrt.formats import MODEL_FILE, PLAN_FILE, ExportInfo, TrtProfile, TrtSection
from moetrt.settings import BuildProfile
from moetrt.progress import Phases, note
from moetrt import hardware

PARSER_ERRORS_SHOWN = 5


class BuildProgress(trt.IProgressMonitor):
    """Feeds TensorRT's build phases into moetrt.progress bars; never cancels the build."""

    def __init__(self, phases: Phases) -> None:
        trt.IProgressMonitor.__init__(self)
        self.phases = phases

    def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
        self.phases.start(phase_name, parent_phase or None, num_steps)

    def step_complete(self, phase_name: str, step: int) -> bool:
        self.phases.step(phase_name, step)
        return True

    def phase_finish(self, phase_name: str) -> None:
        self.phases.finish(phase_name)


def build_trt(export_dir: Path, info: ExportInfo, work_dir: Path, profile: BuildProfile,
              plugin: str = "aot") -> TrtSection:
    """Build `work_dir/model.plan` from `export_dir` (described by `info`); returns the manifest's TensorRT section.
    plugin: "aot" (the engine runs without Python) or "jit"; ignored for portable exports."""
    plan = plan_trt_build(info, profile, plugin)
    register_plugins(plan)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # The parser owns weights it converted: it must outlive the build, so it is held here.
    network, parser = parse(builder, logger, export_dir / MODEL_FILE, plan)
    config = builder.create_builder_config()
    config.builder_optimization_level = plan.optimization_level
    # fp32 engines compute in fp32, as the torch reference and the ONNX Runtime engines do; TF32 is on by default.
    config.clear_flag(trt.BuilderFlag.TF32)
    for spec in plan.profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.shapes.items():
            optimization_profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        config.add_optimization_profile(optimization_profile)
    device = hardware.cuda_devices()[0]
    cache_path = timing_cache_path(trt.__version__, device.name, device.compute_capability,
                                   hardware.cuda_driver_version())
    attach_timing_cache(config, cache_path)
    note(f"building a TensorRT {trt.__version__} engine for {device.name} (timing cache {cache_path})")
    with Phases() as phases:
        config.progress_monitor = BuildProgress(phases)
        serialized = builder.build_serialized_network(network, config)
    del parser
    if not serialized:
        raise MoetrtError("TensorRT could not build the engine (its log above says why); `--backend ort` works here")
    write_bytes(work_dir / PLAN_FILE, memoryview(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()))
    return manifest_section(plan, device)


def attach_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """The timing cache at `path`, or an empty one when the file is absent or TensorRT will not take it (another
    TensorRT or device wrote it: its header says so, and set_timing_cache then returns False)."""
    if path.is_file():
        cache = config.create_timing_cache(path.read_bytes())
        if cache and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        note(f"TensorRT did not accept the timing cache {path}; starting an empty one")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise MoetrtError("TensorRT refused an empty timing cache (its log above says why)")


def register_plugins(plan: TrtBuildPlan) -> None:
    if plan.plugin_form == "none":
        return
    from moetrt.plugins import trt_plugin  # importing registers the plugins with TensorRT's registry

    if plan.plugin_form == "aot" and not trt_plugin.AOT_AVAILABLE:
        raise MoetrtError(f"TensorRT {trt.__version__} has no ahead-of-time Python plugins; build with "
                          "--trt-plugin jit, or --portable")


def parse(
    builder: trt.Builder, logger: trt.ILogger, model: Path, plan: TrtBuildPlan
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The strongly typed network of `model` and its parser; a parse failure is one MoetrtError naming the first
    errors."""
    creation = trt.NetworkDefinitionCreationFlag
    flags = 1 << int(creation.STRONGLY_TYPED)
    if plan.plugin_form == "aot":
        flags |= 1 << int(creation.PREFER_AOT_PYTHON_PLUGINS)
    elif plan.plugin_form == "jit":
        flags |= 1 << int(creation.PREFER_JIT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = [parser.get_error(index).desc() for index in range(min(parser.num_errors, PARSER_ERRORS_SHOWN))]
        raise MoetrtError(f"TensorRT's ONNX parser refused {model} ({parser.num_errors} errors: "
                          f"{'; '.join(errors)}); `moetrt build-engine --dry-run` explains what it refuses")
    return network, parser


def manifest_section(plan: TrtBuildPlan, device: hardware.CudaDevice) -> TrtSection:
    return TrtSection(
        version=trt.__version__,
        compute_capability=tuple(device.compute_capability),
        gpu=device.name,
        plan=PLAN_FILE,
        plugin_form=plan.plugin_form,
        python_at_runtime=plan.python_at_runtime,
        strongly_typed=True,
        optimization_level=plan.optimization_level,
        profiles=tuple(TrtProfile(profile.name, dict(profile.shapes)) for profile in plan.profiles),
    )
