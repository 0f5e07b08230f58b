"""The `moetrt` command line: each command wires options to the library function a user would call.

Imports happen inside the commands, so inference commands never load torch and every command starts fast.
User errors (MoetrtError) print one line and exit 1; `--verbose` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal, Optional


def _exit_1_on_launcher_stop() -> None:
    """Until MPI starts and runtime/parallel installs its own handlers: a rank that another rank's death stops
    (MPICH's gforker sends SIGINT, then SIGQUIT) exits with status 1 and one line, not a traceback or a death by
    signal that gforker would count as success."""
    import signal

    def stop(number, _frame):
        sys.stderr.write(f"error: expert parallelism: stopped by the launcher (signal {number}) while starting\n")
        sys.stderr.flush()
        os._exit(1)

    for number in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(number, stop)


if "--expert-parallel" in sys.argv[1:]:  # before the imports below: they take most of a second
    _exit_1_on_launcher_stop()

import typer  # noqa: E402

from moetrt import progress
from moetrt.errors import MoetrtError
from moetrt.settings import (
    BACKEND_CHOICES,
    DEFAULT_LATENT_CACHE_BYTES,
    DEFAULT_MAX_SEQ,
    DTYPE_CHOICES,
    MOE_KERNEL_CHOICES,
    TRT_PLUGIN_CHOICES,
    BuildConfig,
    BuildProfile,
    OrtOptions,
    TrtOptions,
)
from moetrt.quantization import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES
from moetrt.export.verify import thresholds_help
from moetrt.runtime.requests import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from moetrt.runtime.parallel.options import COMBINE_CHOICES, DEFAULT_TIMEOUT as EP_DEFAULT_TIMEOUT
from moetrt.tasks import TASKS
from moetrt.runtime.server.limits import DEFAULT_LIMITS as SERVER_LIMITS, LOG_LEVELS as SERVER_LOG_LEVELS


class _Commands(typer.core.TyperGroup):
    """The command group: every command also takes the group's --verbose/-v, after its name."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        verbose = next(param for param in self.params if param.name == "verbose")
        for command in self.commands.values():
            command.params.append(verbose)


app = typer.Typer(
    cls=_Commands,
    help="Compile DeepSeek-V3/R1-class MoE checkpoints into engines and run them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_verbose = False
# Export targets (export/lowering.py TARGETS, which imports onnx_ir: not loaded just to parse options).
TARGET_CHOICES = ("ort", "trt", "onnx")
# Import names of the optional dependencies, by the pyproject extra that installs them.
EXTRA_FOR_MODULE = {
    "torch": "export", "onnx": "export", "onnx_ir": "export", "onnxscript": "export", "safetensors": "export",
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
    "triton": "gpu", "cuda": "gpu", "tensorrt": "trt", "mpi4py": "mpi",
    "transformers": "dev", "matplotlib": "dev", "scipy": "dev",
}

# Options with choices are typed Literal[...]: typer lists them in --help and refuses others with a usage error.
Target = Literal[TARGET_CHOICES]
Dtype = Literal[DTYPE_CHOICES]
MoeKernel = Literal[MOE_KERNEL_CHOICES]
Quantize = Literal[QUANTIZE_CHOICES]
QUANTIZE_HELP = ("Weight-only quantization: symmetric int8 or int4 blocks with one float16 scale per --group-size "
                 "input channels (experts, dense MLPs, attention, lm_head, embedding); none keeps the dtype.")
GROUP_SIZE_HELP = (f"Input channels per quantization scale (a power of two >= 16; default {DEFAULT_GROUP_SIZE}); "
                   "with --quantize int8|int4 only.")
Task = Literal[tuple(TASKS)]
Speculative = Literal["mtp"]
_SPECULATIVE = typer.Option(None, "--speculative", help="Speculative decoding: mtp drafts with the engine's "
                            "multi-token-prediction module (build it with --mtp); greedy output is unchanged, "
                            "sampled output keeps its distribution.")
_DRAFT_TOKENS = typer.Option(None, "--draft-tokens", help="Draft tokens per step with --speculative (default and, "
                              "for now, only: 1).")
_MTP = typer.Option(False, "--mtp", help="Include the checkpoint's multi-token-prediction module (DeepSeek-V3's "
                    "MTP layer) so that --speculative mtp can draft with it. Plain decoding skips it with --moe-kernel "
                    "moetrt; in one graph its nodes still run, on empty tensors. ONNX Runtime engines; not under "
                    "--expert-parallel.")
MOE_KERNEL_HELP = ("ONNX Runtime (ort target): the routed experts in onnxruntime's MoE op (onnxruntime), in moetrt's "
                   "CPU kernel (moetrt), or auto (moetrt's for float32 or int8/int4 experts of 262,144 weights and up, "
                   "1 MiB in float32, on the CPU).")


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from moetrt import __version__

        try:
            typer.echo(f"moetrt {version('moetrt')}")
        except PackageNotFoundError:  # a checkout that is not installed
            typer.echo(f"moetrt {__version__}")
        raise typer.Exit()


def _set_verbose(value: bool) -> None:
    global _verbose
    _verbose = _verbose or value


@app.callback()
def _options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", is_eager=True, expose_value=False, callback=_set_verbose,
                                 help="Show tracebacks for errors (after the command too)."),
    version: bool = typer.Option(False, "--version", is_eager=True, expose_value=False, callback=_show_version,
                                 help="Print moetrt's version and exit."),
) -> None:
    progress.command = ctx.invoked_subcommand or progress.command


