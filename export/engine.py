"""`build_engine`: checkpoint or export directory -> self-describing engine directory (ONNX Runtime or TensorRT).

The ONNX Runtime engine is the `ort` lowering with ONNX Runtime's graph optimisations applied ahead of time
and saved, so loading skips them. The directory is staged and renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moetrt.atomic import staging_dir, write_json
from moetrt.errors import MoetrtError
from moetrt.export.onnx_export import DATA_FILE, EXPORT_JSON, MODEL_FILE, TOKENIZER_FILES, export_onnx
from moetrt.progress import note
from moetrt.runtime import hardware
from moetrt.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, artifact_records
from moetrt.versions import package_version, tool_versions

BACKENDS = ("auto", "ort", "trt")
# Which export targets each backend can run.
BACKEND_TARGETS = {"ort": ("ort", "onnx"), "trt": ("trt", "onnx")}
ORT_OPTIMIZATION = "all"


def trt_unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed"
    if not hasattr(tensorrt, "Builder"):  # type stubs make `tensorrt` an importable namespace package
        return "TensorRT is not installed"
    if not hardware.cuda_devices():
        return "no CUDA GPU is visible"
    return None


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why): `auto` is TensorRT where TensorRT and a GPU are present, ONNX Runtime otherwise."""
    if requested not in BACKENDS:
        raise MoetrtError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "as requested"
    reason = trt_unavailable_reason()
    if reason is None:
        return "trt", "TensorRT and a CUDA GPU are present"
    return "ort", f"{reason}, so ONNX Runtime"


