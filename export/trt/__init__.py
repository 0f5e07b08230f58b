"""The TensorRT build backend: plan (export/trt/plan.py), lower (lower.py), check (check.py against support.py),
build (build.py). Only `build` imports TensorRT."""

from __future__ import annotations

from pathlib import Path

from moetrt import hardware
from moetrt.config import ModelConfig
from moetrt.errors import MoetrtError
from moetrt.export.lowering import LoweringPlan
from moetrt.export.trt.plan import QUANTIZED_REFUSAL, TARGETS
from moetrt.formats import ExportInfo, TrtSection
from moetrt.settings import BuildConfig


class TrtBackend:
    name = "trt"
    targets = TARGETS

    def unavailable_reason(self) -> str | None:
        try:
            import tensorrt
        except ImportError:
            return "TensorRT is not installed"
        if not hasattr(tensorrt, "Builder"):  # type stubs make `tensorrt` an importable namespace package
            return "TensorRT is not installed"
        if not hardware.cuda_devices():
            return "no CUDA GPU is visible"
        return None

    def plan(self, config: BuildConfig, model: ModelConfig, dtype: str) -> LoweringPlan:
        if config.quantize != "none":
            raise MoetrtError(QUANTIZED_REFUSAL)
        return LoweringPlan("onnx" if config.trt.portable else "trt")

    def check_export(self, info: ExportInfo, config: BuildConfig, source: str) -> None:
        if config.trt.portable and info.target != "onnx":
            raise MoetrtError(f"--portable builds from the standard-ops lowering; {source} was exported for target "
                              f"{info.target} (re-export with --target onnx)")

    def build(self, export_dir: Path, info: ExportInfo, work: Path, config: BuildConfig) -> TrtSection:
        from moetrt.export.trt.build import build_trt

        return build_trt(export_dir, info, work, config.profile, plugin=config.trt.plugin)


BACKEND = TrtBackend()
