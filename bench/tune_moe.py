"""Measure the routed-experts block sizes on a GPU and write the winners into plugins/moe_configs.json (a few minutes).

    python -m moetrt.bench.tune_moe [--experts 256 32] [--tokens 1 8 64 512 4096] [--hidden 7168 ...]

Per (E, T): each candidate block_m is aligned once, then every gate_up tile and every down tile is timed on its
own (triton.testing.do_bench, CUDA events, median); the best tile of each stage is kept and the block_m with the
smallest align + gate_up + down time wins. GEMM kernels do not depend on E or T, so each compiles once per run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from moetrt.plugins.moe_configs import TABLE_PATH, shape_key
from moetrt.plugins.moe_launch import ExpertsShape, GemmTile, TileConfig

# (block_n, block_k, num_warps, num_stages): few rows per expert stream weights; many rows need MMA-sized tiles.
DECODE_TILES = tuple(
    GemmTile(*tile)
    for tile in ((32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (64, 64, 4, 5), (32, 256, 4, 3))
)
PREFILL_TILES = tuple(
    GemmTile(*tile)
    for tile in ((64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 3))
)


def block_m_candidates(shape: ExpertsShape) -> tuple[int, ...]:
    rows_per_expert = shape.num_slots / shape.num_experts
    if rows_per_expert <= 16:
        return (16,)
    if rows_per_expert <= 64:
        return (16, 32, 64)
    return (64, 128)


def tiles_for(block_m: int) -> tuple[GemmTile, ...]:
    return DECODE_TILES if block_m <= 32 else PREFILL_TILES


def merge_tuned(table: dict, shape: ExpertsShape, device: str, results: dict[int, tuple[TileConfig, float]]):
    """The table with `results` ({T: (config, ms)}) merged into the entry for `shape` (other T's are kept)."""
    entry = table.setdefault("tuned", {}).setdefault(shape_key(shape), {"device": device, "configs": {}, "ms": {}})
    entry["device"] = device
    for tokens, (config, ms) in sorted(results.items()):
        entry["configs"][str(tokens)] = config.to_dict()
        entry["ms"][str(tokens)] = round(ms, 4)
    return table


def time_stage(shape, config: TileConfig, index: int, tensors) -> float:
    """Median ms of one stage with `config`, or inf when the tile does not compile or fit on this GPU."""
    from triton.testing import do_bench

    from moetrt.plugins import triton_moe

    plan = triton_moe.plan_for(shape, config)
    try:
        return do_bench(lambda: triton_moe.launch_stage(plan, index, tensors), warmup=5, rep=25, return_mode="median")
    except Exception as error:  # out of shared memory or registers: not a candidate here
        print(f"    skip {config}: {type(error).__name__}", file=sys.stderr)
        return math.inf


def tune_block_m(shape, inputs, block_m: int) -> tuple[TileConfig, float]:
    from moetrt.plugins import triton_moe

    tiles = tiles_for(block_m)
    group_m = 1 if block_m <= 32 else 8
    base = TileConfig(block_m, tiles[0], tiles[0], group_m)
    plan = triton_moe.plan_for(shape, base)
    tensors = triton_moe.plan_tensors(plan, inputs)
    triton_moe.run_plan(plan, tensors)  # fills the alignment and act that the timed stages read
    align_ms = time_stage(shape, base, 0, tensors)
    gate_up = min(tiles, key=lambda t: time_stage(shape, TileConfig(block_m, t, base.down, group_m), 1, tensors))
    down = min(tiles, key=lambda t: time_stage(shape, TileConfig(block_m, gate_up, t, group_m), 2, tensors))
    best = TileConfig(block_m, gate_up, down, group_m)
    total = align_ms + time_stage(shape, best, 1, tensors) + time_stage(shape, best, 2, tensors)
    return best, total


def tune_point(shape: ExpertsShape, inputs: dict) -> tuple[TileConfig, float]:
    results = [tune_block_m(shape, inputs, block_m) for block_m in block_m_candidates(shape)]
    return min(results, key=lambda result: result[1])


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Tune the Triton routed-experts block sizes on this GPU.")
    parser.add_argument("--experts", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=TABLE_PATH)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tune_moe: no CUDA GPU visible to torch; tuning needs one", file=sys.stderr)
        return 1
    from moetrt.plugins.moe_inputs import random_routing

    device = torch.cuda.get_device_name()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    experts = max(args.experts)
    w_gate_up = torch.randn(experts, 2 * args.inter, args.hidden, device="cuda", dtype=dtype).mul_(args.hidden**-0.5)
    w_down = torch.randn(experts, args.hidden, args.inter, device="cuda", dtype=dtype).mul_(args.inter**-0.5)
    table = json.loads(args.out.read_text()) if args.out.exists() else {"tuned": {}}
    for num_experts in args.experts:
        results = {}
        for tokens in args.tokens:
            shape = ExpertsShape(tokens, args.hidden, args.inter, num_experts, args.top_k, args.dtype, args.dtype)
            generator = torch.Generator().manual_seed(tokens)
            topk_ids, topk_weights = random_routing(tokens, num_experts, args.top_k, generator)
            hidden = torch.randn(tokens, args.hidden, device="cuda", dtype=dtype)
            inputs = dict(hidden=hidden, topk_ids=topk_ids.cuda(), topk_weights=topk_weights.cuda())
            inputs.update(w_gate_up=w_gate_up[:num_experts], w_down=w_down[:num_experts])
            start = time.perf_counter()
            results[tokens] = tune_point(shape, inputs)
            config, ms = results[tokens]
            seconds = time.perf_counter() - start
            print(f"E={num_experts} T={tokens}: {ms:.3f} ms with {config} ({seconds:.0f} s)", flush=True)
        table = merge_tuned(table, shape, device, results)  # the key ignores T
        args.out.write_text(json.dumps(table, indent=1) + "\n")  # after each E, so a cut-short run keeps its work
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
