"""`build_engine`: checkpoint or export directory -> self-describing engine directory, for any registered backend.

The backend (export/backends.py) plans the lowering, the checkpoint is exported for it (or an existing export is
checked against the options), the backend builds its artifacts, and the manifest (moetrt/formats.py) records
what was built. The directory is staged and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from moetrt import hardware
from moetrt.atomic import check_replaceable, discard_staging, staging_dir
from moetrt.config import load_config
from moetrt.errors import MoetrtError
from moetrt.export.backends import choose_backend, get_backend
from moetrt.export.calibration import check_overflow
from moetrt.export.resume import adopt_stale
from moetrt.formats import (
    EXPORT_JSON,
    MANIFEST,
    TOKENIZER_FILES,
    EngineManifest,
    ExportInfo,
    artifact_records,
    read_export_info,
    write_manifest,
)
from moetrt.progress import note
from moetrt.quantization import scheme_for
from moetrt.settings import BuildConfig, fit_profile
from moetrt.versions import tool_versions


def build_engine(source: str | Path, engine_dir: str | Path, config: BuildConfig | None = None,
                 **fields: Any) -> Path:
    """Build an engine from a checkpoint directory (exported first) or an export directory; returns `engine_dir`.

    `config` (default BuildConfig()) groups the options; keyword `fields` replace its fields, e.g.
    `build_engine(ckpt, out, backend="ort", profile=BuildProfile(max_context=2048), ort=OrtOptions("moetrt"))`.
    Raises MoetrtError for a backend this machine cannot build, an export that contradicts the options, bad
    limits, or a half-precision engine whose calibration prompts overflow (export/calibration.py); nothing is
    left at `engine_dir` then.
    """
    try:
        config = dataclasses.replace(config or BuildConfig(), **fields)
    except TypeError as error:
        raise MoetrtError(f"build_engine: {error}; options are {', '.join(f.name for f in dataclasses.fields(BuildConfig))}") from None
    source, engine_dir = Path(source), Path(engine_dir)
    check_replaceable(engine_dir, MANIFEST, "engine", (source,))
    if config.quantize != "none" and config.dtype is not None:  # first: every other fix would still meet this
        from moetrt.export.quantized import check_quantizable

        check_quantizable(config.dtype)
    if config.mtp and config.backend == "auto":  # the MTP module runs on ONNX Runtime only so far
        chosen, why = "ort", "--mtp engines run on ONNX Runtime"
    else:
        chosen, why = choose_backend(config.backend)
    backend = get_backend(chosen)
    reason = backend.unavailable_reason()
    if reason:
        raise MoetrtError(f"cannot build a {'TensorRT' if chosen == 'trt' else chosen} engine: {reason}; "
                          "`--backend ort` works on this machine")
    note(f"backend: {chosen} ({why})")
    if config.mtp and chosen != "ort":
        raise MoetrtError("--mtp engines (the multi-token-prediction module as a speculative decoder) are built for "
                          "ONNX Runtime only so far; build with --backend ort")
    config = fit_to_model(source, config)
    need = build_disk_bytes(source, config)
    # an earlier build into engine_dir that was killed: what it wrote is reused (export/resume.py)
    earlier = adopt_stale(engine_dir) if need is not None else []
    if earlier and need > hardware.disk_free(engine_dir):
        for staged in earlier:
            discard_staging(staged)
        note(f"removed what an earlier build into {engine_dir} left: this build needs its room")
        earlier = []
    if need is not None and need > hardware.disk_free(engine_dir):
        raise MoetrtError(f"the build writes about {need / 1e9:.1f} GB (the export and the engine), and "
                          f"{hardware.disk_free(engine_dir) / 1e9:.1f} GB are free at {engine_dir.resolve().parent}; free "
                          "space there or choose another -o")
    with staging_dir(engine_dir, need_bytes=need, keep_on_interrupt=True) as work:
        export_dir = export_for(source, work / ".export", chosen, config, earlier)
        info = read_export_info(export_dir)
        section = backend.build(export_dir, info, work, config)
        for name in (*TOKENIZER_FILES, "config.json"):
            if (export_dir / name).is_file():
                shutil.copyfile(export_dir / name, work / name)
        shutil.rmtree(work / ".export", ignore_errors=True)
        manifest = EngineManifest(
            backend=chosen, dtype=info.dtype, export_target=info.target, model_config=info.model_config,
            tokenizer=(work / "tokenizer.json").is_file(), io=info.io, profile=config.profile, section=section,
            artifacts=artifact_records(work),
            versions={**tool_versions(), "cuda_driver": hardware.cuda_driver_version()},
            quantization=info.quantization, checkpoint=info.checkpoint,
        )
        write_manifest(work, manifest)
        if info.dtype != "float32":  # half precision can overflow: refuse an engine that computes NaN
            check_overflow(work)
    for staged in earlier:
        discard_staging(staged)
    return engine_dir


def build_disk_bytes(source: Path, config: BuildConfig) -> int | None:
    """About what building from the checkpoint at `source` writes, in bytes: the export and the engine coexist until
    the end, twice the engine's weights (export/info.py engine_weight_bytes). None for an export directory."""
    from moetrt.export.info import engine_weight_bytes, planned_quantization

    if not (source / "config.json").is_file() or (source / EXPORT_JSON).is_file():
        return None
    planned = planned_quantization(config.quantize, config.group_size)
    return 2 * engine_weight_bytes(load_config(source), config.dtype or "float32", planned)


