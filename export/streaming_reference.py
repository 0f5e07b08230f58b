"""The torch reference of a checkpoint larger than memory: `DeepseekForCausalLM` computed layer by layer.

`streamed_model` returns the reference model whose weights stay in the memory-mapped shards: each call of `step`
(or `forward`) materializes one decoder layer at a time (its attention, norms, router and shared experts, in
float32, FP8 blocks dequantized), runs it over all the call's tokens and frees it before the next; the routed
experts are read only for the experts the router picked, one at a time; the token embedding gathers its rows from
the mapped table, and the head multiplies the mapped rows in chunks. Peak memory is then about one layer's
non-expert weights plus one expert, whatever the model's size; the price is reading the checkpoint once per call.
The numbers are the eager reference's (same modules, same float32 arithmetic; the experts' loop is
plugins/routed_experts.py `routed_experts_reference`'s, per expert).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moetrt.export.checkpoint import CheckpointWeights
from moetrt.export.model import DeepseekForCausalLM

# Vocabulary rows of the output head multiplied per chunk (float32 transient: rows x hidden x 4 bytes).
HEAD_ROWS = 8192


class MappedEmbedding(nn.Module):
    """Token embedding gathered from the mapped checkpoint tensor: `[B, S]` int64 -> `[B, S, H]` float32."""

    def __init__(self, weights: CheckpointWeights, key: str):
        super().__init__()
        self.weights, self.key = weights, key

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weights.read(self.key)[input_ids].float()
        self.weights.release(self.key)
        return rows


class ChunkedHead(nn.Module):
    """The output head `x @ W^T` over the mapped `[V, H]` weight, HEAD_ROWS vocabulary rows at a time."""

    def __init__(self, weights: CheckpointWeights, key: str, vocab: int):
        super().__init__()
        self.weights, self.key, self.vocab = weights, key, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x.shape[:-1], self.vocab, dtype=torch.float32)
        weight = self.weights.read(self.key)
        for start in range(0, self.vocab, HEAD_ROWS):
            out[..., start : start + HEAD_ROWS] = x @ weight[start : start + HEAD_ROWS].float().t()
        self.weights.release(self.key)
        return out


class StreamedExperts(nn.Module):
    """One layer's routed experts read from the shards for the experts the tokens chose, one expert at a time."""

    def __init__(self, weights: CheckpointWeights, layer: int):
        super().__init__()
        self.weights, self.prefix = weights, f"model.layers.{layer}.mlp.experts."

    def _weight(self, expert: int, kind: str) -> torch.Tensor:
        key = f"{self.prefix}{expert}.{kind}.weight"
        weight = self.weights.read(key).float()  # a copy (or the FP8 dequantization): the pages can go
        self.weights.release(key)
        return weight

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden `[T, H]`, topk_ids / topk_weights `[T, k]` -> `[T, H]`, summed per token in float32."""
        output = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32)
        for expert in torch.unique(topk_ids).tolist():
            tokens, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
            x = hidden[tokens].float()
            gate = x @ self._weight(expert, "gate_proj").t()
            up = x @ self._weight(expert, "up_proj").t()
            y = (nn.functional.silu(gate) * up) @ self._weight(expert, "down_proj").t()
            output.index_add_(0, tokens, y * topk_weights[tokens, slot, None].float())
        return output.to(hidden.dtype)


class StreamedLayers:
    """Stands in for the backbone's layer list: iterating materializes layer i, yields it, and lets it go."""

    def __init__(self, weights: CheckpointWeights):
        self.weights = weights
        self.count = weights.config.num_hidden_layers

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for index in range(self.count):
            yield self._layer(index)

    def _layer(self, index: int) -> nn.Module:
        name = f"model.layers.{index}"
        layer = copy.deepcopy(self.weights.skeleton.get_submodule(name))
        routed = hasattr(layer.mlp, "experts")
        if routed:
            layer.mlp.experts = StreamedExperts(self.weights, index)
        layer.to_empty(device="cpu")
        self.weights.fill(name, layer, skip=f"{name}.mlp.experts" if routed else None)
        return layer.eval()


def streamed_model(weights: CheckpointWeights) -> DeepseekForCausalLM:
    """The float32 reference of `weights` (a CheckpointWeights opened without quantization or MTP; keep it open
    while the model is used) with its layers, embedding and head streamed from the shards (module docstring)."""
    from moetrt.export.model import rope_inv_freq

    if weights.quantization is not None or weights.dtype != "float32" or weights.mtp_layers:
        raise ValueError("the streamed reference is the float32 model without quantization or MTP")
    model = copy.deepcopy(weights.skeleton)
    config = weights.config
    backbone = model.model
    del backbone.layers
    backbone.layers = StreamedLayers(weights)
    backbone.embed_tokens = MappedEmbedding(weights, "model.embed_tokens.weight")
    backbone.norm = weights.materialize("model.norm")
    head_key = "model.embed_tokens.weight" if weights.tied else "lm_head.weight"
    model.lm_head = ChunkedHead(weights, head_key, config.vocab_size)
    model.inv_freq = rope_inv_freq(config.rope, config.qk_rope_head_dim)[0]
    return model.eval()
