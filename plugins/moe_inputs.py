"""Random routed-experts problems for tests, tuning and benchmarks (seeded, any device), and poisoned buffers."""

from __future__ import annotations

import torch

from moetrt.plugins.moe_launch import Buffer, ExpertsShape

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POISON_INT = 2**31 - 1


def random_routing(
    num_tokens: int, num_experts: int, top_k: int, generator: torch.Generator, *, skew: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids `[T, k]` int32, k distinct experts per token (as a router picks), and fp32 weights `[T, k]`.

    skew > 0 favours low expert ids (expert e scored by noise - skew * e), so some experts get many rows and
    others none.
    """
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    scores -= skew * torch.arange(num_experts) / num_experts
    topk_ids = scores.topk(top_k, dim=-1).indices.to(torch.int32)
    topk_weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    return topk_ids, topk_weights / topk_weights.sum(-1, keepdim=True)


def random_weights(shape: ExpertsShape, generator: torch.Generator, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """w_gate_up `[E, 2I, H]`, w_down `[E, H, I]` scaled by 1/sqrt(fan in), so activations stay O(1)."""
    dtype = DTYPES[shape.weight_dtype]
    E, H, I = shape.num_experts, shape.hidden, shape.inter
    w_gate_up = torch.randn(E, 2 * I, H, generator=generator, device=device, dtype=dtype) * H**-0.5
    w_down = torch.randn(E, H, I, generator=generator, device=device, dtype=dtype) * I**-0.5
    return w_gate_up, w_down


def random_problem(shape: ExpertsShape, seed: int, device="cpu", *, skew: float = 0.0) -> dict[str, torch.Tensor]:
    """`{hidden, topk_ids, topk_weights, w_gate_up, w_down}` for `shape` on `device`."""
    generator = torch.Generator().manual_seed(seed)
    topk_ids, topk_weights = random_routing(shape.num_tokens, shape.num_experts, shape.top_k, generator, skew=skew)
    hidden = torch.randn(shape.num_tokens, shape.hidden, generator=generator).to(DTYPES[shape.act_dtype])
    w_gate_up, w_down = random_weights(shape, generator)
    problem = dict(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, w_gate_up=w_gate_up, w_down=w_down)
    return {name: tensor.to(device) for name, tensor in problem.items()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in fp64; NaN anywhere in `got` gives inf."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def poisoned(buffer: Buffer, device="cpu") -> torch.Tensor:
    """A scratch or output buffer filled with NaN (INT32_MAX for ints): rows a kernel forgets to write stay visible.
    Usable as the allocator of `triton_moe.plan_tensors`."""
    if buffer.dtype == "int32":
        return torch.full(buffer.shape, POISON_INT, dtype=torch.int32, device=device)
    return torch.full(buffer.shape, float("nan"), dtype=DTYPES[buffer.dtype], device=device)
