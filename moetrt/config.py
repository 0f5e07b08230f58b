"""The model config of a DeepSeek-V2/V3-family checkpoint, read from its `config.json` (torch-free).

One dataclass holds every field the architecture uses; `parse_config` fills it from either the published
configs (legacy `rope_scaling` + `rope_theta`) or transformers 5.x output (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.jsonfile import read_json_object

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# Fields every supported config.json must carry; anything else has a default from the model family.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "rms_norm_eps",
    "max_position_embeddings",
)

# Router semantics the transformers-written configs leave implicit, per model type.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
}
ROUTERS = {("sigmoid", "noaux_tc"), ("softmax", "greedy"), ("softmax", "group_limited_greedy")}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: plain RoPE or YaRN (`kind="yarn"`) with DeepSeek's mscale corrections."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """Block-quantised FP8 weights: e4m3 values with an fp32 `weight_scale_inv` per block."""

    fmt: str = "e4m3"
    block_size: tuple[int, int] = (128, 128)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every config field the DeepSeek-V2/V3 architecture uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    scoring_func: str
    topk_method: str
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0
    fp8: FP8Config | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint's weights are stored in ("dtype" in transformers 5)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by MLA: the compressed KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def uses_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek applies it."""
        scale = self.qk_head_dim**-0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            mscale = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= mscale * mscale
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `ModelConfig.from_dict` reads back (used by export JSON and manifests)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        if data.get("fp8"):
            fp8 = dict(data["fp8"])
            fp8["block_size"] = tuple(fp8["block_size"])
            data["fp8"] = FP8Config(**fp8)
        return cls(**data)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read `CHECKPOINT_DIR/config.json`; raises MoetrtError naming what is missing or unsupported."""
    path = Path(checkpoint_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MoetrtError(f"no config.json at {path}: point at a Hugging Face checkpoint directory")
    return parse_config(read_json_object(path, "restore the checkpoint's config.json"), source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MoetrtError(
            f"{source}: model_type {model_type!r} is not supported; moetrt reads "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    missing = [name for name in REQUIRED_FIELDS if raw.get(name) is None]
    if missing:
        raise MoetrtError(f"{source}: missing field(s) {', '.join(missing)} required for {model_type}")
    if raw.get("hidden_act", "silu") != "silu":
        raise MoetrtError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")

    family = FAMILY_DEFAULTS[model_type]
    scoring_func = raw.get("scoring_func") or family["scoring_func"]
    topk_method = raw.get("topk_method") or family["topk_method"]
    if (scoring_func, topk_method) not in ROUTERS:
        raise MoetrtError(
            f"{source}: router scoring_func={scoring_func!r} with topk_method={topk_method!r} is not supported"
        )
    norm_topk_prob = raw.get("norm_topk_prob")
    if norm_topk_prob is None:
        norm_topk_prob = family["norm_topk_prob"]

    config = ModelConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        q_lora_rank=None if raw.get("q_lora_rank") is None else int(raw["q_lora_rank"]),
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
        qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
        v_head_dim=int(raw["v_head_dim"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        n_routed_experts=int(raw["n_routed_experts"]),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        n_shared_experts=int(raw["n_shared_experts"]),
        first_k_dense_replace=int(raw["first_k_dense_replace"]),
        moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
        n_group=int(raw["n_group"]),
        topk_group=int(raw["topk_group"]),
        norm_topk_prob=bool(norm_topk_prob),
        routed_scaling_factor=float(raw["routed_scaling_factor"]),
        scoring_func=scoring_func,
        topk_method=topk_method,
        rms_norm_eps=float(raw["rms_norm_eps"]),
        max_position_embeddings=int(raw["max_position_embeddings"]),
        rope=_parse_rope(raw, source),
        rope_interleave=bool(raw.get("rope_interleave", True)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
        fp8=_parse_quantization(raw.get("quantization_config"), source),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
    )
    _check_consistency(config, raw, source)
    return config


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise MoetrtError(f"{source}: missing field rope_theta (top level or in rope_parameters)")
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind != "yarn":
        raise MoetrtError(f"{source}: rope type {kind!r} is not supported (default or yarn)")
    if params.get("factor") is None:
        raise MoetrtError(f"{source}: yarn rope scaling is missing field factor")
    original = params.get("original_max_position_embeddings") or raw["max_position_embeddings"]
    return RopeConfig(
        theta=float(theta),
        kind="yarn",
        factor=float(params["factor"]),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=None if params.get("mscale") is None else float(params["mscale"]),
        mscale_all_dim=None if params.get("mscale_all_dim") is None else float(params["mscale_all_dim"]),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        truncate=bool(params.get("truncate", True)),
    )


def _parse_quantization(quant: dict[str, Any] | None, source: str) -> FP8Config | None:
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise MoetrtError(f"{source}: quantization {method!r} is not supported (only DeepSeek's block fp8)")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise MoetrtError(f"{source}: fp8 format {fmt!r} is not supported (only e4m3)")
    block = tuple(int(b) for b in quant.get("weight_block_size", (128, 128)))
    if len(block) != 2:
        raise MoetrtError(f"{source}: weight_block_size must have two entries, got {list(block)}")
    return FP8Config(fmt=fmt, block_size=(block[0], block[1]))


def _check_consistency(config: ModelConfig, raw: dict[str, Any], source: str) -> None:
    kv_heads = raw.get("num_key_value_heads")
    if kv_heads is not None and int(kv_heads) != config.num_attention_heads:
        raise MoetrtError(f"{source}: MLA needs num_key_value_heads == num_attention_heads, got {kv_heads}")
    if config.n_routed_experts:
        if config.n_routed_experts % config.n_group:
            raise MoetrtError(f"{source}: n_routed_experts must be a multiple of n_group")
        if not 1 <= config.topk_group <= config.n_group:
            raise MoetrtError(f"{source}: topk_group must lie in 1..n_group")
        if config.num_experts_per_tok > config.n_routed_experts:
            raise MoetrtError(f"{source}: num_experts_per_tok exceeds n_routed_experts")
        per_group = config.n_routed_experts // config.n_group
        grouped = config.topk_method in ("noaux_tc", "group_limited_greedy")
        if grouped and config.num_experts_per_tok > config.topk_group * per_group:
            raise MoetrtError(f"{source}: num_experts_per_tok exceeds the experts of the topk_group kept groups")
        if config.topk_method == "noaux_tc" and per_group < 2:
            raise MoetrtError(f"{source}: noaux_tc scores a group by its top-2, so each group needs 2+ experts")
    if config.moe_layer_freq < 1:
        raise MoetrtError(f"{source}: moe_layer_freq must be at least 1")