def fit_to_model(source: Path, config: BuildConfig) -> BuildConfig:
    """`config` with its profile fitted to the model at `source` (checkpoint or export directory) before any export:
    a max_context checked against what the model supports, or chosen from it (settings.fit_profile), said in a
    note. Raises MoetrtError for a max_context beyond the model's without allow_long_context."""
    if (source / EXPORT_JSON).is_file():
        info = read_export_info(source)
        model, dtype = info.model_config, info.dtype
    elif (source / "config.json").is_file():
        model, dtype = load_config(source), config.dtype or "float32"
    else:
        return config  # export_for says what the source lacks
    profile, how = fit_profile(config.profile, model, dtype, config.allow_long_context,
                               model.num_nextn_predict_layers if config.mtp else 0)
    note(how)
    return dataclasses.replace(config, profile=profile)


def export_for(source: Path, scratch: Path, backend_name: str, config: BuildConfig,
               resume_from: list[Path] | None = None) -> Path:
    """The export directory to build from: `source` itself if it is one (checked against `config`), else a fresh
    export of the checkpoint at `source` into `scratch`, lowered as the backend plans (reusing what the earlier
    builds' staging directories `resume_from` wrote: export_onnx)."""
    from moetrt.export.onnx_export import export_onnx

    backend = get_backend(backend_name)
    if (source / EXPORT_JSON).is_file():
        info = read_export_info(source)
        if info.target not in backend.targets:
            raise MoetrtError(
                f"{source} was exported for target {info.target}; the {backend_name} backend builds from "
                f"{' or '.join(backend.targets)} exports (re-export with --target {backend_name})"
            )
        if config.dtype and config.dtype != info.dtype:
            raise MoetrtError(f"{source} was exported in {info.dtype}; --dtype {config.dtype} needs a re-export")
        check_quantization(info, config, source)
        if info.io.mtp_layers != int(config.mtp):
            held = "with" if info.io.mtp_layers else "without"
            raise MoetrtError(f"{source} was exported {held} the multi-token-prediction module; build it "
                              f"{'with' if info.io.mtp_layers else 'without'} --mtp, or re-export the checkpoint "
                              f"{'without' if info.io.mtp_layers else 'with'} --mtp")
        backend.check_export(info, config, str(source))
        return source
    if not (source / "config.json").is_file():
        raise MoetrtError(f"{source} is neither a checkpoint (config.json) nor an export directory (export.json)")
    dtype = config.dtype or "float32"
    plan = backend.plan(config, load_config(source), dtype)
    return export_onnx(source, scratch, plan, dtype=dtype, quantize=scheme_for(config.quantize, config.group_size),
                       mtp=config.mtp, resume_from=resume_from, keep_journal=True)


def check_quantization(info: ExportInfo, config: BuildConfig, source: Path) -> None:
    """Refuse an export whose weight quantization is not the one `config` asks for (one line, both fixes)."""
    exported = info.quantization
    has = ("none", 0) if exported is None else (exported.scheme, exported.group_size)
    wanted = (config.quantize, config.group_size if config.quantize != "none" else 0)
    if has != wanted:
        held = "float weights" if exported is None else f"{exported.scheme} weights in groups of {exported.group_size}"
        options = "--quantize none" if exported is None else f"--quantize {has[0]} --group-size {has[1]}"
        again = "" if config.quantize == "none" else f" --group-size {config.group_size}"
        raise MoetrtError(f"{source} was exported with {held}; build it with {options}, or re-export the "
                          f"checkpoint with --quantize {config.quantize}{again}")
