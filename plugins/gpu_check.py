"""`make gpu-check`: the Triton expert dispatch and its AOT PTX on a CUDA GPU, in one run of a few minutes.

1. correctness against moe_dispatch_reference on awkward shapes (fp32 <= 1e-5, fp16/bf16 <= 1e-2), with scratch
   and output buffers poisoned (NaN) first, and bitwise repeatability;
2. the AOT stages of plugins/aot_kernels.py loaded from PTX and launched through the CUDA driver API with exactly
   their parameter lists (as a TensorRT AOT plugin would), against the reference;
   then the TensorRT stage plugins without TensorRT: buffers sized by their shape functions and, per stage, the JIT
   launch @trtp.impl makes and the one PTX @trtp.aot_impl hands TensorRT, launched with the grid and int32 extra
   args it declares, at several T from one compilation; and the TensorRT session's cuda-python layer (device
   latent cache, copies, a captured and replayed CUDA graph) where cuda-python is installed;
3. timings with CUDA events at DeepSeek-V3 shapes (H=7168, I=2048, k=8, E=256 and an E=32 shard, bf16): Triton vs
   the torch reference vs a per-expert loop, as GB/s (bytes of the experts hit + activations) and TFLOP/s against
   the H200's 4.8 TB/s and ~790 TFLOP/s bf16. Targets: T <= 64 at >= 60% of bandwidth, T = 4096 at >= 50% of the
   matrix rate.

Exit status 0 when everything passed, 1 otherwise (or without a CUDA GPU). --dry-run runs the same code at tiny
shapes on the CPU under TRITON_INTERPRET=1, without driver launches or targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

H200_BYTES_PER_S = 4.8e12
H200_BF16_FLOPS = 790e12
DECODE_BANDWIDTH_TARGET = 0.60
PREFILL_MATRIX_TARGET = 0.50


@dataclasses.dataclass(frozen=True)
class Scale:
    """Problem sizes for one run: the small correctness cases, and the benchmark grid."""

    small_cases: tuple  # (T, H, I, E, k, act dtype, weight dtype)
    aot_case: tuple
    hidden: int
    inter: int
    top_k: int
    experts: tuple[int, ...]
    tokens: tuple[int, ...]
    aot_points: tuple[tuple[int, int], ...]  # (E, T) where the benchmark also runs the AOT PTX
    trt_cases: tuple[tuple, ...]  # (H, I, E, k, dtype) for the TensorRT stage plugins
    trt_tokens: tuple[int, ...]  # T values one compiled engine's kernels serve


FULL = Scale(
    small_cases=(
        (1, 200, 136, 8, 2, "float32", "float32"),
        (77, 300, 250, 16, 4, "float32", "float32"),
        (300, 1000, 520, 4, 2, "float32", "float32"),  # ~150 rows per expert: the prefill config
        (300, 1000, 520, 64, 8, "bfloat16", "bfloat16"),
        (600, 1000, 520, 8, 2, "bfloat16", "bfloat16"),
        (64, 2061, 519, 128, 6, "float16", "float16"),
        (33, 7168, 2048, 16, 8, "float32", "float32"),  # fp32 over DeepSeek-V3's reduction lengths
    ),
    aot_case=(37, 200, 136, 8, 2, "float32", "float32"),
    hidden=7168,
    inter=2048,
    top_k=8,
    experts=(256, 32),
    tokens=(1, 8, 64, 512, 4096),
    aot_points=((256, 64), (32, 4096)),
    trt_cases=((1000, 520, 64, 6, "bfloat16"), (200, 136, 8, 2, "float32")),
    trt_tokens=(1, 5, 64, 300),
)
DRY = Scale(
    small_cases=((1, 40, 24, 4, 2, "float32", "float32"), (37, 72, 40, 8, 3, "bfloat16", "bfloat16")),
    aot_case=(9, 40, 24, 4, 2, "float32", "float32"),
    hidden=72,
    inter=40,
    top_k=4,
    experts=(8,),
    tokens=(1, 24),
    aot_points=((8, 24),),
    trt_cases=((40, 24, 8, 3, "float32"),),
    trt_tokens=(1, 9),
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--skip-bench", action="store_true", help="correctness and AOT checks only")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA GPU visible to torch {torch.__version__}; run it on an NVIDIA GPU machine "
            "with a CUDA build of torch (make install TORCH=...)",
            file=sys.stderr,
        )
        return 1
    from moetrt.plugins import gpu_check_steps as steps  # imports triton: after TRITON_INTERPRET is settled

    check = steps.Check(device="cpu" if args.dry_run else "cuda", dry_run=args.dry_run)
    scale = DRY if args.dry_run else FULL
    check.step("header", check.header)
    check.step("small shapes", check.small_shapes, scale.small_cases)
    check.step("AOT", check.aot_small, scale.aot_case)
    check.step("TensorRT stage plugins", check.trt_stages, scale.trt_cases, scale.trt_tokens)
    check.step("cuda-python", check.cuda_python)
    if not args.skip_bench:
        check.step("benchmark", check.benchmark, scale)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