def _human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# Expert parallelism (runtime/parallel, docs/expert-parallel.md): the same options on every command that loads an
# engine.
_EP = typer.Option(False, "--expert-parallel", help="Run under `mpiexec -n N`: the routed experts split over "
                   "the N processes, rank 0 does the command (needs the mpi extra).")
_EP_PLACEMENT = typer.Option(None, "--expert-placement", help="Routing counts from --record-routing: balance "
                             "the busiest experts over the ranks (default: round-robin).")
_EP_COMBINE = typer.Option("allreduce", "--ep-combine", help="How ranks sum their experts' outputs: an MPI "
                           "Allreduce, or an Alltoallv of the rows each computed.")
_EP_TIMEOUT = typer.Option(EP_DEFAULT_TIMEOUT, "--ep-timeout", help="Seconds a rank waits for the others before "
                           "it exits with an error naming the ranks that did not arrive.")
_RECORD_ROUTING = typer.Option(None, "--record-routing", help="With --expert-parallel: write each MoE layer's "
                               "routed tokens per expert to this file at exit (for --expert-placement).")
EpCombine = Literal[COMBINE_CHOICES]


def _expert_parallel(engine: Path, enabled: bool, placement: Optional[Path], combine: str, timeout: float,
                     record_routing: Optional[Path], threads: Optional[int]):
    """The command's ExpertParallelOptions (None without --expert-parallel). On ranks other than 0 this loads the
    engine and serves rank 0's steps until rank 0 ends, then exits: the rest of the command runs on rank 0 only."""
    from moetrt.runtime.parallel.options import ExpertParallelOptions

    if not enabled:
        given = [name for name, value in (("--expert-placement", placement), ("--record-routing", record_routing),
                                          ("--ep-combine", combine != "allreduce"),
                                          ("--ep-timeout", timeout != EP_DEFAULT_TIMEOUT)) if value]
        if given:
            raise MoetrtError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --expert-parallel")
        ranks = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
        if ranks.isdigit() and int(ranks) > 1 and os.environ.get("PMI_RANK", "0") in ("0", ""):
            typer.echo(f"warning: launched as one of {ranks} MPI ranks without --expert-parallel: every rank runs the "
                       "whole command on its own; add --expert-parallel to split the experts over them", err=True)
        return None
    options = ExpertParallelOptions(placement=placement, combine=combine, timeout=timeout,  # type: ignore[arg-type]
                                    record_routing=record_routing)
    import signal

    from moetrt.runtime.engine import Engine
    from moetrt.runtime.parallel.job import join

    group = join(options)  # installs the SIGQUIT handler
    if group.rank == 0:  # Ctrl-C as without MPI (mirror.py holds it during a step); the others keep main()'s
        signal.signal(signal.SIGINT, signal.default_int_handler)  # handler until their loop takes over
    else:
        Engine.load(engine, threads=threads, expert_parallel=options)  # returns only on rank 0
    return options


@app.command()
def info(
    source: Path = typer.Argument(..., help="Checkpoint directory, its config.json, or an engine directory."),
    context: int = typer.Option(32768, min=1, help="Tokens of context per sequence for the GPU estimate."),
    batch: int = typer.Option(1, min=1, help="Concurrent sequences for the GPU estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quantize: Quantize = typer.Option("none", help="For a checkpoint: the engine's weights for the fit report ("
                                      "int8 / int4 as build-engine --quantize; an engine says its own)."),
    group_size: Optional[int] = typer.Option(None, help=GROUP_SIZE_HELP),
) -> None:
    """Layers, experts, routing, parameters, weight bytes, KV-cache bytes, GPUs needed, and whether an engine fits
    this machine's memory and disk (weights, latent cache at --context x --batch, bytes read per decode token)."""
    from moetrt.config import load_config
    from moetrt.export.info import describe, fit_report

    engine_mtp = None
    if (source / "manifest.json").is_file():  # an engine: its manifest's checks come before reading any file it names
        from moetrt.formats import read_manifest

        manifest = read_manifest(source)
        engine_mtp = manifest.io.mtp_layers
    config = load_config(source)
    if engine_mtp is not None:
        fit = fit_report(config, manifest.dtype, manifest.quantization, min(context, manifest.profile.max_context),
                         batch, source,
                         engine_bytes=sum(record.bytes for record in manifest.artifacts.values()), building=False,
                         mtp_layers=engine_mtp)
    else:
        from moetrt.export.info import planned_quantization

        fit = fit_report(config, "float32", planned_quantization(str(quantize), _group_size(quantize, group_size)),
                         context, batch,
                         source.parent if source.is_file() else source)
    summary = {**describe(config, context=context, batch=batch), "fit": fit}
    if engine_mtp is not None:
        summary["engine"] = _engine_summary(source)
        fit["bytes_read_per_token"] = summary["engine"]["bytes_read_per_token"]  # with the layout's scale bytes
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    kv = summary["kv_bytes_per_token"]
    weights = summary["weight_bytes"]
    lines = [
        f"model            {summary['model_type']}: {summary['layers']} layers "
        f"({summary['dense_layers']} dense, {summary['moe_layers']} MoE)"
        + _mtp_note(summary["mtp_layers_skipped"], engine_mtp),
        f"experts          {summary['routed_experts']} routed + {summary['shared_experts']} shared, "
        f"{summary['experts_per_token']} active per token",
        f"routing          {summary['router']}, scale {summary['routed_scaling_factor']:g}, "
        f"normalised {summary['norm_topk_prob']}",
        f"attention        {summary['attention']}, rope {summary['rope']}",
        f"parameters       {_human_count(summary['total_params'])} total, "
        f"{_human_count(summary['active_params'])} active per token",
        f"weights          bf16 {_human_bytes(weights['bf16'])}, fp8 with block scales "
        f"{_human_bytes(weights['fp8'])} (checkpoint stored as {summary['stored_as']})",
        f"KV cache / token MLA latent {_human_bytes(kv['latent'])} vs per-head {_human_bytes(kv['per_head'])} "
        f"({kv['per_head'] / kv['latent']:.0f}x), bf16",
        f"141 GB GPUs      bf16 {summary['gpus_141gb']['bf16']}, fp8 {summary['gpus_141gb']['fp8']} "
        f"(weights + latent cache for {summary['batch']} x {summary['context']} tokens, 90% usable)",
    ]
    if engine_mtp is not None:
        lines += _engine_lines(summary["engine"])
    lines += _fit_lines(fit, str(quantize) if engine_mtp is None else None)
    typer.echo("\n".join(lines))


