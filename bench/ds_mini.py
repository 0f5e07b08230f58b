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


def write_ds_mini(directory: str | Path, seed: int = 0, mtp: bool = False) -> Path:
    """Write the ds-mini checkpoint (fp32, sharded safetensors) into `directory`; returns it. With `mtp`, also a
    multi-token-prediction layer in DeepSeek-V3's layout (`model.layers.8.*`: a MoE decoder block, enorm, hnorm,
    eh_proj, shared_head with copies of the embedding and head; config num_nextn_predict_layers 1), random like the
    rest: transformers has no MTP module, so its block is a ninth layer of transformers' model and the rest is added
    beside transformers' shards."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    directory = Path(directory)
    torch.manual_seed(seed)
    layers = DS_MINI["num_hidden_layers"]
    with torch.device("cpu"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**DS_MINI, "num_hidden_layers": layers + int(mtp)}))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 1e-3)
    model.eval().save_pretrained(directory, max_shard_size="1GB")
    if mtp:
        _add_mtp_tensors(directory, model, layers)
    return directory


def _add_mtp_tensors(directory: Path, model, layer: int) -> None:
    """Turn the saved model's last layer into the MTP layer: its own tensors in one more shard, the index and the
    config updated (num_hidden_layers back to `layer`, num_nextn_predict_layers 1)."""
    import json

    import torch
    from safetensors.torch import save_file

    hidden = DS_MINI["hidden_size"]
    prefix = f"model.layers.{layer}."
    extra = {
        prefix + "enorm.weight": torch.ones(hidden), prefix + "hnorm.weight": torch.ones(hidden),
        prefix + "eh_proj.weight": torch.randn(hidden, 2 * hidden) * DS_MINI["initializer_range"],
        prefix + "shared_head.norm.weight": torch.ones(hidden),
        prefix + "shared_head.head.weight": model.lm_head.weight.detach().clone(),
        prefix + "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
    }
    shard = "model-mtp.safetensors"
    save_file(extra, str(directory / shard), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({name: shard for name in extra})
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.update(num_hidden_layers=layer, num_nextn_predict_layers=1)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mtp", action="store_true", help="add a multi-token-prediction layer")
    args = parser.parse_args()
    print(write_ds_mini(args.directory, args.seed, args.mtp))
