"""The ONNX Runtime backend's planning step: where its engine runs and who computes the routed experts.

`plan_ort` turns the user's OrtOptions into a LoweringPlan before anything is traced: the execution provider
(CUDA where onnxruntime-gpu and a GPU are present, else the CPU), the expert slices that balance the CPU MoE
op's threads, and the expert kernel ("auto" resolved here, with the reason). `check_export` holds an existing
export against the same options.
"""

from __future__ import annotations

import os

from moetrt import hardware
from moetrt.config import ModelConfig
from moetrt.errors import MoetrtError
from moetrt.export.lowering import LoweringPlan
from moetrt.export.ort.lower import MOE_KERNELS
from moetrt.formats import ExportInfo
from moetrt.quantization import QuantScheme
from moetrt.settings import OrtOptions

# Below this many weights per expert (1 MiB in float32) the kernel's extra calls (one more ONNX Runtime run and
# kernel call per MoE layer) cost more than its streaming gains. tiny-r1 (18k weights, 74 KB) built with the kernel
# stepped in 0.53 ms against 0.28-0.30 ms without it at batch 1, 0.67 against 0.44-0.46 ms at batch 8; ds-mini (1.6M
# weights) gains (bench/NOTES.md). Counted in weights, not stored bytes: quantized experts cost ONNX Runtime's QMoE
# more per weight than float ones cost its MoE (ds-mini's int4 layer: QMoE 3.2 ms, the kernel 0.6 ms at batch 1).
KERNEL_MIN_EXPERT_WEIGHTS = 1 << 18

# What moetrt's ONNX Runtime engines compute in: the CPU provider has no bfloat16 kernels, and the runtime binds
# numpy arrays (runtime/ort/session.py), which have no bfloat16 either.
ORT_DTYPES = ("float32", "float16")


def ort_provider() -> str:
    """CUDA when onnxruntime-gpu and a GPU are present, else the CPU."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and hardware.cuda_devices():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def default_expert_slices(intermediate: int, threads: int | None = None, unit: int = 1) -> int:
    """One slice per CPU thread ONNX Runtime will use (at most 16), a divisor of the expert width that leaves each
    slice a whole number of `unit` channels (quantized experts: the group size)."""
    threads = min(threads or os.cpu_count() or 1, 16)
    return max(s for s in range(1, threads + 1) if intermediate % (s * unit) == 0) if intermediate % unit == 0 else 1


def quantized_experts(hidden: int, inter: int, scheme: QuantScheme | None) -> QuantScheme | None:
    """The scheme the routed experts are held in: `scheme` when both their input widths (hidden for gate/up, the
    expert width for down) split into whole groups, else None (the export keeps them float32)."""
    return scheme if scheme is not None and scheme.fits(hidden) and scheme.fits(inter) else None


def choose_moe_kernel(requested: str, hidden: int, inter: int, slices: int, dtype: str, cpu: bool,
                      scheme: QuantScheme | None = None) -> tuple[str, str]:
    """The expert kernel for an ONNX Runtime engine and why: "moetrt" or "onnxruntime". `scheme`: the experts'
    quantization (quantized_experts), None for float experts."""
    from moetrt.plugins.cpu_experts import find_compiler, supported

    if requested not in ("auto", *MOE_KERNELS):
        raise MoetrtError(f"--moe-kernel must be auto, {' or '.join(MOE_KERNELS)}, got {requested!r}")
    unfit = ("it runs on the CPU only" if not cpu else "it computes in float32" if dtype != "float32"
             else _kernel_unfit(hidden, inter, slices, scheme) if scheme is not None
             else supported(hidden, inter, slices))
    if requested == "moetrt":
        if unfit:
            raise MoetrtError(f"--moe-kernel moetrt cannot be used here: {unfit}; use --moe-kernel onnxruntime")
        return "moetrt", "requested"
    if requested == "onnxruntime":
        return "onnxruntime", "requested"
    if unfit:
        return "onnxruntime", f"moetrt's kernel does not apply: {unfit}"
    if find_compiler() is None:  # the build compiles the kernel for each ISA level it ships
        return "onnxruntime", "no C compiler here to build moetrt's kernel"
    if 3 * hidden * inter < KERNEL_MIN_EXPERT_WEIGHTS:
        return "onnxruntime", "experts under 262,144 weights: the kernel's extra calls would cost more than it saves"
    return "moetrt", "experts stream once per batch from a packed layout"


def _kernel_unfit(hidden: int, inter: int, slices: int, scheme: QuantScheme) -> str | None:
    from moetrt.plugins.cpu_experts import supported_quantized

    return supported_quantized(hidden, inter, slices, scheme.bits, scheme.group_size)


def plan_ort(options: OrtOptions, config: ModelConfig, dtype: str, scheme: QuantScheme | None = None) -> LoweringPlan:
    """The `ort` lowering for `config` at `dtype` on this machine, its weights quantized by `scheme` (None: not).
    Raises MoetrtError when an explicit choice cannot work here (e.g. --moe-kernel moetrt for float16 experts)."""
    provider = ort_provider()
    check_dtype(dtype, provider)
    cpu = provider == "CPUExecutionProvider"
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    experts = quantized_experts(hidden, inter, scheme)
    slices = options.expert_slices
    if slices is None:  # the CUDA kernel has no static thread split to balance
        slices = default_expert_slices(inter, unit=experts.group_size if experts else 1) if cpu else 1
    kernel, why = choose_moe_kernel(options.moe_kernel, hidden, inter, slices, dtype, cpu, experts)
    return LoweringPlan("ort", expert_slices=slices, moe_kernel=kernel, why=why)


def check_dtype(dtype: str, provider: str) -> None:
    """Refuse, before any export work, a dtype moetrt's ONNX Runtime engines cannot run on `provider`."""
    if dtype not in ORT_DTYPES:
        why = ("its CPU provider has no bfloat16 kernels" if provider == "CPUExecutionProvider"
               else "moetrt's session binds numpy arrays, which have no bfloat16")
        raise MoetrtError(f"ONNX Runtime engines run float32 or float16 here, not {dtype} ({why}); build with "
                          "--dtype float32 or --dtype float16, or with --backend trt on a GPU")


def check_export(info: ExportInfo, options: OrtOptions, source: str) -> None:
    """Refuse to build from an export whose lowering contradicts `options` (one line naming the re-export) or
    whose dtype ONNX Runtime cannot run here."""
    check_dtype(info.dtype, ort_provider())
    if info.target == "ort" and options.moe_kernel not in ("auto", info.moe_kernel):
        raise MoetrtError(f"{source} was exported with its experts in {info.moe_kernel}; --moe-kernel "
                          f"{options.moe_kernel} needs a re-export (moetrt export --moe-kernel ...)")