def _fit_lines(fit: dict, scheme: str | None) -> list[str]:
    """`info`'s verdict on this machine: memory (weights + latent cache + runtime) and disk (what a build writes)."""
    from moetrt.export.info import RUNTIME_OVERHEAD

    what = f"an {scheme} engine" if scheme and scheme != "none" else "a float32 engine" if scheme else "this engine"
    memory = (f"{'yes' if fit['fits_memory'] else 'NO'}: {_human_bytes(fit['weight_bytes'])} weights + "
              f"{_human_bytes(fit['kv_bytes'])} latent cache ({_human_bytes(fit['kv_bytes_per_token'])}/token x "
              f"{fit['context']} x {fit['batch']}) + runtime {_human_bytes(RUNTIME_OVERHEAD)} of "
              f"{_human_bytes(fit['memory_available'])} available")
    lines = [f"fits memory      {what}: {memory}"]
    if scheme is not None:  # an engine's lines give its own (with its layout's scale dtypes)
        lines.append(f"bytes / token    {_human_bytes(fit['bytes_read_per_token'])} of weights read per decode token "
                     "(batch 1)")
    if fit["disk_needed"]:
        lines.append(f"fits disk        {'yes' if fit['fits_disk'] else 'NO'}: a build writes about "
                     f"{_human_bytes(fit['disk_needed'])} (export + engine), {_human_bytes(fit['disk_free'])} free "
                     f"at {fit['where']}")
    return lines


def _mtp_note(declared: int, in_engine: int | None) -> str:
    """What `info` says of the multi-token-prediction layers config.json declares (none of the figures below count
    them): for an engine, whether it holds one (--mtp); for a checkpoint, that --mtp would load it."""
    if not declared:
        return ""
    if in_engine is None:
        return f"; config.json declares {declared} MTP layer (not counted below; `build-engine --mtp` loads it)"
    held = "the engine holds it" if in_engine else "not in the engine"
    return f"; {declared} MTP layer ({held}; not counted below)"


def _engine_summary(engine_dir: Path) -> dict:
    """What an engine directory adds to `info` (JSON-ready; `_engine_lines` prints it): backend, dtype, size on disk,
    the weights' scheme, bytes read per decode token at batch 1, shape limits, the MTP module, the backend's own."""
    import dataclasses

    from moetrt.runtime.backends import get_backend
    from moetrt.runtime.manifest import load_manifest

    from moetrt.export.info import decode_weight_bytes, quantization_summary

    manifest = load_manifest(engine_dir)
    profile = manifest.profile
    config = manifest.model_config
    qmoe = getattr(manifest.section, "moe_kernel", None) == "onnxruntime"  # QMoE keeps its scales in float32
    read = decode_weight_bytes(config, manifest.dtype, manifest.quantization, expert_scale_bytes=4 if qmoe else 2)
    return {
        "backend": manifest.backend, "dtype": manifest.dtype,
        "bytes_on_disk": sum(record.bytes for record in manifest.artifacts.values()),
        "quantization": dataclasses.asdict(manifest.quantization) if manifest.quantization else None,
        "weights": quantization_summary(manifest.quantization, manifest.dtype),
        "bytes_read_per_token": sum(read.values()), "bytes_read_per_token_parts": read,
        "routed_experts_read": f"{config.num_experts_per_tok} of {config.n_routed_experts}",
        "limits": {"max_batch": profile.max_batch, "max_seq": profile.seq, "max_context": profile.max_context},
        "mtp_module": bool(manifest.io.mtp_layers),
        # an engine cut into segments runs none of the module's on plain steps; one graph runs them on empty tensors
        "mtp_module_skipped_on_plain_steps": bool(getattr(manifest.section, "draft_segments", 0)),
        "backend_details": list(get_backend(manifest.backend).describe(manifest)),
    }