def ort_provider() -> str:
    """CUDA when onnxruntime-gpu and a GPU are present, else the CPU."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and hardware.cuda_devices():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def build_engine(
    source: str | Path,
    engine_dir: str | Path,
    backend: str = "auto",
    dtype: str | None = None,
    max_batch: int = 8,
    max_seq: int | None = None,
    max_context: int = 4096,
    portable: bool = False,
    trt_plugin: str = "aot",
    expert_slices: int | None = None,
    moe_kernel: str = "auto",
) -> Path:
    """Build an engine from a checkpoint directory (exported first) or an export directory.

    backend: "auto", "ort" or "trt". max_batch / max_seq (tokens per call, the prefill chunk; default
    min(512, max_context)) / max_context (cached positions) bound the shapes: TensorRT's optimisation profiles, the runtime's cache. portable:
    build from the standard-ops lowering (no plugin). trt_plugin: the expert-dispatch plugin's form in a TensorRT
    engine, "aot" (no Python at run time) or "jit". expert_slices: for ONNX Runtime on the CPU, sub-experts per
    expert that balance the MoE kernel's threads (default: one per CPU thread; see `export/passes/ort.py`).
    moe_kernel: for ONNX Runtime, "onnxruntime" (its MoE op), "moetrt" (moetrt's CPU expert kernel) or "auto".
    Returns the engine directory.
    """
    source, engine_dir = Path(source), Path(engine_dir)
    max_seq = min(512, max_context) if max_seq is None else max_seq
    for name, value in (("max_batch", max_batch), ("max_seq", max_seq), ("max_context", max_context)):
        if value < 1:
            raise MoetrtError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if max_seq > max_context:
        raise MoetrtError(f"--max-seq ({max_seq}) cannot exceed --max-context ({max_context})")
    chosen, why = choose_backend(backend)
    if chosen == "trt":
        reason = trt_unavailable_reason()
        if reason:
            raise MoetrtError(f"cannot build a TensorRT engine: {reason}; `--backend ort` works on this machine")
    note(f"backend: {chosen} ({why})")
    profile = {"max_batch": max_batch, "max_seq": max_seq, "max_context": max_context}

    with staging_dir(engine_dir) as work:
        if chosen == "ort" and expert_slices is None and ort_provider() != "CPUExecutionProvider":
            expert_slices = 1  # the CUDA kernel has no static thread split to balance
        export_dir = _export_for(source, work / ".export", chosen, dtype, portable, expert_slices, moe_kernel)
        described = json.loads((export_dir / EXPORT_JSON).read_text())
        if chosen == "ort":
            backend_section = {**build_ort(export_dir, work, described.get("moe_kernel", "onnxruntime")),
                               "expert_slices": described.get("expert_slices", 1)}
            if backend_section["moe_kernel"] == "moetrt":
                note(f"experts: moetrt's CPU kernel, the graph cut into {len(backend_section['segments'])} segments")
        else:
            from moetrt.export.trt_build import build_trt

            backend_section = build_trt(export_dir, work, profile, plugin=trt_plugin)
        for name in (*TOKENIZER_FILES, "config.json"):
            if (export_dir / name).is_file():
                shutil.copyfile(export_dir / name, work / name)
        shutil.rmtree(work / ".export", ignore_errors=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": chosen,
            "dtype": described["dtype"],
            "export_target": described["target"],
            "model_config": described["model_config"],
            "tokenizer": (work / "tokenizer.json").is_file(),
            "io": {key: described[key] for key in ("inputs", "outputs", "cache")},
            "profile": profile,
            chosen: backend_section,
            "artifacts": artifact_records(work),
            "versions": {**tool_versions(), "cuda_driver": hardware.cuda_driver_version()},
        }
        write_json(work / MANIFEST, manifest)
    return engine_dir


def _export_for(source: Path, scratch: Path, backend: str, dtype: str | None, portable: bool,
                expert_slices: int | None = None, moe_kernel: str = "auto") -> Path:
    """The export directory to build from: `source` itself if it is one, else a fresh export of it."""
    if (source / EXPORT_JSON).is_file():
        described = json.loads((source / EXPORT_JSON).read_text())
        if described["target"] not in BACKEND_TARGETS[backend]:
            raise MoetrtError(
                f"{source} was exported for target {described['target']}; the {backend} backend builds from "
                f"{' or '.join(BACKEND_TARGETS[backend])} exports (re-export with --target {backend})"
            )
        if dtype and dtype != described["dtype"]:
            raise MoetrtError(f"{source} was exported in {described['dtype']}; --dtype {dtype} needs a re-export")
        if portable and described["target"] != "onnx":
            raise MoetrtError(f"--portable builds from the standard-ops lowering; {source} was exported for target "
                              f"{described['target']} (re-export with --target onnx)")
        recorded = described.get("moe_kernel", "onnxruntime")
        if described["target"] == "ort" and moe_kernel not in ("auto", recorded):
            raise MoetrtError(f"{source} was exported with its experts in {recorded}; --moe-kernel {moe_kernel} "
                              "needs a re-export (moetrt export --moe-kernel ...)")
        return source
    if not (source / "config.json").is_file():
        raise MoetrtError(f"{source} is neither a checkpoint (config.json) nor an export directory (export.json)")
    target = "onnx" if portable else backend
    return export_onnx(source, scratch, target=target, dtype=dtype or "float32", expert_slices=expert_slices,
                       moe_kernel=moe_kernel)


def build_ort(export_dir: Path, work: Path, moe_kernel: str = "onnxruntime") -> dict:
    """Optimise the export with ONNX Runtime ahead of time and save the result as the engine's graph.

    An export lowered for moetrt's CPU expert kernel (`moe_kernel`, as its export.json records) is cut into segments around its expert nodes first
    (export/split.py); each segment is optimised the same way and the packed experts go to `experts.bin`."""
    from moetrt.export.split import EXPERTS_FILE, split

    provider = ort_provider()
    section = {
        "package": "onnxruntime-gpu" if package_version("onnxruntime-gpu") else "onnxruntime",
        "provider": provider,
        "optimization_level": ORT_OPTIMIZATION,
        "cpu_arch": hardware.cpu_arch(),
        "cpu_flags": list(hardware.cpu_flags()),
        "gpu_compute_capability": _first_gpu_capability() if provider == "CUDAExecutionProvider" else None,
    }
    if moe_kernel != "moetrt":
        _optimize(str(export_dir / MODEL_FILE), work / MODEL_FILE, DATA_FILE, provider)
        return {"model": MODEL_FILE, "external_data": DATA_FILE, **section, "moe_kernel": "onnxruntime"}
    if provider != "CPUExecutionProvider":
        raise MoetrtError(f"{export_dir} runs its experts in moetrt's CPU kernel, but ONNX Runtime here would use "
                          f"{provider}; re-export with --moe-kernel onnxruntime")
    models, described, layers = split(export_dir, MODEL_FILE, work)
    segments = []
    for index, (model, io) in enumerate(zip(models, described)):
        name = f"segment{index}.onnx"
        _optimize(model, work / name, f"{name}.data", provider, external_data_dir=export_dir)
        segments.append({"model": name, **io})
    return {"segments": segments, "experts": {"file": EXPERTS_FILE, "layers": layers}, **section,
            "moe_kernel": "moetrt"}


def _optimize(source: str | bytes, target: Path, data_file: str, provider: str,
              external_data_dir: Path | None = None) -> None:
    """ONNX Runtime's offline optimisation of `source` (a path, or a serialized model whose external data is in
    `external_data_dir`) saved as `target` with its initializers in `data_file` beside it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if external_data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
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

    from moetrt.export.trt_check import walk

    model = onnx.load(str(path), load_external_data=False)
    used = {"", "ai.onnx", *(node.domain for node in walk(model.graph))}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    if len(kept) < len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)
        onnx.save(model, str(path))


def _first_gpu_capability() -> list[int] | None:
    devices = hardware.cuda_devices()
    return list(devices[0].compute_capability) if devices else None

