"""ds-mini: a random DeepSeek-V3-shaped checkpoint whose decode is memory-bound, as on the real models.

hidden 1024, intermediate 2816, 8 layers (first dense), 64 routed experts of 512 with 6 active in 8 groups
(4 kept), 1 shared, 16 heads, q-LoRA 384, kv-LoRA 256, rope 32, nope 64, v 64, vocab 32000: about 0.81B
parameters, 0.14B active per token. Written with transformers' DeepseekV3ForCausalLM (real key names).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DS_MINI = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=512,
    num_hidden_layers=8,
    first_k_dense_replace=1,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    n_shared_experts=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=384,
    kv_lora_rank=256,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    initializer_range=0.02,
    eos_token_id=1,
    bos_token_id=0,
)


def write_ds_mini(directory: str | Path, seed: int = 0) -> Path:
    """Write the ds-mini checkpoint (fp32, sharded safetensors) into `directory`; returns it."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    directory = Path(directory)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**DS_MINI))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 1e-3)
    model.eval().save_pretrained(directory, max_shard_size="1GB")
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_ds_mini(args.directory, args.seed))
