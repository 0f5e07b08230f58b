"""The routed-expert computation behind the plugin node: torch reference, export hook and Triton entry point.

`routed_experts_reference` defines the numerics every backend is compared with. `routed_experts` is what the
reference model calls: eager it runs the reference, under `torch.onnx.export` it emits the plugin node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetrt.plugins.spec import QUANTIZED_BITS_ATTRIBUTE, ROUTED_EXPERTS


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_TABLES: dict[torch.dtype, "object"] = {}


def fp8_to_float32(weight: torch.Tensor) -> torch.Tensor:
    """An fp8 (e4m3fn / e5m2) tensor as float32, exactly, through a 256-entry table of the format's values indexed by
    the raw bytes: 4x faster than torch's own conversion on this CPU (4.9 vs 21.5 ms for a 1408x2048 expert weight,
    which is what bounded the FP8 build)."""
    import numpy as np

    table = _FP8_TABLES.get(weight.dtype)
    if table is None:
        table = _FP8_TABLES[weight.dtype] = torch.arange(256, dtype=torch.uint8).view(weight.dtype).float().numpy()
    raw = weight.contiguous().view(torch.uint8).numpy()
    return torch.from_numpy(np.take(table, raw))


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block_size=(128, 128)) -> torch.Tensor:
    """fp8 (or int8) `[..., out, in]` with `[..., ceil(out/bo), ceil(in/bi)]` scales -> fp32 (`block * scale_inv`),
    contiguous. DeepSeek-V3's FP8 layout (its inference code's weight_dequant): `scale_inv` multiplies."""
    out_features, in_features = weight.shape[-2:]
    bo, bi = block_size
    scale = scale_inv.float()
    owned = weight.dtype in FP8_DTYPES
    values = fp8_to_float32(weight) if owned else weight.float().contiguous()
    if out_features % bo == 0 and in_features % bi == 0:  # broadcast the scales over whole blocks
        lead = weight.shape[:-2]
        blocks = values.view(*lead, out_features // bo, bo, in_features // bi, bi)
        factors = scale[..., :, None, :, None]
        return (blocks.mul_(factors) if owned else blocks * factors).view(weight.shape)
    scale = scale.repeat_interleave(bo, dim=-2)[..., :out_features, :]
    scale = scale.repeat_interleave(bi, dim=-1)[..., :in_features]
    return values * scale


def routed_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """`sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))` with e = topk_ids[t, k].

    hidden `[T, H]`, topk_ids `[T, k]` (int32/int64), topk_weights `[T, k]` (fp32), w_gate_up `[E, 2I, H]`
    (gate rows then up rows), w_down `[E, H, I]`. Block-scaled weights (fp8, or int8/int4 values in int8) come
    with their scales `[E, rows / block_size[0], in / block_size[1]]` (default the fp8 128x128 blocks) and are
    dequantized one expert at a time. Returns `[T, H]` in hidden's dtype; the combine accumulates in fp32.
    """
    block = tuple(block_size or ROUTED_EXPERTS.attributes["block_size"])

    def expert_weight(weight: torch.Tensor, scale: torch.Tensor | None, expert: int) -> torch.Tensor:
        return weight[expert] if scale is None else dequantize_blocks(weight[expert], scale[expert], block)

    num_tokens, top_k = topk_ids.shape
    intermediate = w_down.shape[-1]
    compute_dtype = hidden.dtype if w_gate_up.dtype == hidden.dtype and w_gate_up_scale is None else torch.float32

    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    token_of_slot = order // top_k
    weight_of_slot = topk_weights.reshape(-1)[order].float()

    output = torch.zeros(num_tokens, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_of_slot[start : start + count]
        x = hidden[tokens].to(compute_dtype)  # [n, H]
        gate_up = x @ expert_weight(w_gate_up, w_gate_up_scale, expert).to(compute_dtype).t()  # [n, 2I]
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        y = act @ expert_weight(w_down, w_down_scale, expert).to(compute_dtype).t()  # [n, H]
        output.index_add_(0, tokens, y.float() * weight_of_slot[start : start + count, None])
        start += count
    return output.to(hidden.dtype)


def routed_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    bits: int = 0,
) -> torch.Tensor:
    """The model's call site: the reference in eager mode, ONE `moetrt::RoutedExperts` node under ONNX export.
    Quantized experts (export/quantized.py) pass int8 weights, float16 scales, `block_size=(1, group_size)` and
    `bits` 8 or 4; the node records both as attributes."""
    if torch.onnx.is_in_onnx_export():
        inputs = [hidden, topk_ids.to(torch.int32), topk_weights.float(), w_gate_up, w_down]
        if w_gate_up_scale is not None:
            inputs += [w_gate_up_scale, w_down_scale]
        attrs = dict(ROUTED_EXPERTS.attributes)
        attrs["block_size"] = list(block_size or attrs["block_size"])
        if bits:
            attrs[QUANTIZED_BITS_ATTRIBUTE] = bits
        return torch.onnx.ops.symbolic(
            ROUTED_EXPERTS.qualified_name,
            inputs,
            attrs,
            dtype=hidden.dtype,
            shape=hidden.shape,
            version=ROUTED_EXPERTS.version,
        )
    return routed_experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_gate_up_scale, w_down_scale,
                                    block_size)


def moe_stage_reference(stage: str, dims, block_m: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One stage (plugins/spec.py's MOE_STAGES) in torch, with the kernels' exact outputs: padding rows of
    `sorted_slots` hold T*k, unused `block_experts` -1, padding rows of `act` zeros. dims: an ExpertDims. Inputs and
    outputs are in the stage node's order; the four stages compose to `routed_experts_reference`."""
    return _STAGES[stage](dims, block_m, *inputs)