def _engine_lines(engine: dict) -> list[str]:
    """`info`'s lines for an engine, from `_engine_summary`."""
    read, limits = engine["bytes_read_per_token_parts"], engine["limits"]
    return [
        f"engine           {engine['backend']}, {engine['dtype']}, {_human_bytes(engine['bytes_on_disk'])} on disk",
        f"engine weights   {engine['weights']}",
        f"bytes / token    {_human_bytes(engine['bytes_read_per_token'])} of weights read per decode token at batch 1 "
        f"(dense {_human_bytes(read['dense'])}, routed experts {engine['routed_experts_read']} "
        f"{_human_bytes(read['routed_experts'])}, embedding row {_human_bytes(read['embedding_row'])})",
        f"limits           batch {limits['max_batch']}, {limits['max_seq']} tokens per call, "
        f"{limits['max_context']} cached positions per sequence",
        "MTP module       " + (("yes: `--speculative mtp` drafts with it (plain decoding skips its segments)"
                               if engine["mtp_module_skipped_on_plain_steps"] else
                               "yes: `--speculative mtp` drafts with it (plain decoding runs its nodes on empty "
                               "tensors)") if engine["mtp_module"] else "no (build with --mtp to decode speculatively)"),
        *engine["backend_details"],
    ]


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint directory (safetensors)."),
    output: Path = typer.Option(..., "--output", "-o", help="Export directory to write."),
    target: Target = typer.Option("ort", help="Lowering of the routed experts: trt (plugin), ort, onnx (portable)."),
    dtype: Dtype = typer.Option("float32", help="Precision of the export."),
    moe_kernel: MoeKernel = typer.Option("auto", help=MOE_KERNEL_HELP),
    quantize: Quantize = typer.Option("none", help=QUANTIZE_HELP),
    group_size: Optional[int] = typer.Option(None, help=GROUP_SIZE_HELP),
    mtp: bool = _MTP,
    check_trt: bool = typer.Option(False, "--check-trt", help="Report what TensorRT's parser would refuse "
                                   "(no GPU needed); exit 1 if anything."),
) -> None:
    """Trace a checkpoint to ONNX with the latent KV cache and one routed-experts node per MoE layer."""
    from moetrt.export.onnx_export import export_onnx

    from moetrt.settings import OrtOptions

    from moetrt.quantization import scheme_for

    scheme = scheme_for(quantize, _group_size(quantize, group_size))
    if mtp and target != "ort":
        raise MoetrtError(f"--mtp exports are built for ONNX Runtime only so far; export with --target ort, not {target}")
    out = export_onnx(checkpoint, output, target=target, dtype=dtype, ort=OrtOptions(moe_kernel=moe_kernel),
                      quantize=scheme, mtp=mtp)
    typer.echo(f"exported {checkpoint} -> {out} (target {target}, {dtype})")
    if check_trt:
        from moetrt.export.trt.check import check_trt_export

        report = check_trt_export(out)
        typer.echo(report.format())
        if not report.ok:
            raise typer.Exit(1)


