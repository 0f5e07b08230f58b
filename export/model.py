"""The DeepSeek-V2/V3 reference model as plain torch modules: MLA with a latent KV cache, DeepSeekMoE.

Parameter names equal the Hugging Face checkpoint keys, except the routed experts, which are stacked per
layer (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`) in the plugin's layout.
Attention always runs in the weight-absorbed form over the cached latent rows, as DeepSeek's inference does.
Shapes: B batch, S new tokens, P cached positions, T = P + S, H hidden, D latent width, E experts, k active.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetrt.config import ModelConfig, RopeConfig, yarn_mscale
from moetrt.plugins.routed_experts import routed_experts

# transformers and DeepSeek build the q_a/kv_a norms with the default eps, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """`scale`: x is the true input divided by it (`residual_scale`); eps / scale² keeps the output exact."""
        dtype = x.dtype
        x = x.float()
        # x / sqrt(.) rather than x * rsqrt(.): the exported pattern is the one ONNX Runtime fuses into
        # SimplifiedLayerNormalization (one kernel instead of six).
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps / scale**2)
        return self.weight * x.to(dtype)


def residual_scale(config: ModelConfig, dtype: torch.dtype) -> float:
    """What the residual stream is divided by: routed_scaling_factor in a float16 model where it exceeds 1, else 1.

    float16 ends at 65504, and the factor multiplies every routed output into the stream. Every layer adds its
    outputs divided by it (the routed weights are divided in fp32, before the experts), and the norms reading
    the stream divide their eps by its square, so the normalised values and the logits are unchanged (vLLM
    keeps DeepSeek's float16 residual in range the same way).
    """
    factor = config.routed_scaling_factor
    return float(factor) if dtype == torch.float16 and factor > 1 else 1.0


def _divided(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1 else x / scale


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[dim/2]` and the cos/sin scale (YaRN's mscale ratio; 1 for plain RoPE)."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    if rope.kind != "yarn":
        return inv_freq_extrapolation, 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq_extrapolation * extrapolation
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate pairs of x's last dim; cos/sin `[..., d/2]` broadcast. Output pairs are laid out half-split."""
    if interleaved:  # DeepSeek's checkpoints pair (x0, x1), (x2, x3), ...
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hidden, heads = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, heads * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, config.latent_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * config.v_head_dim, hidden, bias=config.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[B, S, H]`, cos/sin `[B, S, rope/2]`, allowed `[B, S, T]` bool, past `[P, B, D]`.

        Returns the attention output `[B, S, H]` and this step's latent rows `[S, B, D]`.
        """
        c = self.config
        batch, seq, _ = x.shape
        heads, nope, kv_rank = c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(batch, seq, heads, c.qk_head_dim).split([nope, c.qk_rope_head_dim], dim=-1)
        compressed, k_pe = self.kv_a_proj_with_mqa(x).split([kv_rank, c.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], c.rope_interleave)
        k_pe = apply_rope(k_pe, cos, sin, c.rope_interleave)
        new_rows = torch.cat([self.kv_a_layernorm(compressed), k_pe], dim=-1)  # [B, S, D]
        latent = torch.cat([past, new_rows.transpose(0, 1)], dim=0).transpose(0, 1)  # [B, T, D]

        # Weight absorption: fold kv_b's key half into q and its value half into the output. Batched matmuls
        # over heads (not einsum) export to MatMul, which ONNX Runtime runs several times faster.
        kv_b = self.kv_b_proj.weight.view(heads, nope + c.v_head_dim, kv_rank)
        q_nope = q_nope.transpose(1, 2).transpose(0, 1).reshape(heads, batch * seq, nope)  # [h, B*S, n]
        q_absorbed = torch.matmul(q_nope, kv_b[:, :nope])  # [h, B*S, C]
        q_absorbed = q_absorbed.view(heads, batch, seq, kv_rank).permute(1, 2, 0, 3)  # [B, S, h, C]
        q_latent = torch.cat([q_absorbed, q_pe], dim=-1).reshape(batch, seq * heads, c.latent_dim)
        total = latent.shape[1]  # P + S, named: a -1 could not be inferred for S = 0 (an MTP module skipped)
        scores = torch.matmul(q_latent, latent.transpose(1, 2)).view(batch, seq, heads, total)
        scores = scores * c.softmax_scale
        scores = scores.masked_fill(~allowed[:, :, None, :], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype).view(batch, seq * heads, total)
        # probs @ the whole latent row, then keep the kv_lora part: slicing the small result, not the cache
        out_latent = torch.matmul(probs, latent)[..., :kv_rank]  # [B, S*h, C]
        out_latent = out_latent.view(batch * seq, heads, kv_rank).transpose(0, 1)  # [h, B*S, C]
        out = torch.matmul(out_latent, kv_b[:, nope:].transpose(1, 2))  # [h, B*S, v]
        out = out.transpose(0, 1).reshape(batch, seq, heads * c.v_head_dim)
        return self.o_proj(out), new_rows.transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x `[..., H]` -> the output divided by `scale` (`residual_scale`)."""
        return _divided(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), scale)


def route_tokens(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's router on x `[T, H]`: returns expert ids `[T, k]` (int64) and weights `[T, k]` (fp32).

    V3 (noaux_tc): sigmoid scores; the correction bias steers selection only; a group scores the sum of its
    top-2; experts outside the topk_group best groups are masked to -inf; weights come from unbiased scores,
    normalised when norm_topk_prob, then times routed_scaling_factor. V2: softmax scores, greedy or
    group-limited (a group scores its max); DeepSeek's V2 code either normalises or scales, never both.
    """
    logits = F.linear(x.float(), weight.float())  # [T, E] in fp32 whatever the model dtype
    scores = logits.sigmoid() if config.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    experts, groups = config.n_routed_experts, config.n_group
    if config.topk_method != "greedy" and groups > 1:
        grouped = choice.view(-1, groups, experts // groups)
        if config.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.amax(dim=-1)
        group_idx = group_scores.topk(config.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, groups, experts // groups).reshape(-1, experts)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    topk_ids = choice.topk(config.num_experts_per_tok, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    # V3 normalises whenever norm_topk_prob (one expert too: its weight becomes 1, as in transformers and
    # DeepSeek's inference code); DeepSeek's V2 code only with top_k > 1.
    v3 = config.model_type == "deepseek_v3"
    normalise = config.norm_topk_prob and (v3 or config.num_experts_per_tok > 1)
    if normalise:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    if v3 or not normalise:
        topk_weights = topk_weights * config.routed_scaling_factor
    return topk_ids, topk_weights


class Router(nn.Module):
    """Router weights, kept in fp32 whatever the model dtype (as DeepSeek and transformers keep them)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        if config.uses_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_tokens(x, self.weight, self.e_score_correction_bias, self.config)


class StackedExperts(nn.Module):
    """All routed experts of a layer in the plugin's layout: gate/up `[E, 2I, H]`, down `[E, H, I]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden `[T, H]`, topk_ids/topk_weights `[T, k]` -> `[T, H]` (the plugin node under export)."""
        return routed_experts(hidden, topk_ids, topk_weights, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = StackedExperts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.mlp_bias)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x `[B, S, H]` -> the output divided by `scale` (`residual_scale`)."""
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        topk_ids, topk_weights = self.gate(flat)
        topk_weights = _divided(topk_weights, scale)  # fp32: the experts' sum is formed already divided
        routed = self.experts(flat, topk_ids, topk_weights)
        out = routed.view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, scale)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config)
        if config.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, allowed, past, scale: float = 1.0):
        """x: the residual stream divided by `scale` (`residual_scale`); returns it after this layer, and the
        layer's new latent rows."""
        attn, new_rows = self.self_attn(self.input_layernorm(x, scale), cos, sin, allowed, past)
        x = x + _divided(attn, scale)
        return x + self.mlp(self.post_attention_layernorm(x, scale), scale), new_rows


class DeepseekBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SharedHead(nn.Module):
    """The MTP module's own final norm; its output head is the main model's `lm_head` (DeepSeek-V3 shares the
    embedding and the output head between the main model and its MTP modules; the checkpoint's copies under
    `shared_head.head` and `embed_tokens` are not loaded)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MultiTokenPrediction(DecoderLayer):
    """One multi-token-prediction (MTP) module of DeepSeek-V3 (technical report arXiv:2412.19437, section 2.2,
    eq. 21-23): at position i it combines the main model's representation h_i with the embedding of token
    t_{i+1} and predicts t_{i+2}:

        h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])      (concatenation order of vLLM's and SGLang's
        h_i^1 = TRM(h'_i)                                       `deepseek_mtp`, which load the released weights)
        P_{i+2} = OutHead(shared_head.norm(h_i^1))

    h_i is the main model's final hidden state after its last norm (what its head reads, as vLLM and SGLang pass
    it), TRM is one decoder block (MLA + MoE, with its own latent cache rows), Emb and OutHead are the main
    model's. Parameter names under `model.layers.<num_hidden_layers + depth>` in a checkpoint are this module's
    (`checkpoint_key` maps them)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__(config, layer)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, embedded: torch.Tensor, hidden: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """embedded `[B, S, H]` = Emb(t_{i+1}), hidden `[B, S, H]` = h_i -> h'_i divided by `scale`."""
        return _divided(self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1)), scale)


