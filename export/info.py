"""Parameter, weight-byte and KV-cache arithmetic from a model config alone (torch-free; `moetrt info`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moetrt.config import ModelConfig
from moetrt.formats import Quantization

GPU_BYTES = 141e9  # one H200
BF16, FP8, FP32 = 2, 1, 4


@dataclass(frozen=True)
class Linear:
    """One weight matrix `[out, in]` (optionally with a bias) and how many copies the model has."""

    out_features: int
    in_features: int
    count: int = 1
    bias: bool = False

    @property
    def params(self) -> int:
        return self.count * (self.out_features * self.in_features + (self.out_features if self.bias else 0))

    def fp8_bytes(self, block: tuple[int, int]) -> int:
        """e4m3 values plus fp32 block scales (`weight_scale_inv`); biases stay bf16."""
        blocks = math.ceil(self.out_features / block[0]) * math.ceil(self.in_features / block[1])
        bias = self.out_features * BF16 if self.bias else 0
        return self.count * (self.out_features * self.in_features * FP8 + blocks * FP32 + bias)


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int
    lm_head: int
    attention: int  # projections and their norms, all layers
    dense_mlp: int
    router: int
    shared_experts: int
    routed_experts: int
    norms: int  # layer and final norms
    active_routed_experts: int  # the k experts a token uses, all MoE layers

    @property
    def total(self) -> int:
        return (
            self.embedding + self.lm_head + self.attention + self.dense_mlp + self.router
            + self.shared_experts + self.routed_experts + self.norms
        )

    @property
    def active(self) -> int:
        """Parameters a token computes with: all but the unused routed experts and the embedding table (a
        token reads one row of it), as DeepSeek counts its 37B; a tied table counts once, as the head."""
        embedding = self.embedding if self.lm_head else 0
        return self.total - embedding - self.routed_experts + self.active_routed_experts


def attention_linears(c: ModelConfig, layers: int) -> list[Linear]:
    heads = c.num_attention_heads
    if c.q_lora_rank is None:
        q = [Linear(heads * c.qk_head_dim, c.hidden_size, layers)]
    else:
        q = [
            Linear(c.q_lora_rank, c.hidden_size, layers, c.attention_bias),
            Linear(heads * c.qk_head_dim, c.q_lora_rank, layers),
        ]
    return q + [
        Linear(c.latent_dim, c.hidden_size, layers, c.attention_bias),
        Linear(heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, layers),
        Linear(c.hidden_size, heads * c.v_head_dim, layers, c.attention_bias),
    ]


def mlp_linears(hidden: int, intermediate: int, count: int, bias: bool) -> list[Linear]:
    return [Linear(intermediate, hidden, 2 * count, bias), Linear(hidden, intermediate, count, bias)]


def fp8_linears(c: ModelConfig) -> dict[str, list[Linear]]:
    """The matrices DeepSeek's FP8 checkpoints store in e4m3, by part."""
    moe = len(c.moe_layers)
    dense = c.num_hidden_layers - moe
    return {
        "attention": attention_linears(c, c.num_hidden_layers),
        "dense_mlp": mlp_linears(c.hidden_size, c.intermediate_size, dense, c.mlp_bias),
        "shared_experts": mlp_linears(
            c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, moe if c.n_shared_experts else 0, c.mlp_bias
        ),
        "routed_experts": mlp_linears(c.hidden_size, c.moe_intermediate_size, moe * c.n_routed_experts, False),
    }


def count_parameters(c: ModelConfig) -> ParameterCounts:
    moe = len(c.moe_layers)
    linears = fp8_linears(c)
    latent_norms = (c.kv_lora_rank + (c.q_lora_rank or 0)) * c.num_hidden_layers
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    return ParameterCounts(
        embedding=c.vocab_size * c.hidden_size,
        lm_head=0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size,
        attention=sum(x.params for x in linears["attention"]) + latent_norms,
        dense_mlp=sum(x.params for x in linears["dense_mlp"]),
        router=moe * c.n_routed_experts * (c.hidden_size + (1 if c.uses_correction_bias else 0)),
        shared_experts=sum(x.params for x in linears["shared_experts"]),
        routed_experts=sum(x.params for x in linears["routed_experts"]),
        norms=(2 * c.num_hidden_layers + 1) * c.hidden_size,
        active_routed_experts=moe * c.num_experts_per_tok * per_expert,
    )


def weight_bytes(c: ModelConfig) -> dict[str, int]:
    """Bytes of the weights stored all-bf16, and in DeepSeek's FP8 layout (linears e4m3 + scales, rest bf16)."""
    counts = count_parameters(c)
    block = c.fp8.block_size if c.fp8 else (128, 128)
    linears = fp8_linears(c)
    fp8_params = sum(x.params for part in linears.values() for x in part)
    fp8_part = sum(x.fp8_bytes(block) for part in linears.values() for x in part)
    return {"bf16": counts.total * BF16, "fp8": fp8_part + (counts.total - fp8_params) * BF16}