def _align(dims, block_m, topk_ids):
    from moetrt.plugins.moe_launch import max_blocks

    flat = topk_ids.reshape(-1).long()
    slots = flat.numel()
    blocks = max_blocks(slots, dims.num_experts, block_m)
    sorted_slots = torch.full((blocks * block_m,), slots, dtype=torch.int32)
    block_experts = torch.full((blocks,), -1, dtype=torch.int32)
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.bincount(flat, minlength=dims.num_experts).tolist()
    row = taken = 0
    for expert, count in enumerate(counts):
        sorted_slots[row : row + count] = order[taken : taken + count]
        padded = -(-count // block_m) * block_m
        block_experts[row // block_m : (row + padded) // block_m] = expert
        row, taken = row + padded, taken + count
    return sorted_slots, block_experts, torch.tensor([row], dtype=torch.int32)


def _expert_rows(dims, block_m, sorted_slots, block_experts, num_padded):
    """(expert, rows, slots) per used block; padding rows have slot == T*k."""
    for block in range(int(num_padded[0]) // block_m):
        rows = torch.arange(block * block_m, (block + 1) * block_m)
        yield int(block_experts[block]), rows, sorted_slots[rows].long()


def _gate_up(dims, block_m, hidden, w_gate_up, sorted_slots, block_experts, num_padded):
    num_slots = hidden.shape[0] * dims.top_k
    act = torch.zeros(sorted_slots.shape[0], dims.inter, dtype=hidden.dtype)
    for expert, rows, slots in _expert_rows(dims, block_m, sorted_slots, block_experts, num_padded):
        real = slots < num_slots
        gate_up = hidden[slots[real] // dims.top_k] @ w_gate_up[expert].t()  # [n, 2I]
        act[rows[real]] = F.silu(gate_up[:, : dims.inter]) * gate_up[:, dims.inter :]
    return (act,)


def _down(dims, block_m, act, w_down, topk_weights, sorted_slots, block_experts, num_padded):
    weights = topk_weights.reshape(-1)
    expert_out = torch.zeros(weights.numel(), dims.hidden, dtype=act.dtype)
    for expert, rows, slots in _expert_rows(dims, block_m, sorted_slots, block_experts, num_padded):
        real = slots < weights.numel()
        y = (act[rows[real]] @ w_down[expert].t()).float() * weights[slots[real], None]
        expert_out[slots[real]] = y.to(act.dtype)
    return (expert_out,)


def _combine(dims, block_m, expert_out):
    return (expert_out.reshape(-1, dims.top_k, dims.hidden).float().sum(1).to(expert_out.dtype),)


_STAGES = {"align": _align, "gate_up": _gate_up, "down": _down, "combine": _combine}
