"""The ONNX Runtime build backend: plan (export/ort/plan.py), lower (lower.py), split (split.py), build (build.py)."""

from __future__ import annotations

from pathlib import Path

from moetrt.config import ModelConfig
from moetrt.export.lowering import LoweringPlan
from moetrt.formats import ExportInfo, OrtSection
from moetrt.settings import BuildConfig


class OrtBackend:
    name = "ort"
    targets = ("ort", "onnx")

    def unavailable_reason(self) -> str | None:
        return None  # onnxruntime is a core dependency

    def plan(self, config: BuildConfig, model: ModelConfig, dtype: str) -> LoweringPlan:
        from moetrt.export.ort.plan import plan_ort
        from moetrt.quantization import scheme_for

        return plan_ort(config.ort, model, dtype, scheme_for(config.quantize, config.group_size))

    def check_export(self, info: ExportInfo, config: BuildConfig, source: str) -> None:
        from moetrt.export.ort.plan import check_export

        check_export(info, config.ort, source)

    def build(self, export_dir: Path, info: ExportInfo, work: Path, config: BuildConfig) -> OrtSection:
        from moetrt.export.ort.build import build_ort

        return build_ort(export_dir, info, work)


BACKEND = OrtBackend()
