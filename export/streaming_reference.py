"""The torch reference of a checkpoint larger than memory: `DeepseekForCausalLM` computed layer by layer.

`streamed_model` returns the reference model whose weights stay in the memory-mapped shards: each call of `step`
(or `forward`) materializes one decoder layer at a time (its attention, norms, router and shared experts, in
float32, FP8 blocks dequantized), runs it over all the call's tokens and frees it before the next; the routed
experts are read only for the experts the router picked, one at a time; the token embedding gathers its rows from
the mapped table, and the head multiplies the mapped rows in chunks. Peak memory is then about one layer's
non-expert weights plus one expert, whatever the model's size; the price is reading the checkpoint once per call.
The numbers are the eager reference's (same modules, same float32 arithmetic; the experts' loop is
plugins/routed_experts.py `routed_experts_reference`'s, per expert).

With `rounded=scheme` every weight a `--quantize` build of that scheme stores quantized is rounded the build's way
(moetrt/quantization.py `quantize_blocks`, then `dequantize_blocks`) as it is read: the reference of the weights an
int8/int4 engine holds, computed in float32. KL between it and the float32 reference is the quantization's own
error; between it and the engine, the engine's arithmetic (int8 activations in the integer dot products included).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moetrt.export.checkpoint import CheckpointWeights
from moetrt.export.model import DeepseekForCausalLM
from moetrt.quantization import QuantScheme, dequantize_blocks, quantize_blocks

# Vocabulary rows of the output head multiplied per chunk (float32 transient: rows x hidden x 4 bytes).
HEAD_ROWS = 8192


def round_weight(weight: torch.Tensor, scheme: QuantScheme | None) -> torch.Tensor:
    """`weight` float `[..., K]` as a `scheme` build stores it, dequantized to float32 (groups along the last axis);
    unchanged (as float32) for None."""
    weight = weight.float()
    if scheme is None:
        return weight
    q, d = quantize_blocks(weight.numpy(), scheme)
    return torch.from_numpy(dequantize_blocks(q, d, scheme.group_size))


class MappedEmbedding(nn.Module):
    """Token embedding gathered from the mapped checkpoint tensor: `[B, S]` int64 -> `[B, S, H]` float32 (each
    row rounded by `rounded`, the engine's rule for its quantized embedding table)."""

    def __init__(self, weights: CheckpointWeights, key: str, rounded: QuantScheme | None = None):
        super().__init__()
        self.weights, self.key, self.rounded = weights, key, rounded

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = round_weight(self.weights.read(self.key)[input_ids], self.rounded)
        self.weights.release(self.key)
        return rows


class ChunkedHead(nn.Module):
    """The output head `x @ W^T` over the mapped `[V, H]` weight, HEAD_ROWS vocabulary rows at a time (each chunk
    rounded by `rounded`)."""

    def __init__(self, weights: CheckpointWeights, key: str, vocab: int, rounded: QuantScheme | None = None):
        super().__init__()
        self.weights, self.key, self.vocab, self.rounded = weights, key, vocab, rounded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x.shape[:-1], self.vocab, dtype=torch.float32)
        weight = self.weights.read(self.key)
        for start in range(0, self.vocab, HEAD_ROWS):
            out[..., start : start + HEAD_ROWS] = x @ round_weight(weight[start : start + HEAD_ROWS], self.rounded).t()
        self.weights.release(self.key)
        return out


class StreamedExperts(nn.Module):
    """One layer's routed experts read from the shards for the experts the tokens chose, one expert at a time
    (each weight rounded by `rounded`)."""

    def __init__(self, weights: CheckpointWeights, layer: int, rounded: QuantScheme | None = None):
        super().__init__()
        self.weights, self.prefix, self.rounded = weights, f"model.layers.{layer}.mlp.experts.", rounded

    def _weight(self, expert: int, kind: str) -> torch.Tensor:
        key = f"{self.prefix}{expert}.{kind}.weight"
        weight = round_weight(self.weights.read(key), self.rounded)  # a copy: the pages can go
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
    """Stands in for the backbone's layer list: iterating materializes layer i, yields it, and lets it go.
    `rounded`: (scheme, the qualified names of the modules a build of it quantizes), or None."""

    def __init__(self, weights: CheckpointWeights, rounded: tuple[QuantScheme, set[str]] | None = None):
        self.weights = weights
        self.count = weights.config.num_hidden_layers
        self.rounded = rounded

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for index in range(self.count):
            yield self._layer(index)

    def _layer(self, index: int) -> nn.Module:
        name = f"model.layers.{index}"
        layer = copy.deepcopy(self.weights.skeleton.get_submodule(name))
        routed = hasattr(layer.mlp, "experts")
        scheme, quantized = self.rounded or (None, set())
        if routed:
            layer.mlp.experts = StreamedExperts(self.weights, index,
                                                scheme if f"{name}.mlp.experts" in quantized else None)
        layer.to_empty(device="cpu")
        self.weights.fill(name, layer, skip=f"{name}.mlp.experts" if routed else None)
        for sub, module in layer.named_modules():
            if f"{name}.{sub}" in quantized and isinstance(module, nn.Linear):
                module.weight.data = round_weight(module.weight.data, scheme)
        return layer.eval()


def quantized_modules(skeleton: DeepseekForCausalLM, scheme: QuantScheme) -> set[str]:
    """Qualified names of the modules (linears, stacked routed experts, the embedding) that a `scheme` build
    quantizes: export/quantized.py `quantize_model`'s choice, made on a copy of the meta-device skeleton."""
    from moetrt.export.quantized import QuantizedEmbedding, QuantizedExperts, QuantizedLinear, quantize_model

    model = copy.deepcopy(skeleton)
    quantize_model(model, scheme)
    kinds = (QuantizedLinear, QuantizedExperts, QuantizedEmbedding)
    return {name for name, module in model.named_modules() if isinstance(module, kinds)}


def streamed_model(weights: CheckpointWeights, rounded: QuantScheme | None = None) -> DeepseekForCausalLM:
    """The float32 reference of `weights` (a CheckpointWeights opened without quantization or MTP; keep it open
    while the model is used) with its layers, embedding and head streamed from the shards; `rounded`: with the
    weights a build of that scheme quantizes rounded as it does (module docstring)."""
    from moetrt.export.model import rope_inv_freq

    if weights.quantization is not None or weights.dtype != "float32" or weights.mtp_layers:
        raise ValueError("the streamed reference is the float32 model without quantization or MTP")
    model = copy.deepcopy(weights.skeleton)
    config = weights.config
    backbone = model.model
    del backbone.layers
    quantized = quantized_modules(weights.skeleton, rounded) if rounded is not None else set()
    backbone.layers = StreamedLayers(weights, (rounded, quantized) if rounded is not None else None)
    backbone.embed_tokens = MappedEmbedding(weights, "model.embed_tokens.weight",
                                            rounded if "model.embed_tokens" in quantized else None)
    backbone.norm = weights.materialize("model.norm")
    head_key = "model.embed_tokens.weight" if weights.tied else "lm_head.weight"
    model.lm_head = ChunkedHead(weights, head_key, config.vocab_size, rounded if "lm_head" in quantized else None)
    model.inv_freq = rope_inv_freq(config.rope, config.qk_rope_head_dim)[0]
    return model.eval()
