"""A TensorRT engine build, planned without TensorRT: optimization profiles, plugin form, cache location.

`plan_trt_build` turns the max flags into the two optimization profiles (prefill: up to max_seq new tokens on a
cache of up to max_context; decode: exactly one token, on a past padded up to max_context so that decode steps can
replay CUDA graphs) and says whether the engine will need Python at run time. `dry_run_trt` (`moetrt build-engine
--dry-run`) exports if needed, runs export/trt/check.py and returns the plan and the report; no GPU is needed.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from moetrt.errors import MoetrtError
from moetrt.formats import ExportInfo, TensorIO, read_export_info
from moetrt.settings import BuildConfig, BuildProfile, cache_dir

if TYPE_CHECKING:
    from moetrt.export.trt.check import TrtCheckReport

Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max)

TARGETS = ("trt", "onnx")  # export targets a TensorRT engine builds from
# TensorRT's default level, stated: 0-2 build faster with fewer tactics, 4-5 search longer.
OPTIMIZATION_LEVEL = 3
QUANTIZED_REFUSAL = ("TensorRT engines are not quantized yet; quantize for ONNX Runtime (build-engine --backend ort, "
                     "export --target ort)")


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, Shapes]  # graph input -> (min, opt, max)


@dataclasses.dataclass(frozen=True)
class TrtBuildPlan:
    profiles: tuple[Profile, ...]
    plugin_form: str  # "aot", "jit", or "none" for the portable (standard-ops) lowering
    optimization_level: int = OPTIMIZATION_LEVEL

    @property
    def python_at_runtime(self) -> bool:
        """JIT plugins call back into Python (torch + triton) on every enqueue; AOT and portable engines do not."""
        return self.plugin_form == "jit"

    def describe(self) -> str:
        lines = [f"plugin form: {self.plugin_form}" + (" (needs Python, torch and triton at run time)"
                                                         if self.python_at_runtime else " (no Python at run time)"),
                 f"strongly typed network, builder optimization level {self.optimization_level}"]
        for profile in self.profiles:
            lines.append(f"profile {profile.name}:")
            lines += [f"  {name}: min {lo} opt {opt} max {hi}" for name, (lo, opt, hi) in profile.shapes.items()]
        return "\n".join(lines)


def dimension_ranges(max_batch: int, max_seq: int, max_context: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of every symbolic dimension of the graph's inputs, per profile."""
    return {
        "prefill": {
            "batch": (1, 1, max_batch),
            "seq": (1, max_seq, max_seq),
            "past_len": (0, 0, max_context - 1),  # chunks after the first see the cache so far
            "total_len": (1, max_seq, max_context),
            "n_logits": (0, 1, max_seq),  # none for early chunks, one for the last, all for scoring
        },
        "decode": {
            "batch": (1, max_batch, max_batch),
            "seq": (1, 1, 1),
            "past_len": (0, max_context // 2, max_context),  # padded to a bucket for CUDA-graph replay
            "total_len": (1, max_context // 2 + 1, max_context + 1),
            "n_logits": (1, 1, 1),
        },
    }


def optimization_profiles(inputs: tuple[TensorIO, ...], profile: BuildProfile) -> tuple[Profile, ...]:
    """The prefill and decode profiles for the graph inputs an export records (formats.GraphIO.inputs)."""
    if profile.max_context is None:
        raise MoetrtError("the build profile has no max_context yet: fit it to the model first (settings.fit_profile)")
    profiles = []
    for name, ranges in dimension_ranges(profile.max_batch, profile.seq, profile.max_context).items():
        shapes: dict[str, Shapes] = {}
        for spec in inputs:
            dims = [(d, d, d) if isinstance(d, int) else ranges[d] for d in spec.shape]
            low, opt, high = (tuple(dim[i] for dim in dims) for i in range(3))
            shapes[spec.name] = (low, opt, high)
        profiles.append(Profile(name, shapes))
    return tuple(profiles)


def plan_trt_build(info: ExportInfo, profile: BuildProfile, plugin: str = "aot") -> TrtBuildPlan:
    """The build plan for an export (its typed export.json) under `profile`; plugin: "aot" or "jit"."""
    if info.target not in TARGETS:
        raise MoetrtError(f"the export was made for target {info.target}; TensorRT builds from trt or onnx exports "
                          "(re-export with --target trt)")
    profiles = optimization_profiles(info.io.inputs, profile)
    return TrtBuildPlan(profiles, plugin if info.target == "trt" else "none")


def timing_cache_path(trt_version: str, gpu: str, compute_capability: tuple[int, int],
                      driver_version: int | None) -> Path:
    """Reused across builds; one file per TensorRT version, GPU model (an H100 and an H200 are both sm_90 but time
    differently) and CUDA driver (e.g. 13000), which is what a timing cache's timings hold for."""
    major, minor = compute_capability
    model = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") or "gpu"
    driver = f"cuda{driver_version // 1000}.{driver_version % 1000 // 10}" if driver_version else "cuda-unknown"
    return cache_dir() / f"trt-timing-{trt_version}-{model}-sm{major}{minor}-{driver}.cache"


def dry_run_trt(source: str | Path, config: BuildConfig) -> tuple[TrtBuildPlan, TrtCheckReport]:
    """(plan, report) for a TensorRT build of `source` (checkpoint: exported to a temporary directory first)."""
    from moetrt.export.engine import export_for, fit_to_model
    from moetrt.export.trt.check import check_trt_export

    config = fit_to_model(Path(source), config)
    with tempfile.TemporaryDirectory(prefix="moetrt-dry-run-") as scratch:
        export_dir = export_for(Path(source), Path(scratch) / "export", "trt", config)
        info = read_export_info(export_dir)
        return plan_trt_build(info, config.profile, config.trt.plugin), check_trt_export(export_dir)
