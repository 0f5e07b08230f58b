"""Quantized weights in the reference model: modules that hold int8/int4 blocks, and what they export to.

`quantize_model` swaps a freshly built (meta) model's weight-bearing modules for ones that hold block-quantized
weights (moetrt/quantization.py gives the numbers); the checkpoint loader then fills them tensor by tensor
(`load_weight`), so the model never exists in float32. Eager, they dequantize on the fly (the torch reference of a
quantized engine); under `torch.onnx.export` they emit:

- dense weights: `DequantizeLinear(q [K, N], scale [K/g, N], axis=0, block_size=g)` -> `MatMul(x, .)`, the pattern
  ONNX Runtime fuses into MatMulNBits and TensorRT's parser reads (ONNX opset 21 block-wise DequantizeLinear);
- the token embedding: `Gather` of the quantized rows and of their scales -> `DequantizeLinear(axis=-1, block_size=g)`
  (marked with the scheme's bits: the ort lowering fuses the three into ONNX Runtime's GatherBlockQuantized);
- routed experts: the plugin node with int8 weights, float16 `[E, rows, in/g]` scales, `block_size=[1, g]` and
  `bits` (plugins/spec.py ROUTED_EXPERTS), which each backend's lowering packs its own way.

Torch has no int4 tensor type, so int4 values travel in int8 until `finish_export` turns the DequantizeLinear inputs
into ONNX INT4 initializers. Which tensors are quantized, and which kept, is decided here (KINDS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrt.errors import MoetrtError
from moetrt.formats import Quantization
from moetrt.plugins.routed_experts import dequantize_blocks, routed_experts
from moetrt.progress import note
from moetrt.quantization import QuantScheme, quantize_blocks

PLACEHOLDER_DOMAIN, PLACEHOLDER_OP = "moetrt", "DequantizeBlocks"
# Metadata on the embedding's DequantizeLinear: the bits of the gathered values (export/ort/lower.py reads it).
GATHERED_BITS = "moetrt.gathered_bits"
# Tensor kinds, as the manifest names them: quantized at the scheme's bits, and kept in the model's dtype.
QUANTIZED_KINDS = ("routed experts", "shared experts", "dense MLPs", "attention projections", "lm_head",
                   "token embedding")
KEPT_KINDS = ("norms", "router", "kv_b_proj (absorbed per head)")
# Rows quantized per step when loading a weight: bounds the float32 transient to ~64 MB whatever the tensor.
ROWS_PER_STEP_ELEMENTS = 1 << 24


def _quantize_into(weight: torch.Tensor, scheme: QuantScheme, write, done=None) -> None:
    """Quantize a float `[R, K]` weight in row chunks: `write(rows: slice, q int8 [r, K], d float16 [r, K/g])`,
    then `done(rows)` (if given: the caller may let those rows of the source go)."""
    rows, columns = weight.shape
    step = max(1, ROWS_PER_STEP_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        chunk = weight[start : start + step].float().numpy()
        q, d = quantize_blocks(chunk, scheme)
        write(slice(start, start + chunk.shape[0]), torch.from_numpy(q), torch.from_numpy(d))
        if done is not None:
            done(slice(start, start + chunk.shape[0]))


def _placeholder(q: torch.Tensor, scale: torch.Tensor, axis: int, scheme: QuantScheme, shape) -> torch.Tensor:
    """The node `finish_export` rewrites to DequantizeLinear (torch.onnx.ops.symbolic emits custom domains)."""
    return torch.onnx.ops.symbolic(
        f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", [q, scale],
        {"axis": axis, "block_size": scheme.group_size, "bits": scheme.bits},
        dtype=torch.float32, shape=shape, version=1,
    )


class QuantizedLinear(nn.Module):
    """`y = x @ W^T (+ b)` with W `[out, in]` held block-quantized: `weight_q` int8 `[in, out]` and `weight_scale`
    float32 `[in / g, out]` (transposed, as DequantizeLinear + MatMul want them). Fill with `load_weight`."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(in_features // scheme.group_size, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def load_weight(self, weight: torch.Tensor, done=None) -> None:
        """Quantize checkpoint weight `[out, in]` (any float dtype) into the buffers; `done(rows)` after each chunk
        of rows (_quantize_into)."""

        def write(rows: slice, q: torch.Tensor, d: torch.Tensor) -> None:
            self.weight_q[:, rows] = q.t()
            self.weight_scale[:, rows] = d.float().t()

        _quantize_into(weight, self.scheme, write, done)

    def dequantized(self) -> torch.Tensor:
        """W^T as float32 `[in, out]`."""
        return dequantize_blocks(self.weight_q.t(), self.weight_scale.t(), (1, self.scheme.group_size)).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            w = _placeholder(self.weight_q, self.weight_scale, 0, self.scheme, self.weight_q.shape)
        else:
            w = self.dequantized()
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