def kv_bytes_per_token(c: ModelConfig, bytes_per_value: int = BF16) -> dict[str, int]:
    """Cache bytes per token over all layers: MLA's latent rows against a per-head K/V cache."""
    per_head = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    return {
        "latent": c.latent_bytes_per_token(bytes_per_value),
        "per_head": c.num_hidden_layers * per_head * bytes_per_value,
    }


def gpus_needed(weights: int, kv_per_token: int, context: int, batch: int, usable: float = 0.9) -> int:
    """141 GB GPUs for the weights plus `batch` sequences of `context` tokens, `usable` of each GPU."""
    return max(1, math.ceil((weights + kv_per_token * context * batch) / (GPU_BYTES * usable)))


def describe(c: ModelConfig, context: int = 32768, batch: int = 1) -> dict:
    """Everything `moetrt info` prints, as a JSON-ready dict."""
    counts = count_parameters(c)
    weights = weight_bytes(c)
    kv = kv_bytes_per_token(c)
    stored = "fp8" if c.fp8 else (c.torch_dtype or "unknown dtype")
    router = f"{c.scoring_func} / {c.topk_method}"
    if c.topk_method != "greedy" and c.n_group > 1:
        router += f", top-{c.topk_group} of {c.n_group} groups"
    return {
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "dense_layers": c.num_hidden_layers - len(c.moe_layers),
        "moe_layers": len(c.moe_layers),
        "mtp_layers_skipped": c.num_nextn_predict_layers,
        "routed_experts": c.n_routed_experts,
        "shared_experts": c.n_shared_experts,
        "experts_per_token": c.num_experts_per_tok,
        "router": router,
        "routed_scaling_factor": c.routed_scaling_factor,
        "norm_topk_prob": c.norm_topk_prob,
        "attention": f"MLA, kv_lora_rank {c.kv_lora_rank}, q_lora_rank {c.q_lora_rank}, {c.num_attention_heads} heads",
        "rope": c.rope.kind + (f" x{c.rope.factor:g}" if c.rope.kind == "yarn" else ""),
        "total_params": counts.total,
        "active_params": counts.active,
        "params_by_part": {
            "embedding": counts.embedding,
            "lm_head": counts.lm_head,
            "attention": counts.attention,
            "dense_mlp": counts.dense_mlp,
            "router": counts.router,
            "shared_experts": counts.shared_experts,
            "routed_experts": counts.routed_experts,
            "norms": counts.norms,
        },
        "weight_bytes": weights,
        "stored_as": stored,
        "kv_bytes_per_token": kv,
        "context": context,
        "batch": batch,
        "gpus_141gb": {
            dtype: gpus_needed(weights[dtype], kv["latent"], context, batch) for dtype in ("bf16", "fp8")
        },
    }


# -- an engine's weights: how they are stored, and what a decode step reads ------------------------------------------

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def quantization_summary(quantization: Quantization | None, dtype: str) -> str:
    """One line in the field's terms: "int4, symmetric, group size 32, float16 scales: routed experts, ...;
    kept float32: norms, ...", or "float32 (not quantized)"."""
    if quantization is None:
        return f"{dtype} (not quantized)"
    q = quantization
    line = (f"{q.scheme}, {'symmetric' if q.symmetric else 'asymmetric'}, group size {q.group_size}, "
            f"{q.scale_dtype} scales: {', '.join(q.tensors)}")
    if q.kept:
        line += f"; kept {dtype}: {', '.join(q.kept)}"
    return line


def _matrix_bytes(out_features: int, in_features: int, bits: int | None, group: int, scale_bytes: int,
                  dtype_bytes: int) -> int:
    """One `[out, in]` weight: `bits`-bit values plus one scale per `group` inputs of a row, or unquantized
    (`bits` None, or `in` not a whole number of groups: such weights stay in the engine's dtype)."""
    if bits is None or in_features % group:
        return out_features * in_features * dtype_bytes
    return out_features * in_features * bits // 8 + out_features * (in_features // group) * scale_bytes


