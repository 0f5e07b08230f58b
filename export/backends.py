"""The build backends, in one table: each plans its lowering, checks its environment and builds its engine.

A backend is a package under export/ (`export/ort`, `export/trt`) whose `BACKEND` implements `BuildBackend`;
`build_engine` (export/engine.py) never branches on which one runs. The runtime side has its own table
(runtime/backends.py) for opening the engines these write.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from moetrt.config import ModelConfig
from moetrt.errors import MoetrtError
from moetrt.export.lowering import LoweringPlan
from moetrt.formats import ExportInfo, Section
from moetrt.quantization import QuantScheme
from moetrt.settings import BuildConfig, OrtOptions

# name -> the module whose BACKEND implements it (imported when used: TensorRT's only where asked for)
REGISTRY = {"ort": "moetrt.export.ort", "trt": "moetrt.export.trt"}


class BuildBackend(Protocol):
    name: str
    targets: tuple[str, ...]  # export targets this backend builds from

    def unavailable_reason(self) -> str | None:
        """Why this machine cannot build this backend's engines, or None."""
        ...

    def plan(self, config: BuildConfig, model: ModelConfig, dtype: str) -> LoweringPlan:
        """How to lower a fresh export of `model` for this backend under `config`."""
        ...

    def check_export(self, info: ExportInfo, config: BuildConfig, source: str) -> None:
        """Refuse (MoetrtError) an existing export that `config` contradicts."""
        ...

    def build(self, export_dir: Path, info: ExportInfo, work: Path, config: BuildConfig) -> Section:
        """Write the engine's backend artifacts into `work`; returns the manifest's backend section."""
        ...


def get_backend(name: str) -> BuildBackend:
    if name not in REGISTRY:
        raise MoetrtError(f"backend {name!r} is not one of {', '.join(REGISTRY)}")
    backend: BuildBackend = importlib.import_module(REGISTRY[name]).BACKEND
    return backend


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why): `auto` is TensorRT where TensorRT and a GPU are present, ONNX Runtime otherwise."""
    if requested != "auto":
        get_backend(requested)
        return requested, "as requested"
    reason = get_backend("trt").unavailable_reason()
    if reason is None:
        return "trt", "TensorRT and a CUDA GPU are present"
    return "ort", f"{reason}, so ONNX Runtime"


def plan_target(target: str, model: ModelConfig, dtype: str, ort: OrtOptions,
                quantize: QuantScheme | None = None) -> LoweringPlan:
    """The lowering for export target `target`: a backend's own target ("ort", "trt") as that backend plans it with
    default options (but `ort` and the quantization), the standard-ops target "onnx" as it is (it has no quantized
    experts: refused)."""
    quantized = {} if quantize is None else {"quantize": quantize.name, "group_size": quantize.group_size}
    if target in REGISTRY:
        return get_backend(target).plan(BuildConfig(ort=ort, **quantized), model, dtype)
    if quantize is not None:
        raise MoetrtError("the standard-ops (onnx) target has no quantized experts yet; export the quantized model "
                          "with --target ort")
    return LoweringPlan(target)

