"""The ONNX Runtime backend's build step: an `ort` or `onnx` export -> an offline-optimised engine graph.

ONNX Runtime's graph optimisations up to level "extended" (fusions for the provider, none tied to a CPU's
instruction sets) are applied ahead of time and saved; the hardware-specific rest runs at load
(runtime/ort/session.py), so the engine loads on any CPU of its architecture. An export lowered for moetrt's CPU
expert kernel is first cut into segments around its expert nodes (export/ort/split.py); each segment is optimised
the same way, the packed experts go to `experts.bin`, and the kernel is compiled into `kernels/` for each
instruction-set level of the architecture (plugins/cpu_experts.py TARGETS), so serving hosts need no compiler.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from moetrt import hardware
from moetrt.errors import MoetrtError
from moetrt.formats import DATA_FILE, EXPERTS_FILE, MODEL_FILE, CpuKernel, ExportInfo, OrtSection
from moetrt.export.ort.plan import ort_provider
from moetrt.progress import note
from moetrt.versions import package_version

# "all" (99) adds layout transformations chosen for the building CPU (ONNX Runtime's graph optimizations docs:
# layout optimizations are hardware-dependent), which would tie the saved graph to that CPU.
OPTIMIZATION_LEVEL = "extended"
KERNELS_DIR = "kernels"
# Quantized dense weights export as block-wise DequantizeLinear -> MatMul; ONNX Runtime's QDQ fusion (level
# "extended", so it is in the saved graph) turns each pair into MatMulNBits with this accuracy_level. 4 lets it
# quantize activations to int8 per block (llama.cpp's Q8_0 activations); 0 keeps them float32. Measured here (2
# threads, AVX2, median of 5x50 runs), [1, 1024] x [1024, 2816]: int8 17.4 ms at 0 vs 0.50 ms at 4, int4 1.34 vs
# 0.53 ms; [8, 1024]: int8 20.8 vs 1.85 ms, int4 2.88 vs 1.53 ms. The cost: a relative error of about 5e-3 on
# that product (against ~1e-7 at level 0); on tiny-r1 a mean next-token KL divergence from the eager quantized
# reference of 0.035 (int4) and 0.07-0.15 (int8) where level 0 gives < 1e-4 (16 positions, 2 prompts).
MATMULNBITS_ACCURACY_LEVEL = 4


def build_ort(export_dir: Path, info: ExportInfo, work: Path) -> OrtSection:
    """Optimise `export_dir`'s graph into `work` for this machine's provider; returns the manifest section."""
    from moetrt.export.ort.split import split

    provider = ort_provider()
    capability = hardware.cuda_devices()[0].compute_capability if provider == "CUDAExecutionProvider" else None
    common = dict(
        package="onnxruntime-gpu" if package_version("onnxruntime-gpu") else "onnxruntime",
        provider=provider, optimization_level=OPTIMIZATION_LEVEL, cpu_arch=hardware.cpu_arch(),
        cpu_flags=(), expert_slices=info.expert_slices,  # the "extended" graph needs no particular instruction set
        gpu_compute_capability=tuple(capability) if capability else None,
    )
    if info.moe_kernel != "moetrt":
        _optimize(str(export_dir / MODEL_FILE), work / MODEL_FILE, DATA_FILE, provider)
        return OrtSection(**common, moe_kernel="onnxruntime", layout="graph", model=MODEL_FILE,
                          external_data=DATA_FILE)
    if provider != "CPUExecutionProvider":
        raise MoetrtError(f"{export_dir} runs its experts in moetrt's CPU kernel, but ONNX Runtime here would use "
                          f"{provider}; re-export with --moe-kernel onnxruntime")
    models, segments, layers = split(export_dir, MODEL_FILE, work)
    for model, segment in zip(models, segments):
        _optimize(model, work / segment.model, f"{segment.model}.data", provider, external_data_dir=export_dir)
    kernels = build_kernels(work)
    section = OrtSection(**common, moe_kernel="moetrt", layout="segments", segments=tuple(segments),
                         experts_file=EXPERTS_FILE, expert_layers=tuple(layers), kernels=kernels)
    drafting = section.draft_segments
    module = f" ({drafting} of them the MTP module's, run only on drafting steps)" if drafting else ""
    note(f"experts: moetrt's CPU kernel, the graph cut into {len(segments)} segments{module}; the kernel built for "
         f"{', '.join(kernel.target for kernel in kernels)}")
    return section


def build_kernels(work: Path) -> tuple[CpuKernel, ...]:
    """moetrt's CPU expert kernel compiled into `work/kernels/` for each level of this CPU architecture
    (plugins/cpu_experts.py TARGETS), best first, with the CPU flags each needs: copied from the kernel cache when
    an identical build is there (`cached_build`), else compiled (into the cache when it is writable). A level this
    compiler cannot build is left out with a note. Raises MoetrtError without a C compiler, or when no level
    builds."""
    from moetrt.plugins.cpu_experts import cached_build, cannot_compile_here, compile_kernel, find_compiler, targets

    arch = hardware.cpu_arch()
    compiler = find_compiler()
    if compiler is None:
        raise MoetrtError("an engine with moetrt's CPU kernel carries the kernel compiled, and no C compiler was "
                          "found; install gcc (Debian: apt-get install gcc), or build with --moe-kernel onnxruntime")
    if not targets(arch):
        raise MoetrtError(f"moetrt's CPU kernel has no build for {arch} CPUs; build with --moe-kernel onnxruntime")
    (work / KERNELS_DIR).mkdir(exist_ok=True)
    kernels = []
    for target in targets(arch):
        file = f"{KERNELS_DIR}/cpu_experts-{target.name}.so"
        try:
            if cannot_compile_here() is None:
                shutil.copyfile(cached_build(target.compiler_flags, compiler)[0], work / file)
                os.chmod(work / file, 0o755)
            else:
                compile_kernel(work / file, target.compiler_flags, compiler)
        except MoetrtError as error:
            note(f"experts: no {target.name} build of the kernel: {error}")
            continue
        needs = target.cpu_flags if target.cpu_flags is not None else hardware.cpu_flags()
        kernels.append(CpuKernel(target.name, file, tuple(needs)))
    if not kernels:
        raise MoetrtError(f"{compiler} built moetrt's CPU kernel for none of "
                          f"{', '.join(target.name for target in targets(arch))}; build with --moe-kernel onnxruntime")
    build_op_library(work, compiler)
    return tuple(kernels)


def build_op_library(work: Path, compiler: str) -> None:
    """moetrt's onnxruntime op library (plugins/ort_ops.py; no instruction-set flags) compiled into the engine's
    `kernels/`, so that serving hosts without a compiler run the segments as one graph too. Without it (it did not
    compile: a note says why) hosts compile it at load, or run the segments one by one."""
    from moetrt.plugins import ort_ops
    from moetrt.plugins.cpu_experts import cached_build, cannot_compile_here, compile_kernel

    try:
        if cannot_compile_here() is None:
            shutil.copyfile(cached_build(ort_ops.FLAGS, compiler, ort_ops.SOURCE)[0], work / ort_ops.CARRIED)
            os.chmod(work / ort_ops.CARRIED, 0o755)
        else:
            compile_kernel(work / ort_ops.CARRIED, ort_ops.FLAGS, compiler, ort_ops.SOURCE)
    except MoetrtError as error:
        note(f"experts: no onnxruntime op library in the engine ({error}); hosts compile it at load or run the "
             "segments one by one")


def _optimize(source: str | bytes, target: Path, data_file: str, provider: str,
              external_data_dir: Path | None = None) -> None:
    """ONNX Runtime's offline optimisation of `source` (a path, or a serialized model whose external data is in
    `external_data_dir`) saved as `target` with its initializers in `data_file` beside it."""
    import onnxruntime as ort

    ort.disable_telemetry_events()  # usage telemetry (Windows builds' ETW events): off
    options = ort.SessionOptions()
    if external_data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{OPTIMIZATION_LEVEL.upper()}")
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(MATMULNBITS_ACCURACY_LEVEL))
    options.log_severity_level = 3
    try:
        ort.InferenceSession(source, options, providers=[provider])
    except Exception as error:  # onnxruntime raises its own exception types
        if "NOT_IMPLEMENTED" in str(error):
            raise MoetrtError(
                f"ONNX Runtime's {provider} cannot run this graph ({str(error).splitlines()[0][:200]}); "
                "build a float32 engine for the CPU"
            ) from None
        raise
    _keep_used_opsets(target)


def _keep_used_opsets(path: Path) -> None:
    """ONNX Runtime's saved model imports every op domain registered in the process, custom-op libraries loaded by
    earlier sessions included; keep the domains the graph uses, so the engine does not depend on process history."""
    import onnx

    from moetrt.export.trt.check import walk

    model = onnx.load(str(path), load_external_data=False)
    used = {"", "ai.onnx", *(node.domain for node in walk(model.graph))}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    if len(kept) < len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)
        onnx.save(model, str(path))
