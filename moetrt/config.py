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

# The fields of the architecture, in the order a refusal lists them.
ARCHITECTURE_FIELDS = (
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
# What transformers 5.x (DeepseekV3Config / DeepseekV2Config) gives a field that config.json leaves out.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_interleave": True,
    },
    "deepseek_v2": {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
        "num_hidden_layers": 32, "num_attention_heads": 32, "n_shared_experts": 2, "n_routed_experts": 64,
        "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": None, "topk_group": None, "num_experts_per_tok": None,
        "first_k_dense_replace": 0, "norm_topk_prob": False, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "topk_method": "greedy",
    },
}
# Group-limited routers read n_group and topk_group; the others never do, so those may be null or anything.
GROUPED_ROUTERS = ("noaux_tc", "group_limited_greedy")
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta


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
    def supported_context(self) -> int:
        """Positions the model supports: max_position_embeddings, or YaRN's extended window (original window x
        factor) where that is longer."""
        if self.rope.kind == "yarn" and self.rope.original_max_position_embeddings:
            extended = int(self.rope.original_max_position_embeddings * self.rope.factor)
            return max(self.max_position_embeddings, extended)
        return self.max_position_embeddings

    def latent_bytes_per_token(self, bytes_per_value: int, mtp_layers: int = 0) -> int:
        """Latent-cache bytes one token takes over all layers: layers x (kv_lora_rank + qk_rope_head_dim) values;
        `mtp_layers` (an --mtp engine's MTP module) keep a cache layer each too."""
        return (self.num_hidden_layers + mtp_layers) * self.latent_dim * bytes_per_value

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
    """The ModelConfig of a config.json dict, read as transformers 5.x reads it: an absent field takes the family's
    default, a null counts only where transformers' model runs with it (q_lora_rank, norm_topk_prob,
    rope_interleave, the rope dict, n_group/topk_group for a router that never groups), fields the family never
    reads are ignored. Raises MoetrtError naming what is missing or unsupported."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MoetrtError(
            f"{source}: model_type {model_type!r} is not supported; moetrt reads "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    fields = {**FAMILY_DEFAULTS[model_type], **raw}
    if fields.get("hidden_act", "silu") != "silu":
        raise MoetrtError(f"{source}: hidden_act {fields['hidden_act']!r} is not supported (only silu)")
    scoring_func, topk_method = _router(fields, model_type, source)
    if topk_method not in GROUPED_ROUTERS:
        fields.update(n_group=1, topk_group=1)
    missing = [name for name in ARCHITECTURE_FIELDS if fields.get(name) is None]
    if missing:
        raise MoetrtError(f"{source}: missing field(s) {', '.join(missing)} required for {model_type}")
    v2 = model_type == "deepseek_v2"

    config = ModelConfig(
        model_type=model_type,
        vocab_size=int(fields["vocab_size"]),
        hidden_size=int(fields["hidden_size"]),
        intermediate_size=int(fields["intermediate_size"]),
        num_hidden_layers=int(fields["num_hidden_layers"]),
        num_attention_heads=int(fields["num_attention_heads"]),
        q_lora_rank=None if fields.get("q_lora_rank") is None else int(fields["q_lora_rank"]),
        kv_lora_rank=int(fields["kv_lora_rank"]),
        qk_nope_head_dim=int(fields["qk_nope_head_dim"]),
        qk_rope_head_dim=int(fields["qk_rope_head_dim"]),
        v_head_dim=int(fields["v_head_dim"]),
        moe_intermediate_size=int(fields["moe_intermediate_size"]),
        n_routed_experts=int(fields["n_routed_experts"]),
        num_experts_per_tok=int(fields["num_experts_per_tok"]),
        n_shared_experts=int(fields["n_shared_experts"]),
        first_k_dense_replace=int(fields["first_k_dense_replace"]),
        # transformers builds every layer from first_k_dense_replace on as MoE: config.json's moe_layer_freq is
        # not read (every published DeepSeek checkpoint has 1).
        moe_layer_freq=1,
        n_group=int(fields["n_group"]),
        topk_group=int(fields["topk_group"]),
        norm_topk_prob=bool(fields.get("norm_topk_prob")),  # null: transformers' `if norm_topk_prob` is false
        routed_scaling_factor=float(fields["routed_scaling_factor"]),
        scoring_func=scoring_func,
        topk_method=topk_method,
        rms_norm_eps=float(fields["rms_norm_eps"]),
        max_position_embeddings=int(fields["max_position_embeddings"]),
        rope=_parse_rope(fields, source),
        # V2 always pairs interleaved dims (complex rotation) and V3's MLPs have no bias, whatever the file says.
        rope_interleave=True if v2 else bool(fields.get("rope_interleave")),
        attention_bias=bool(fields.get("attention_bias", False)),
        mlp_bias=v2 and bool(fields.get("mlp_bias", False)),
        tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
        fp8=_parse_quantization(raw.get("quantization_config"), source),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
    )
    _check_consistency(config, raw, source)
    return config


def _router(fields: dict[str, Any], model_type: str, source: str) -> tuple[str, str]:
    """(scoring_func, topk_method) as transformers' model routes: V3 always sigmoid scores with noaux_tc (its
    modeling reads neither field, as DeepSeek's V3 code implements no other); V2 softmax scores, greedy (also for
    null) or group_limited_greedy."""
    if model_type == "deepseek_v3":
        return "sigmoid", "noaux_tc"
    method = fields.get("topk_method") or "greedy"
    if method not in V2_TOPK_METHODS:
        raise MoetrtError(f"{source}: router topk_method={method!r} is not supported for deepseek_v2 "
                          f"({' or '.join(V2_TOPK_METHODS)})")
    return "softmax", method


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_rope(fields: dict[str, Any], source: str) -> RopeConfig:
    """Plain RoPE or YaRN from `rope_scaling` (legacy; it wins, as in transformers) or `rope_parameters`; null or
    absent is plain RoPE. rope_theta defaults to 10000, a null yarn factor to max_position / original window."""
    params = fields.get("rope_scaling") or fields.get("rope_parameters") or {}
    theta = params.get("rope_theta") or fields.get("rope_theta") or DEFAULT_ROPE_THETA
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind != "yarn":
        raise MoetrtError(f"{source}: rope type {kind!r} is not supported (default or yarn)")
    max_position = int(fields["max_position_embeddings"])
    original = int(params.get("original_max_position_embeddings") or max_position)
    factor = params.get("factor") or max_position / original
    return RopeConfig(
        theta=float(theta),
        kind="yarn",
        factor=float(factor),
        original_max_position_embeddings=original,
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
        if config.topk_method in GROUPED_ROUTERS and config.num_experts_per_tok > config.topk_group * per_group:
            raise MoetrtError(f"{source}: num_experts_per_tok exceeds the experts of the topk_group kept groups")
        if config.topk_method == "noaux_tc" and per_group < 2:
            raise MoetrtError(f"{source}: noaux_tc scores a group by its top-2, so each group needs 2+ experts")