class QuantizedEmbedding(nn.Module):
    """Token embedding `[V, H]` held in blocks (`weight_q` int8 `[V, H]`, int4 values one per byte, `weight_scale`
    float32 `[V, H/g]`)."""

    def __init__(self, num_embeddings: int, dim: int, scheme: QuantScheme):
        super().__init__()
        self.scheme = scheme
        self.register_buffer("weight_q", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(num_embeddings, dim // scheme.group_size))

    def load_weight(self, weight: torch.Tensor, done=None) -> None:
        """Quantize the checkpoint's `[V, H]` table into the buffers; `done(rows)` after each chunk of rows."""

        def write(rows: slice, q: torch.Tensor, d: torch.Tensor) -> None:
            self.weight_q[rows] = q
            self.weight_scale[rows] = d.float()

        _quantize_into(weight, self.scheme, write, done)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # F.embedding exports to Gather (indexing would give GatherND), the pattern the ort lowering fuses
        q = F.embedding(input_ids, self.weight_q)  # [B, S, H]
        scale = F.embedding(input_ids, self.weight_scale)  # [B, S, H/g]
        if torch.onnx.is_in_onnx_export():
            return _placeholder(q, scale, -1, self.scheme, q.shape)
        return dequantize_blocks(q, scale, (1, self.scheme.group_size))


class QuantizedExperts(nn.Module):
    """A layer's routed experts in blocks: `gate_up_q` int8 `[E, 2I, H]` (gate rows then up rows), `down_q` int8
    `[E, H, I]`, float16 scales `[E, 2I, H/g]` and `[E, H, I/g]`. Fill with `load_expert`."""

    def __init__(self, experts: int, hidden: int, inter: int, scheme: QuantScheme):
        super().__init__()
        self.scheme = scheme
        g = scheme.group_size
        self.register_buffer("gate_up_q", torch.zeros(experts, 2 * inter, hidden, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.zeros(experts, 2 * inter, hidden // g, dtype=torch.float16))
        self.register_buffer("down_q", torch.zeros(experts, hidden, inter, dtype=torch.int8))
        self.register_buffer("down_scale", torch.zeros(experts, hidden, inter // g, dtype=torch.float16))

    def load_expert(self, index: int, kind: str, weight: torch.Tensor) -> None:
        """Quantize expert `index`'s checkpoint `kind` ("gate_proj", "up_proj", "down_proj") weight into place."""
        if kind == "down_proj":
            q_rows, d_rows = self.down_q[index], self.down_scale[index]
        else:
            rows = self.gate_up_q.shape[1] // 2
            half = slice(0, rows) if kind == "gate_proj" else slice(rows, 2 * rows)
            q_rows, d_rows = self.gate_up_q[index, half], self.gate_up_scale[index, half]

        def write(rows: slice, q: torch.Tensor, d: torch.Tensor) -> None:
            q_rows[rows] = q
            d_rows[rows] = d

        _quantize_into(weight, self.scheme, write)

    def forward(self, hidden, topk_ids, topk_weights):
        return routed_experts(hidden, topk_ids, topk_weights, self.gate_up_q, self.down_q, self.gate_up_scale,
                              self.down_scale, block_size=(1, self.scheme.group_size), bits=self.scheme.bits)


def quantize_model(model: nn.Module, scheme: QuantScheme) -> Quantization:
    """Swap `model`'s (a DeepseekForCausalLM, built on the meta device) weight modules for quantized ones, in place,
    as KINDS says; returns the manifest's description. A weight whose input size is not a multiple of the group
    size stays unquantized (noted). Call before `to_empty`; fill with the loader (export/checkpoint.py)."""
    config = model.config
    skipped: list[str] = []
    counts = {kind: [0, 0] for kind in QUANTIZED_KINDS}  # kind -> [quantized, kept] weights

    unfit_sizes: set[int] = set()

    def swap_linear(parent: nn.Module, name: str, qualified: str, kind: str) -> None:
        linear = getattr(parent, name)
        fits = scheme.fits(linear.in_features)
        counts[kind][0 if fits else 1] += 1
        if not fits:
            skipped.append(qualified)
            unfit_sizes.add(linear.in_features)
            return
        setattr(parent, name, QuantizedLinear(linear.in_features, linear.out_features, scheme,
                                              bias=linear.bias is not None))

    # The MTP module's block (model.mtp, numbered on after the main layers as in the checkpoint) like any layer;
    # its eh_proj stays float.
    for index, layer in enumerate([*model.model.layers, *getattr(model, "mtp", ())]):
        attention = layer.self_attn
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            if hasattr(attention, name):
                swap_linear(attention, name, f"layers.{index}.self_attn.{name}", "attention projections")
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            blocks = [("shared_experts.", mlp.shared_experts, "shared experts")] if mlp.shared_experts else []
        else:
            blocks = [("", mlp, "dense MLPs")]
        for prefix, block, kind in blocks:
            for name in ("gate_proj", "up_proj", "down_proj"):
                swap_linear(block, name, f"layers.{index}.mlp.{prefix}{name}", kind)
        if hasattr(mlp, "experts"):
            h, i = config.hidden_size, config.moe_intermediate_size
            fits = scheme.fits(h) and scheme.fits(i)
            counts["routed experts"][0 if fits else 1] += 1
            if fits:
                mlp.experts = QuantizedExperts(config.n_routed_experts, h, i, scheme)
            else:
                skipped.append(f"layers.{index}.mlp.experts")
    swap_linear(model, "lm_head", "lm_head", "lm_head")
    fits = scheme.fits(config.hidden_size)
    counts["token embedding"][0 if fits else 1] += 1
    if fits:
        model.model.embed_tokens = QuantizedEmbedding(config.vocab_size, config.hidden_size, scheme)
    else:
        skipped.append("embed_tokens")
    if not any(quantized for quantized, _ in counts.values()):
        sizes = ", ".join(map(str, sorted(unfit_sizes | {config.hidden_size})))
        raise MoetrtError(f"group size {scheme.group_size} divides none of this model's weight input sizes ({sizes}): "
                          f"nothing would be quantized; choose a --group-size that divides them (e.g. 32)")
    if skipped:
        stay = "weights stay" if len(skipped) != 1 else "weight stays"
        note(f"quantization: {len(skipped)} {stay} float32, their input size not a multiple of the group size "
             f"{scheme.group_size}: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}")
    return Quantization(scheme=scheme.name, bits=scheme.bits, group_size=scheme.group_size,
                        **described_kinds(counts, scheme.group_size))


def described_kinds(counts: dict[str, list[int]], group_size: int) -> dict[str, tuple[str, ...]]:
    """The manifest's `tensors` and `kept` from per-kind counts `[quantized, kept]` of weights: a kind none of whose
    weights fit the groups is kept (said why), one only some fit is listed in both with the counts, absent kinds
    (a model without shared experts or dense layers) are left out."""
    why = f"input size not a multiple of {group_size}"
    tensors, kept = [], list(KEPT_KINDS)
    for kind, (quantized, unfit) in counts.items():
        if quantized and unfit:
            tensors.append(f"{kind} ({quantized} of {quantized + unfit})")
            kept.append(f"{kind} ({unfit} of {quantized + unfit}, {why})")
        elif quantized:
            tensors.append(kind)
        elif unfit:
            kept.append(f"{kind} ({why})")
    return {"tensors": tuple(tensors), "kept": tuple(kept)}


def finish_export(model) -> int:
    """Rewrite the traced graph's `moetrt::DequantizeBlocks` placeholders (an onnx_ir model, in place) as standard
    `DequantizeLinear` (opset 21, block-wise), int4 weights as ONNX INT4 initializers; returns how many. Gathered
    embedding rows stay in int8 (ONNX's Gather takes no int4) with their bits in the node's metadata."""
    import onnx_ir as ir

    from moetrt.export.lowering import lazy_initializer

    count = 0
    for node in [n for n in model.graph if n.domain == PLACEHOLDER_DOMAIN and n.op_type == PLACEHOLDER_OP]:
        q, scale = node.inputs
        bits = node.attributes["bits"].value
        if bits == 4 and q.const_value is not None:  # gathered embedding rows stay int8-held (GATHERED_BITS)
            q_input = model.graph.initializers.get(f"{q.name}.int4")  # a weight two nodes read (a shared head)
            if q_input is None:
                q_input = lazy_initializer(model, f"{q.name}.int4", lambda q=q: q.const_value.numpy(),
                                           ir.DataType.INT4, q.shape)
        else:
            q_input = q
        rank = len(q.shape) if q.shape is not None else None
        axis = node.attributes["axis"].value
        if axis < 0 and rank is not None:
            axis += rank
        dequantize = ir.node("DequantizeLinear", [q_input, scale],
                             {"axis": axis, "block_size": node.attributes["block_size"].value})
        if q.const_value is None:  # gathered rows: say what they hold (int4 values travel in int8 here)
            dequantize.metadata_props[GATHERED_BITS] = str(bits)
        out = dequantize.outputs[0]
        old = node.outputs[0]
        out.shape, out.type = old.shape, old.type
        node.graph.insert_before(node, dequantize)
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        node.graph.remove(node, safe=True)
        if bits == 4 and q.name in model.graph.initializers and not q.uses():
            model.graph.initializers.pop(q.name)
        count += 1
    if PLACEHOLDER_DOMAIN in model.opset_imports and not any(n.domain == PLACEHOLDER_DOMAIN for n in model.graph):
        model.opset_imports.pop(PLACEHOLDER_DOMAIN)
    return count


def check_quantizable(dtype: str) -> None:
    """Quantized engines compute in float32 (moetrt's CPU kernel and MatMulNBits take float32 activations)."""
    if dtype != "float32":
        raise MoetrtError(f"quantized engines compute in float32, not {dtype}; drop --dtype or pass --dtype float32")

