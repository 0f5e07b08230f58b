"""Tiny random DeepSeek checkpoints written by transformers (the external reference), for tests.

`make_checkpoint` builds `DeepseekV3ForCausalLM` / `DeepseekV2ForCausalLM` from a named config, gives the
weights a scale at which routing and greedy decoding are meaningful, makes the V3 correction bias non-zero,
and `save_pretrained`s it, so the on-disk key names are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=64,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=10,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=512,
    initializer_range=0.1,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}

# name -> (family, overrides). A spread over q-LoRA, grouping, normalisation, scaling, dense-first and rope.
CONFIGS: dict[str, tuple[str, dict]] = {
    "v3-qlora-grouped-yarn": ("v3", dict(rope_parameters=YARN)),
    "v3-plain-ungrouped-tied": (
        "v3",
        dict(
            q_lora_rank=None,
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            first_k_dense_replace=0,
            rope_interleave=False,
            tie_word_embeddings=True,
        ),
    ),
    "v3-two-shared-bias": (
        "v3",
        dict(n_shared_experts=2, num_experts_per_tok=2, routed_scaling_factor=1.5, attention_bias=True, n_group=2,
             topk_group=1),
    ),
    "v2-greedy-yarn": (
        "v2",
        dict(
            q_lora_rank=None,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            n_shared_experts=2,
            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        ),
    ),
    "v2-group-limited": (
        "v2",
        dict(topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=3.0),
    ),
}


def build_model(name: str, seed: int = 0, **overrides):
    """The transformers model for config `name` (fp32, eval mode), with routing made non-trivial."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    family, config_overrides = CONFIGS[name]
    kwargs = {**BASE, **config_overrides, **overrides}
    torch.manual_seed(seed)
    if family == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kwargs))
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.05)
    return model.eval()


def make_checkpoint(directory: Path, name: str, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Write config `name` as a Hugging Face checkpoint into `directory`; returns it."""
    model = build_model(name, seed, **overrides).to(dtype)
    model.save_pretrained(directory)
    return Path(directory)