MTP_PREFIX = "mtp."


def checkpoint_key(config: ModelConfig, name: str) -> str:
    """A parameter name of DeepseekForCausalLM -> its checkpoint key: `mtp.<d>.X` is `model.layers.<L + d>.X`
    (L = num_hidden_layers, DeepSeek-V3's layout for its MTP modules); every other name is its own key."""
    if not name.startswith(MTP_PREFIX):
        return name
    depth, rest = name[len(MTP_PREFIX):].split(".", 1)
    return f"model.layers.{config.num_hidden_layers + int(depth)}.{rest}"


def parameter_name(config: ModelConfig, key: str) -> str:
    """The inverse of `checkpoint_key`."""
    if key.startswith("model.layers."):
        index, dot, rest = key[len("model.layers."):].partition(".")
        if index.isdigit() and int(index) >= config.num_hidden_layers:
            return f"{MTP_PREFIX}{int(index) - config.num_hidden_layers}{dot}{rest}"
    return key


class DeepseekForCausalLM(nn.Module):
    """`forward(input_ids)` gives logits; `step(...)` runs S new tokens against the latent cache;
    `speculative_step(...)` does that and runs the MTP module (built when `mtp_layers` is 1) for the next draft."""

    def __init__(self, config: ModelConfig, mtp_layers: int = 0):
        super().__init__()
        self.config = config
        self.model = DeepseekBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if mtp_layers > config.num_nextn_predict_layers:
            raise ValueError(f"the config declares {config.num_nextn_predict_layers} MTP layers, not {mtp_layers}")
        self.mtp = nn.ModuleList(MultiTokenPrediction(config, config.num_hidden_layers + depth)
                                 for depth in range(mtp_layers))
        inv_freq, rope_scale = rope_inv_freq(config.rope, config.qk_rope_head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = rope_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids `LongTensor[B, S]` -> logits `[B, S, vocab]` (no cache, positions 0..S-1)."""
        return self.step(input_ids)[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its norms' weights are in it, quantized or not)."""
        return self.model.norm.weight.dtype

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        dtype, device = self.dtype, self.model.norm.weight.device
        return [torch.zeros(0, batch, self.config.latent_dim, dtype=dtype, device=device)
                for _ in range(len(self.model.layers))]

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_latents: list[torch.Tensor] | None = None,
        logit_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run S new tokens after P cached ones.

        input_ids `[B, S]`; position_ids `[B, S]` (default P..P+S-1); attention_mask `[B, P+S]` with 1 for
        real tokens and 0 for padding (default all ones); past_latents per layer `[P, B, D]`;
        logit_positions `[B, N]`: which of the S positions get logits (default all; a prefill needs only the
        last, and a chunk before it none, which saves the vocab-wide head on long prompts).
        Returns logits `[B, N, vocab]` and per layer only the new latent rows `[S, B, D]`.
        """
        x, new_latents, context = self._run_layers(input_ids, position_ids, attention_mask, past_latents)
        scale = context[-1]
        if logit_positions is not None:
            x = _gather(x, logit_positions)  # [B, N, H]
        return self.lm_head(self.model.norm(x, scale)), new_latents

    def _run_layers(self, input_ids, position_ids, attention_mask, past_latents):
        """The decoder layers over S new tokens: returns the residual stream `[B, S, H]` (divided by the
        residual scale), the new latent rows per layer, and (cos, sin, causal `[S, T]`, scale) for the MTP."""
        batch, seq = input_ids.shape
        if past_latents is None:
            past_latents = self.empty_cache(batch)
        past_len = past_latents[0].shape[0]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=input_ids.device).expand(batch, seq)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        scale = residual_scale(self.config, x.dtype)
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, rope/2]
        cos = (freqs.cos() * self.rope_scale).to(x.dtype)
        sin = (freqs.sin() * self.rope_scale).to(x.dtype)
        key_pos = torch.arange(past_len + seq, device=input_ids.device)
        query_pos = torch.arange(seq, device=input_ids.device) + past_len
        causal = key_pos[None, :] <= query_pos[:, None]  # [S, T]
        allowed = causal[None] & attention_mask[:, None, :].bool()  # [B, S, T]

        new_latents = []
        x = _divided(x, scale)
        for layer, past in zip(self.model.layers, past_latents):
            x, rows = layer(x, cos, sin, allowed, past, scale)
            new_latents.append(rows)
        return x, new_latents, (cos, sin, causal, scale)

    def speculative_step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_latents: list[torch.Tensor],
        logit_positions: torch.Tensor,
        mtp_input_ids: torch.Tensor,
        mtp_attention_mask: torch.Tensor,
        mtp_past: torch.Tensor,
        draft_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """`step` and, in the same call, the MTP module over the first M of the S positions (DeepSeek-V3 MTP as a
        speculative decoder: each call verifies the previous draft and proposes the next). M = 0 skips the module
        (no weights read, nothing computed but empty tensors); what stays is the dispatch of its nodes (about 140 in
        ONNX Runtime: under 1% of a ds-mini step on 2 cores, but a plain step of tiny-r1's --mtp engine costs 1.47x
        its plain engine's, bench/NOTES.md).

        mtp_input_ids `[B, M]` int64 (M <= S): the token that follows each of the first M positions (t_{i+1}), or -1
        where it is not known yet: there the main model's greedy pick at that position is used, which needs the
        position among `logit_positions`. mtp_attention_mask `[B, P+M]`: which of the MTP module's cached rows (and
        new ones) are valid; mtp_past `[P, B, D]` its latent rows (one per main-model column, same columns);
        draft_positions `[B, N']` (< M): where to propose drafts.
        Returns main logits `[B, N, vocab]`, the main model's new rows per layer `[S, B, D]`, the MTP module's new
        rows `[M, B, D]` and its draft logits `[B, N', vocab]` (predicting t_{i+2} at each draft position).
        """
        x, new_latents, (cos, sin, _, scale) = self._run_layers(input_ids, position_ids, attention_mask,
                                                                past_latents)
        hidden = self.model.norm(x, scale)  # [B, S, H]: h_i, what the head reads
        logits = self.lm_head(_gather(hidden, logit_positions))
        batch, seq = input_ids.shape
        steps = mtp_input_ids.shape[1]
        guessed = torch.zeros_like(input_ids).scatter(1, logit_positions, logits.argmax(-1))[:, :steps]
        following = torch.where(mtp_input_ids < 0, guessed, mtp_input_ids)
        module = self.mtp[0]
        h = module.combine(self.model.embed_tokens(following), hidden[:, :steps], scale)
        past_len = mtp_past.shape[0]
        key_pos = torch.arange(past_len + steps, device=input_ids.device)
        query_pos = torch.arange(steps, device=input_ids.device) + past_len
        allowed = (key_pos[None, :] <= query_pos[:, None])[None] & mtp_attention_mask[:, None, :].bool()
        h, mtp_rows = module(h, cos[:, :steps], sin[:, :steps], allowed, mtp_past, scale)
        draft_logits = self.lm_head(module.shared_head.norm(_gather(h, draft_positions), scale))
        return logits, new_latents, mtp_rows, draft_logits


def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x `[B, S, H]` at positions `[B, N]` -> `[B, N, H]`."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
