"""Build configuration: the shape profile and the per-backend option groups, each default in one field.

`BuildConfig` composes them (as vLLM's top-level config composes model, cache and parallel configs):
`build_engine(checkpoint, out, BuildConfig(profile=BuildProfile(max_context=2048), ort=OrtOptions(moe_kernel=
"moetrt")))`. The runtime's generation defaults live in `moetrt.runtime.requests`; the cache folder is here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from moetrt.config import ModelConfig
from moetrt.errors import MoetrtError

BACKEND_CHOICES = ("auto", "ort", "trt")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
MOE_KERNEL_CHOICES = ("auto", "moetrt", "onnxruntime")
TRT_PLUGIN_CHOICES = ("aot", "jit")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Tokens per graph call when max_seq is not given: the prefill chunk, capped by the context.
DEFAULT_MAX_SEQ = 512
# Without --max-context an engine gets the model's whole context, cut (to a multiple of 256) where the latent cache of
# max_batch sequences that long would pass this many bytes: 163840 positions of DeepSeek-V3 take 11.5 GB each in bf16.
DEFAULT_LATENT_CACHE_BYTES = 8 << 30
CACHE_DIR_ENV = "MOETRT_CACHE_DIR"


def cache_dir() -> Path:
    """Where moetrt keeps what it compiles or measures once per machine: compiled CPU kernels, TensorRT timing
    caches. `$MOETRT_CACHE_DIR`, else `~/.cache/moetrt`."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "moetrt")


@dataclasses.dataclass(frozen=True)
class BuildProfile:
    """The shapes an engine serves: at most `max_batch` sequences, `max_seq` new tokens per graph call (the prefill
    chunk; None = min(512, max_context)) and `max_context` cached positions per sequence (None: chosen from the
    model when the build fits the profile to it, `fit_profile`). TensorRT builds its optimization profiles from
    these; the runtime sizes its latent cache by them. Raises MoetrtError when a value is below 1 or max_seq
    exceeds max_context."""

    max_batch: int = 8
    max_context: int | None = None
    max_seq: int | None = None

    def __post_init__(self) -> None:
        if self.max_seq is None and self.max_context is not None:
            object.__setattr__(self, "max_seq", min(DEFAULT_MAX_SEQ, self.max_context))
        for name in ("max_batch", "max_seq", "max_context"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MoetrtError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_seq is not None and self.max_context is not None and self.max_seq > self.max_context:
            raise MoetrtError(f"--max-seq ({self.max_seq}) cannot exceed --max-context ({self.max_context})")

    @property
    def seq(self) -> int:
        """max_seq, resolved (never None once max_context is known)."""
        assert self.max_seq is not None
        return self.max_seq


def fit_profile(profile: BuildProfile, model: ModelConfig, dtype: str,
                allow_long_context: bool = False, mtp_layers: int = 0) -> tuple[BuildProfile, str]:
    """`profile` fitted to `model` for an engine in `dtype`, and a line saying how its context was chosen.

    A given max_context beyond what the model supports (ModelConfig.supported_context) raises MoetrtError naming
    the limit, unless `allow_long_context`; without one the engine gets the model's context, cut where the
    latent cache of max_batch sequences would pass DEFAULT_LATENT_CACHE_BYTES (`mtp_layers`: the MTP module's
    cache layers, an --mtp engine's).
    """
    limit, per_token = model.supported_context, model.latent_bytes_per_token(DTYPE_BYTES[dtype], mtp_layers)
    extended = model.rope.kind == "yarn" and limit > model.max_position_embeddings
    source = (f"YaRN's {model.rope.original_max_position_embeddings} x {model.rope.factor:g}" if extended
              else f"max_position_embeddings {model.max_position_embeddings}")
    layers = f"{model.num_hidden_layers} layers" + (f" + {mtp_layers} MTP" if mtp_layers else "")
    cache = (f"latent cache {per_token:,} bytes per token ({layers} x {model.latent_dim} values x "
             f"{DTYPE_BYTES[dtype]} bytes)")
    context = profile.max_context
    if context is not None and context > limit and not allow_long_context:
        raise MoetrtError(f"--max-context {context} exceeds the {limit} positions this {model.model_type} model "
                          f"supports ({source}); pass --allow-long-context to build it anyway")
    if context is not None:
        beyond = " (beyond the model's, --allow-long-context)" if context > limit else ""
        return profile, f"context: {context} positions{beyond}, the model supports {limit}; {cache}"
    affordable = DEFAULT_LATENT_CACHE_BYTES // (profile.max_batch * per_token)
    context = limit if affordable >= limit else max(min(limit, 256), affordable // 256 * 256)
    why = (f"the model's ({source})" if context == limit else
           f"of the model's {limit}, so that {profile.max_batch} sequences' latent cache fits "
           f"{DEFAULT_LATENT_CACHE_BYTES / 2**30:g} GiB; --max-context sets it")
    fitted = dataclasses.replace(profile, max_context=context)
    return fitted, f"context: {context} positions, {why}; {cache}"


@dataclasses.dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime engines. moe_kernel: who runs the routed experts, "onnxruntime" (its com.microsoft::MoE op),
    "moetrt" (moetrt's CPU kernel) or "auto" (decided by the backend's plan, export/ort/plan.py). expert_slices:
    sub-experts per expert that balance the CPU MoE op's threads; None = one per CPU thread (1 on a GPU)."""

    moe_kernel: str = "auto"
    expert_slices: int | None = None

    def __post_init__(self) -> None:
        if self.moe_kernel not in MOE_KERNEL_CHOICES:
            raise MoetrtError(f"--moe-kernel must be one of {', '.join(MOE_KERNEL_CHOICES)}, got {self.moe_kernel!r}")
        if self.expert_slices is not None and self.expert_slices < 1:
            raise MoetrtError(f"expert_slices must be at least 1, got {self.expert_slices}")


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """TensorRT engines. plugin: the routed-experts plugin's form, "aot" (PTX in the engine, no Python at run time)
    or "jit". portable: build from the standard-ops lowering instead (no plugin)."""

    plugin: str = "aot"
    portable: bool = False

    def __post_init__(self) -> None:
        if self.plugin not in TRT_PLUGIN_CHOICES:
            raise MoetrtError(f"--trt-plugin {self.plugin!r} is not one of {', '.join(TRT_PLUGIN_CHOICES)}")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything `build_engine` takes besides its source and output: the backend ("auto" picks TensorRT where it
    and a GPU are present, else ONNX Runtime), the dtype (None: float32, or an export's own), the shape profile,
    whether a max_context beyond the model's may be built (`fit_profile`), each backend's options (only the
    chosen backend's are read), and the weight quantization: `quantize` "none", "int8" or "int4" with one scale per
    `group_size` input channels (moetrt/quantization.py). `mtp`: trace the speculative graph with the
    checkpoint's multi-token-prediction module (DeepSeek-V3's MTP), which `--speculative mtp` drafts with."""

    backend: str = "auto"
    dtype: str | None = None
    profile: BuildProfile = BuildProfile()
    allow_long_context: bool = False
    ort: OrtOptions = OrtOptions()
    trt: TrtOptions = TrtOptions()
    quantize: str = "none"
    group_size: int = 32
    mtp: bool = False

    def __post_init__(self) -> None:
        from moetrt.quantization import scheme_for

        scheme_for(self.quantize, self.group_size)  # refuses an unknown scheme or group size
        if self.backend not in BACKEND_CHOICES:
            raise MoetrtError(f"backend {self.backend!r} is not one of {', '.join(BACKEND_CHOICES)}")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise MoetrtError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