@app.command("eval")
def eval_(
    source: Path = typer.Argument(..., help="Checkpoint directory (fp32 torch reference) or engine directory."),
    task: Task = typer.Option("arithmetic", help="Task whose held-out problems to solve."),
    n: int = typer.Option(500, "--num-problems", help="Held-out problems to draw (never trained on)."),
    seed: int = typer.Option(0, help="Seed that draws the problems."),
    batch_size: int = typer.Option(64, help="Prompts decoded together."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, with per-problem details."),
    speculative: Optional[Speculative] = _SPECULATIVE,
    draft_tokens: Optional[int] = _DRAFT_TOKENS,
    expert_parallel: bool = _EP,
    expert_placement: Optional[Path] = _EP_PLACEMENT,
    ep_combine: EpCombine = _EP_COMBINE,
    ep_timeout: float = _EP_TIMEOUT,
    record_routing: Optional[Path] = _RECORD_ROUTING,
) -> None:
    """Greedy accuracy on held-out problems: accuracy, answers parsed, average thinking length."""
    from moetrt.tasks.evaluate import format_report

    # Before torch loads: spinning OpenMP threads slow decoding many times over when the cores are shared.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if (source / "manifest.json").is_file():
        from moetrt.runtime.evaluate import evaluate_engine

        parallel = _expert_parallel(source, expert_parallel, expert_placement, ep_combine, ep_timeout,
                                    record_routing, None)
        _check_draft_tokens(speculative, draft_tokens)
        report = evaluate_engine(source, task, n=n, seed=seed, batch_size=batch_size, expert_parallel=parallel,
                                 speculative=speculative)
    else:
        from moetrt.export.reference_session import evaluate_checkpoint

        if expert_parallel:
            raise MoetrtError("--expert-parallel runs engines; build one from the checkpoint first")
        if speculative:
            raise MoetrtError("--speculative runs engines; build one with --mtp from the checkpoint first")
        report = evaluate_checkpoint(source, task, n=n, seed=seed, batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps({"source": str(source), **report.to_dict()}, indent=2))
        return
    typer.echo(format_report(report, str(source)))


@app.command("build-engine")
def build_engine_command(
    source: Path = typer.Argument(..., help="Checkpoint directory (exported first) or export directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Engine directory to write."),
    backend: Literal[BACKEND_CHOICES] = typer.Option(BuildConfig.backend,
                                                     help="auto: TensorRT with a GPU, else ONNX Runtime."),
    dtype: Optional[Dtype] = typer.Option(None, help="Precision of the engine (default float32, or the export's)."),
    max_batch: Optional[int] = typer.Option(None, help=f"Largest batch the engine serves (default {BuildProfile.max_batch})."),
    max_seq: Optional[int] = typer.Option(None, help=f"Most tokens per call, the prefill chunk (default "
                                          f"{DEFAULT_MAX_SEQ}, at most the context)."),
    max_context: Optional[int] = typer.Option(None, help="Most cached positions per sequence (default: the model's "
                                              "context, max_position_embeddings or YaRN's, cut where the latent "
                                              "cache of --max-batch sequences would pass "
                                              f"{DEFAULT_LATENT_CACHE_BYTES >> 30} GiB)."),
    allow_long_context: bool = typer.Option(False, "--allow-long-context", help="Build a --max-context beyond the "
                                            "positions the model supports."),
    portable: bool = typer.Option(False, help="TensorRT: build from the standard-ops lowering (no plugin)."),
    trt_plugin: Literal[TRT_PLUGIN_CHOICES] = typer.Option(TrtOptions.plugin, help="TensorRT routed-experts "
                                                           "plugin: aot (no Python at run time) or jit."),
    moe_kernel: MoeKernel = typer.Option(OrtOptions.moe_kernel, help=MOE_KERNEL_HELP),
    quantize: Quantize = typer.Option(BuildConfig.quantize, help=QUANTIZE_HELP),
    group_size: Optional[int] = typer.Option(None, help=GROUP_SIZE_HELP),
    mtp: bool = _MTP,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check a TensorRT build without building (no GPU "
                                 "needed): what the parser would refuse, the profiles; exit 1 if refused."),
) -> None:
    """Build a self-describing engine directory (manifest.json, graph, tokenizer files)."""
    import time

    from moetrt.export.engine import build_engine

    limits = {"max_batch": max_batch, "max_seq": max_seq, "max_context": max_context}
    config = BuildConfig(backend=backend, dtype=dtype, allow_long_context=allow_long_context, quantize=quantize,
                         group_size=_group_size(quantize, group_size), mtp=mtp,
                         profile=BuildProfile(**{k: v for k, v in limits.items() if v is not None}),
                         ort=OrtOptions(moe_kernel=moe_kernel), trt=TrtOptions(plugin=trt_plugin, portable=portable))
    if dry_run:
        _dry_run_trt(source, config)
        return
    start = time.perf_counter()
    engine = build_engine(source, output, config)
    typer.echo(f"built {engine} in {time.perf_counter() - start:.1f}s")


def _group_size(quantize: str, group_size: int | None) -> int:
    """--group-size as given, or the default; MoetrtError when it is given without a quantization to apply it to."""
    if group_size is not None and quantize == "none":
        raise MoetrtError(f"--group-size {group_size} sizes the blocks of quantized weights: add --quantize int8 or "
                          "--quantize int4, or leave --group-size out")
    return DEFAULT_GROUP_SIZE if group_size is None else group_size


def _dry_run_trt(source: Path, config: BuildConfig) -> None:
    from moetrt.export.trt.plan import dry_run_trt

    if config.backend == "ort":
        raise MoetrtError("--dry-run checks a TensorRT build; use it with --backend trt or auto")
    plan, report = dry_run_trt(source, config)
    typer.echo(plan.describe())
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(1)


VERIFY_HELP = (
    "Check an engine: its manifest (and hashes), and with a checkpoint its fidelity to the torch reference: mean "
    "and p99 KL divergence of the next-token distributions, top-1 agreement and the perplexity ratio (as "
    "llama.cpp's llama-perplexity --kl-divergence), max |Δlogit|, greedy continuations, task accuracy. An "
    "unquantized engine must match logits (a float16 or bfloat16 one, position by position, to its dtype's tolerance "
    "plus twice what the reference computed in its dtype moves, when that reference fits in memory), greedy tokens "
    "and task answers; a quantized one passes on KL: "
    f"{thresholds_help()}."
)


@app.command(help=VERIFY_HELP)
def verify(
    engine: Path = typer.Argument(..., help="Engine directory."),
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint to compare against (fidelity check)."),
    integrity: bool = typer.Option(False, "--integrity", help="Hash every artifact against the manifest."),
    prompts: int = typer.Option(8, help="Prompts for the fidelity check."),
    task_problems: int = typer.Option(200, help="Held-out problems for the task accuracy of a checkpoint "
                                      "trained on a moetrt task (config.json moetrt_task); 0 skips it."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    stream_reference: Optional[bool] = typer.Option(
        None, "--stream-reference/--whole-reference", help="Run the float32 torch reference layer by layer from the "
        "checkpoint's memory-mapped shards (memory about one layer; slower), or load it whole. Default: streamed "
        "when its float32 weights exceed half the memory available."),
    expert_parallel: bool = _EP,
    expert_placement: Optional[Path] = _EP_PLACEMENT,
    ep_combine: EpCombine = _EP_COMBINE,
    ep_timeout: float = _EP_TIMEOUT,
    record_routing: Optional[Path] = _RECORD_ROUTING,
) -> None:
    """Check an engine: its manifest (and hashes), and with a checkpoint its fidelity to the torch reference."""
    from moetrt.runtime.manifest import load_manifest

    parallel = _expert_parallel(engine, expert_parallel, expert_placement, ep_combine, ep_timeout, record_routing,
                                None)

    if checkpoint is None and stream_reference is not None:
        raise MoetrtError("--stream-reference and --whole-reference choose how the reference checkpoint runs: give "
                          "the checkpoint (`moetrt verify ENGINE CHECKPOINT ...`), or drop the flag")
    manifest = load_manifest(engine, integrity=integrity)
    checks = {"manifest": "ok", "integrity": "ok" if integrity else "not checked"}
    if checkpoint is None:
        typer.echo(json.dumps(checks) if as_json else "\n".join(f"{k}: {v}" for k, v in checks.items()))
        return
    from moetrt.export.verify import verify_engine

    report = verify_engine(manifest.directory, checkpoint, prompts=prompts, task_problems=task_problems,
                           expert_parallel=parallel, stream_reference=stream_reference)
    typer.echo(json.dumps({**checks, **report.to_dict()}, indent=2) if as_json else report.describe())
    if not report.passed:
        raise typer.Exit(1)


def _sampling_overrides(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy, stop,
                        max_reasoning_tokens, stop_in_reasoning=False) -> dict:
    return {
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "repetition_penalty": repetition_penalty, "seed": seed, "greedy": greedy or None,
        "stop": tuple(stop) or None, "stop_in_reasoning": stop_in_reasoning or None,
        "max_reasoning_tokens": max_reasoning_tokens,
    }


_MAX_NEW = typer.Option(None, "--max-new-tokens", "-n", help="Most tokens to generate (default: "
                        f"generation_config.json's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}).")
_TEMPERATURE = typer.Option(None, help="Sampling temperature (default: generation_config.json; 0 = greedy).")
_TOP_K = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 or -1 = off).")
_TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling mass in [0, 1] (0 = the most likely token only).")
_PENALTY = typer.Option(None, "--repetition-penalty", help="Penalty > 1 discourages repeating tokens.")
_SEED = typer.Option(None, help="Seed that makes sampling reproducible (-1 = a random seed).")
_GREEDY = typer.Option(False, "--greedy", help="Greedy decoding, whatever generation_config.json says.")
_STOP = typer.Option([], "--stop", help="Stop string (repeatable); it ends the answer, not the thinking.")
_STOP_IN_REASONING = typer.Option(False, "--stop-in-reasoning", help="Let stop strings end the thinking too.")
_THINK_BUDGET = typer.Option(None, "--max-reasoning-tokens", help="Close the thinking after this many tokens.")


def _check_draft_tokens(speculative: str | None, draft_tokens: int | None) -> int:
    """--draft-tokens goes with --speculative, and is 1 for now (GenerationOptions says why); returns it."""
    if draft_tokens is not None and not speculative:
        raise MoetrtError("--draft-tokens needs --speculative mtp")
    if draft_tokens is not None and draft_tokens < 1:
        raise MoetrtError(f"--draft-tokens must be at least 1, got {draft_tokens}")
    draft_tokens = 1 if draft_tokens is None else draft_tokens
    GenerationOptions(speculative=speculative, draft_tokens=draft_tokens)  # refuses what is not supported yet
    return draft_tokens


def _speculation(engine, speculative: str | None, draft_tokens: int | None) -> dict:
    """The generation options for --speculative/--draft-tokens, checked against the engine at once (an engine
    built without --mtp cannot draft)."""
    draft_tokens = _check_draft_tokens(speculative, draft_tokens)
    if not speculative:
        return {}
    from moetrt.runtime.speculative import check_session

    check_session(engine.session)
    return {"speculative": speculative, "draft_tokens": draft_tokens}


def _print_stream(events, console) -> tuple[str, str, str | None]:
    """Print reasoning dimmed and the answer plain as they stream; returns (reasoning, answer, finish)."""
    reasoning, answer, finish, shown_reasoning = [], [], None, False
    for event in events:
        if event.reasoning:
            if not shown_reasoning:
                console.print("[dim]Thinking…[/dim]")
                shown_reasoning = True
            console.print(event.reasoning, style="dim", end="", soft_wrap=True, markup=False, highlight=False)
            reasoning.append(event.reasoning)
        if event.text:
            if shown_reasoning and not answer:
                console.print()
                console.print()
            console.print(event.text, end="", soft_wrap=True, markup=False, highlight=False)
            answer.append(event.text)
        finish = event.finish_reason or finish
    console.print()
    return "".join(reasoning), "".join(answer), finish


@app.command()
def generate(
    engine: Path = typer.Argument(..., help="Engine directory."),
    prompt: str = typer.Argument(..., help="The user's message (or the raw prompt with --raw)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    system: Optional[str] = typer.Option(None, help="A system message (chat template only)."),
    max_new_tokens: Optional[int] = _MAX_NEW,
    temperature: Optional[float] = _TEMPERATURE,
    top_k: Optional[int] = _TOP_K,
    top_p: Optional[float] = _TOP_P,
    repetition_penalty: Optional[float] = _PENALTY,
    seed: Optional[int] = _SEED,
    greedy: bool = _GREEDY,
    stop: list[str] = _STOP,
    stop_in_reasoning: bool = _STOP_IN_REASONING,
    max_reasoning_tokens: Optional[int] = _THINK_BUDGET,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, reasoning, tokens, usage)."),
    speculative: Optional[Speculative] = _SPECULATIVE,
    draft_tokens: Optional[int] = _DRAFT_TOKENS,
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    expert_parallel: bool = _EP,
    expert_placement: Optional[Path] = _EP_PLACEMENT,
    ep_combine: EpCombine = _EP_COMBINE,
    ep_timeout: float = _EP_TIMEOUT,
    record_routing: Optional[Path] = _RECORD_ROUTING,
) -> None:
    """Generate a reply: R1's thinking shown dimmed, then the answer."""
    from moetrt.runtime.engine import Engine

    parallel = _expert_parallel(engine, expert_parallel, expert_placement, ep_combine, ep_timeout, record_routing,
                                threads)
    loaded = Engine.load(engine, threads=threads, expert_parallel=parallel)
    options = _sampling_overrides(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy, stop,
                                  max_reasoning_tokens, stop_in_reasoning)
    options.update(_speculation(loaded, speculative, draft_tokens))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if as_json:
        result = loaded.generate(prompt, **options) if raw else loaded.chat(messages, **options)
        typer.echo(json.dumps({
            "text": result.text, "reasoning": result.reasoning, "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            **_draft_counts(loaded, speculative),
        }, ensure_ascii=parallel is not None))  # MPICH's gforker forwards ASCII only (docs/expert-parallel.md)
        return
    from rich.console import Console

    events = loaded.stream(prompt, **options) if raw else loaded.chat_stream(messages, **options)
    _print_stream(events, Console(highlight=False))


def _draft_counts(loaded, speculative) -> dict:
    """`generate --json`'s drafts verified and accepted with --speculative (the engine's DraftHistory totals)."""
    if not speculative:
        return {}
    from moetrt.runtime.speculative import history_for

    history = history_for(loaded.session)
    return {"drafts_verified": history.proposed, "drafts_accepted": history.accepted}


@app.command()
def chat(
    engine: Path = typer.Argument(..., help="Engine directory."),
    system: Optional[str] = typer.Option(None, help="A system message."),
    max_new_tokens: Optional[int] = _MAX_NEW,
    temperature: Optional[float] = _TEMPERATURE,
    top_k: Optional[int] = _TOP_K,
    top_p: Optional[float] = _TOP_P,
    repetition_penalty: Optional[float] = _PENALTY,
    seed: Optional[int] = _SEED,
    greedy: bool = _GREEDY,
    max_reasoning_tokens: Optional[int] = _THINK_BUDGET,
    speculative: Optional[Speculative] = _SPECULATIVE,
    draft_tokens: Optional[int] = _DRAFT_TOKENS,
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    expert_parallel: bool = _EP,
    expert_placement: Optional[Path] = _EP_PLACEMENT,
    ep_combine: EpCombine = _EP_COMBINE,
    ep_timeout: float = _EP_TIMEOUT,
    record_routing: Optional[Path] = _RECORD_ROUTING,
) -> None:
    """Interactive chat (streaming; thinking dimmed). /reset starts over, /exit or Ctrl-D quits."""
    from rich.console import Console

    from moetrt.runtime.engine import Engine
    from moetrt.runtime.requests import check_text

    parallel = _expert_parallel(engine, expert_parallel, expert_placement, ep_combine, ep_timeout, record_routing,
                                threads)
    loaded = Engine.load(engine, threads=threads, expert_parallel=parallel)
    options = _sampling_overrides(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy, (),
                                  max_reasoning_tokens)
    options.update(_speculation(loaded, speculative, draft_tokens))
    loaded.options(**options)  # out-of-range options (-n 0) are refused at once, not at each line
    console = Console(highlight=False)
    messages = [{"role": "system", "content": system}] if system else []
    if system:  # refused at once, not at each line
        check_text(system, "the --system message", param="messages")
    console.print(f"[bold]moetrt chat[/bold] — {engine} ({loaded.manifest.backend}). /reset, /exit", soft_wrap=True)
    while True:
        try:
            line = console.input("[bold green]you>[/bold green] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        except UnicodeDecodeError as error:  # a strict UTF-8 stdin and a line in another encoding
            console.print(f"[red]error:[/red] that line is not valid UTF-8 ({error.reason}); type UTF-8 text")
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            _, answer, _ = _print_stream(loaded.chat_stream(messages, **options), console)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat (as llama.cpp's interactive mode)
            console.print("\n[dim](stopped; this exchange is not kept)[/dim]")
            messages.pop()
            continue
        except MoetrtError as error:  # e.g. the conversation outgrew the context: say so and go on
            console.print(f"[red]error:[/red] {error}", soft_wrap=True)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


@app.command()
def serve(
    engine: Path = typer.Argument(..., help="Engine directory."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network; "
                             "without --api-key that logs a warning)."),
    port: int = typer.Option(8000, help="TCP port (0: any free one, logged)."),
    api_key: Optional[str] = typer.Option(None, envvar="MOETRT_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1 routes."),
    served_model_name: Optional[str] = typer.Option(None, help="The model's id in the API (default: the engine "
                                                    "directory's name)."),
    max_batch: Optional[int] = typer.Option(None, help="Most requests decoded together (default: the engine's)."),
    max_queue: int = typer.Option(SERVER_LIMITS.max_queue, help="Most requests waiting for a slot; beyond "
                                  "that, 429 with Retry-After."),
    max_body_bytes: int = typer.Option(SERVER_LIMITS.max_body_bytes, help="Largest request body accepted; "
                                       "beyond that, 413."),
    max_connections: int = typer.Option(SERVER_LIMITS.max_connections, help="Open connections beyond which a "
                                        "new request gets 503."),
    header_timeout: float = typer.Option(SERVER_LIMITS.header_timeout, help="Seconds a connection has to send "
                                         "a whole request head; then it is closed."),
    body_timeout: float = typer.Option(SERVER_LIMITS.body_timeout, help="Seconds a client has to send the "
                                       "whole request body; then 408."),
    shutdown_timeout: float = typer.Option(SERVER_LIMITS.shutdown_timeout, help="On SIGTERM/SIGINT, seconds "
                                           "running requests get to finish before they end with an error."),
    sse_keepalive: float = typer.Option(SERVER_LIMITS.sse_keepalive, help="Seconds without tokens after which "
                                        "a stream gets a `: keep-alive` comment (while queued, say)."),
    max_prefill_tokens: Optional[int] = typer.Option(SERVER_LIMITS.max_prefill_tokens, help="Prompt tokens "
                                                     "prefilled per decode step while requests run (chunked "
                                                     "prefill; default: the scheduler's, measured on tiny-r1 on a "
                                                     "CPU: raise it for large models on GPUs); 0 prefills whole "
                                                     "prompts before the step."),
    log_level: Literal[SERVER_LOG_LEVELS] = typer.Option("info", help="Access lines are info; health checks "
                                                         "and metrics scrapes debug."),
    speculative: Optional[Speculative] = _SPECULATIVE,
    draft_tokens: Optional[int] = _DRAFT_TOKENS,
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    expert_parallel: bool = _EP,
    expert_placement: Optional[Path] = _EP_PLACEMENT,
    ep_combine: EpCombine = _EP_COMBINE,
    ep_timeout: float = _EP_TIMEOUT,
    record_routing: Optional[Path] = _RECORD_ROUTING,
) -> None:
    """OpenAI-compatible HTTP server with continuous batching (/v1/chat/completions, /v1/completions)."""
    from moetrt.runtime.server.limits import ServerLimits

    _check_draft_tokens(speculative, draft_tokens)
    parallel = _expert_parallel(engine, expert_parallel, expert_placement, ep_combine, ep_timeout, record_routing,
                                threads)

    limits = ServerLimits(max_queue=max_queue, max_body_bytes=max_body_bytes, max_connections=max_connections,
                          header_timeout=header_timeout, body_timeout=body_timeout,
                          shutdown_timeout=shutdown_timeout, sse_keepalive=sse_keepalive,
                          max_prefill_tokens=max_prefill_tokens)
    try:
        from moetrt.runtime.server import serve as run_server
    except ImportError as error:
        raise MoetrtError(f"moetrt serve needs the serve extra ({error}): pip install 'moetrt[serve]'") from None
    run_server(engine, host=host, port=port, api_key=api_key, max_batch=max_batch, threads=threads,
               model_name=served_model_name, limits=limits, log_level=log_level, expert_parallel=parallel,
               speculative=speculative)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Benchmarks against transformers and the memory-bandwidth roofline (options: --models, --repeats,
    --new-tokens, --prefill-len, --threads, --out; see `moetrt bench --help-bench`). `moetrt bench serve ...`:
    the serving benchmark through `moetrt serve` (TTFT, inter-token latency; `moetrt bench serve --help-bench`).
    `moetrt bench speculative ...`: decode with and without MTP drafting (acceptance rate, tok/s, break-even)."""
    args = ["--help" if arg == "--help-bench" else arg for arg in ctx.args]
    if args[:1] == ["serve"]:
        from moetrt.bench.serve import main as run_serve_bench

        run_serve_bench(args[1:])
        return
    if args[:1] == ["speculative"]:
        from moetrt.bench.speculative import main as run_speculative_bench

        run_speculative_bench(args[1:])
        return
    from moetrt.bench.run import main as run_bench

    run_bench(["--help"] if "--help" in args else args)


def main() -> None:
    """Console-script entry point: one-line errors for user mistakes (a missing optional dependency among them,
    named with its extra), click's plain usage errors (exit 2), tracebacks for bugs."""
    global _verbose
    _verbose = os.environ.get("MOETRT_VERBOSE", "") not in ("", "0")
    try:
        status = app(standalone_mode=False)
    except typer.TyperException as error:  # click's plain usage errors, not typer's panel hard-wrapped in a box
        error.show() if hasattr(error, "show") else typer.echo(f"Error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except MoetrtError as error:
        if _verbose:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    except ModuleNotFoundError as error:
        extra = EXTRA_FOR_MODULE.get((error.name or "").split(".")[0])
        if extra is None or _verbose:
            raise
        typer.echo(f"error: moetrt {progress.command} needs {error.name}, which the {extra} extra installs: "
                   f"pip install 'moetrt[{extra}]'", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
