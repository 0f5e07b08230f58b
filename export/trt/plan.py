"""A TensorRT engine build, planned without TensorRT: optimization profiles, plugin form, cache location.

`plan_trt_build` turns the max flags into the two optimization profiles (prefill: up to max_seq new tokens on a
cache of up to max_context; decode: exactly one token, on a past padded up to max_context so that decode steps can
replay CUDA graphs) and says whether the engine will need Python at run time. `dry_run_trt` (`moetrt build-engine
--dry-run`) exports if needed, runs export/trt_check.py and returns the plan and the report; no GPU is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetrt.errors import MoetrtError

if TYPE_CHECKING:
    from moetrt.export.trt_check import TrtCheckReport

Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max)

PLUGIN_FORMS = ("aot", "jit")
# TensorRT's default level, stated: 0-2 build faster with fewer tactics, 4-5 search longer.
OPTIMIZATION_LEVEL = 3
PLAN_FILE = "model.plan"


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


def optimization_profiles(
    inputs: list[dict[str, Any]], max_batch: int, max_seq: int, max_context: int
) -> tuple[Profile, ...]:
    """The prefill and decode profiles for the graph inputs of export.json (`[{name, dtype, shape}]`)."""
    profiles = []
    for name, ranges in dimension_ranges(max_batch, max_seq, max_context).items():
        shapes: dict[str, Shapes] = {}
        for spec in inputs:
            dims = [(d, d, d) if isinstance(d, int) else ranges[d] for d in spec["shape"]]
            low, opt, high = (tuple(dim[i] for dim in dims) for i in range(3))
            shapes[spec["name"]] = (low, opt, high)
        profiles.append(Profile(name, shapes))
    return tuple(profiles)


def plan_trt_build(export_dir: Path, limits: dict[str, int], plugin: str = "aot") -> TrtBuildPlan:
    """The build plan for `export_dir` (its export.json) under limits {max_batch, max_seq, max_context}."""
    if plugin not in PLUGIN_FORMS:
        raise MoetrtError(f"--trt-plugin {plugin!r} is not one of {', '.join(PLUGIN_FORMS)}")
    described = json.loads((export_dir / "export.json").read_text())
    if described["target"] not in ("trt", "onnx"):
        raise MoetrtError(f"{export_dir} was exported for target {described['target']}; TensorRT builds from trt "
                          "or onnx exports (re-export with --target trt)")
    profiles = optimization_profiles(described["inputs"], limits["max_batch"], limits["max_seq"],
                                     limits["max_context"])
    return TrtBuildPlan(profiles, plugin if described["target"] == "trt" else "none")


def timing_cache_path(trt_version: str, compute_capability: tuple[int, int]) -> Path:
    """Reused across builds; one file per TensorRT version and GPU, which is what a timing cache is valid for."""
    root = Path(os.environ.get("MOETRT_CACHE_DIR") or Path.home() / ".cache" / "moetrt")
    major, minor = compute_capability
    return root / f"trt-timing-{trt_version}-sm{major}{minor}.cache"


def dry_run_trt(
    source: str | Path, limits: dict[str, int], portable: bool = False, plugin: str = "aot", dtype: str | None = None
) -> tuple[TrtBuildPlan, TrtCheckReport]:
    """(plan, report) for a TensorRT build of `source` (checkpoint: exported to a temporary directory first)."""
    from moetrt.export.onnx_export import EXPORT_JSON, export_onnx
    from moetrt.export.trt_check import check_trt_export

    source = Path(source)
    if (source / EXPORT_JSON).is_file():
        return plan_trt_build(source, limits, plugin), check_trt_export(source)
    if not (source / "config.json").is_file():
        raise MoetrtError(f"{source} is neither a checkpoint (config.json) nor an export directory (export.json)")
    with tempfile.TemporaryDirectory(prefix="moetrt-dry-run-") as scratch:
        export_dir = export_onnx(source, Path(scratch) / "export", target="onnx" if portable else "trt",
                                 dtype=dtype or "float32")
        return plan_trt_build(export_dir, limits, plugin), check_trt_export(export_dir)