def decode_weight_bytes(c: ModelConfig, dtype: str, quantization: Quantization | None,
                        expert_scale_bytes: int = 2) -> dict[str, int]:
    """Weight bytes an engine reads per decode token at batch 1, by part: every dense weight (attention, dense and
    shared MLPs, routers, norms, lm_head) once, the k chosen routed experts of each MoE layer (k/E of their bytes),
    and one embedding row. Quantized as moetrt/quantization.py says: values at `bits`, float16 scales for the
    routed experts (`expert_scale_bytes`: 4 where ONNX Runtime's QMoE holds them, in float32), float32 scales for
    the dense weights (MatMulNBits takes its activations' type) and the
    embedding; kv_b_proj, norms and routers in `dtype`. Padding and the packed layouts' alignment are ignored."""
    size = DTYPE_BYTES[dtype]
    bits = quantization.bits if quantization else None
    group = quantization.group_size if quantization else 1

    def dense(out_features: int, in_features: int, count: int = 1) -> int:
        return count * _matrix_bytes(out_features, in_features, bits, group, 4, size)

    moe = len(c.moe_layers)
    layers = c.num_hidden_layers
    heads = c.num_attention_heads
    if c.q_lora_rank is None:
        attention = dense(heads * c.qk_head_dim, c.hidden_size, layers)
    else:
        attention = dense(c.q_lora_rank, c.hidden_size, layers) + dense(heads * c.qk_head_dim, c.q_lora_rank, layers)
    attention += dense(c.latent_dim, c.hidden_size, layers) + dense(c.hidden_size, heads * c.v_head_dim, layers)
    kept = layers * heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank  # kv_b_proj
    kept += (c.kv_lora_rank + (c.q_lora_rank or 0)) * layers + (2 * layers + 1) * c.hidden_size  # norms
    kept += moe * c.n_routed_experts * (c.hidden_size + (1 if c.uses_correction_bias else 0))  # routers
    shared = c.moe_intermediate_size * c.n_shared_experts
    mlp = (dense(c.intermediate_size, c.hidden_size, 2 * (layers - moe))
           + dense(c.hidden_size, c.intermediate_size, layers - moe))
    if shared:
        mlp += dense(shared, c.hidden_size, 2 * moe) + dense(c.hidden_size, shared, moe)
    experts_quantized = bits is not None and c.hidden_size % group == 0 and c.moe_intermediate_size % group == 0
    expert_bits = bits if experts_quantized else None
    inter, scale = c.moe_intermediate_size, expert_scale_bytes
    one_expert = (_matrix_bytes(2 * inter, c.hidden_size, expert_bits, group, scale, size)
                  + _matrix_bytes(c.hidden_size, inter, expert_bits, group, scale, size))
    embedding_row = _matrix_bytes(1, c.hidden_size, bits, group, 4, size)
    return {
        "dense": attention + mlp + kept * size + dense(c.vocab_size, c.hidden_size),
        "routed_experts": moe * c.num_experts_per_tok * one_expert,
        "embedding_row": embedding_row,
    }


# -- whether an engine fits this machine ----------------------------------------------------------------------------

# Memory the runtime needs beside the weights and the cache (interpreter, ONNX Runtime's arenas, activations).
RUNTIME_OVERHEAD = 1 << 30


def planned_quantization(quantize: str, group_size: int) -> Quantization | None:
    """The Quantization a `--quantize NAME --group-size G` build would record, for the size estimates (which read only
    its bits and group size); None for "none". Raises MoetrtError for a bad name or group size."""
    from moetrt.quantization import scheme_for

    scheme = scheme_for(quantize, group_size)
    return Quantization(scheme.name, scheme.bits, scheme.group_size) if scheme else None


def engine_weight_bytes(c: ModelConfig, dtype: str, quantization: Quantization | None,
                        expert_scale_bytes: int = 2) -> int:
    """Bytes of an engine's weights (every routed expert, the whole embedding), counted as `decode_weight_bytes`
    counts one token's; the packed layouts' padding is ignored."""
    read = decode_weight_bytes(c, dtype, quantization, expert_scale_bytes)
    experts = read["routed_experts"] * c.n_routed_experts // max(c.num_experts_per_tok, 1)
    return read["dense"] + experts + read["embedding_row"] * c.vocab_size


def fit_report(c: ModelConfig, dtype: str, quantization: Quantization | None, context: int, batch: int,
               where: Path, engine_bytes: int | None = None, building: bool = True, mtp_layers: int = 0) -> dict:
    """Whether an engine of `c` fits this machine: `engine_bytes` of weights (an engine's artifacts, else
    `engine_weight_bytes`), the latent cache for `batch` sequences of `context` tokens in the engine's dtype, the
    weight bytes read per decode token; memory available now (moetrt.hardware.available_memory) against weights +
    cache + RUNTIME_OVERHEAD (an engine's weights are memory-mapped and should stay resident to decode at memory
    speed), disk free at `where` against what a build writes (`building`: the export and the engine coexist until
    the build ends, about twice the weights). `mtp_layers`: the MTP module's latent-cache layers (an --mtp engine).
    All sizes in bytes."""
    from moetrt import hardware

    weights = engine_bytes if engine_bytes is not None else engine_weight_bytes(c, dtype, quantization)
    kv_per_token = c.latent_bytes_per_token(DTYPE_BYTES[dtype], mtp_layers)
    kv = kv_per_token * context * batch
    read = sum(decode_weight_bytes(c, dtype, quantization).values())
    memory, disk = hardware.available_memory(), hardware.disk_free(where)
    memory_needed = weights + kv + RUNTIME_OVERHEAD
    disk_needed = 2 * weights if building else 0
    return {
        "weight_bytes": weights, "kv_bytes_per_token": kv_per_token, "kv_bytes": kv, "context": context,
        "batch": batch, "bytes_read_per_token": read, "memory_available": memory, "memory_needed": memory_needed,
        "fits_memory": memory_needed <= memory, "disk_free": disk, "disk_needed": disk_needed,
        "fits_disk": disk_needed <= disk, "where": str(where),
    }
