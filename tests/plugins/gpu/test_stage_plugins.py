"""The TensorRT stage plugins without TensorRT: each stage node as an engine runs it, chained from poisoned buffers
sized by the plugin's shape formulas, at several T from one compilation per tactic, against the reference. In the
JIT form (the Triton launch @trtp.impl makes) and the AOT form (the one PTX @trtp.aot_impl hands TensorRT, launched
with the grid and int32 extra arguments it declares). Then each stage kernel alone on arbitrary alignment buffers,
as TensorRT's autotuner runs it: nothing outside the guarded buffers is touched (a stray access is CUDA error 700)."""

import pytest
import torch

from moetrt.plugins.aot_kernels import engine_stage, launch_at
from moetrt.plugins.moe_inputs import random_problem, relative_error
from moetrt.plugins.moe_launch import ExpertDims
from moetrt.plugins.routed_experts import routed_experts_reference
from moetrt.plugins.spec import MOE_STAGES
from moetrt.plugins.trt_stages import DECODE_TACTIC, GEMM_STAGES, PREFILL_TACTIC, StageAttribute
from tests.plugins.gpu import ON_GPU, tolerance
from tests.plugins.poisoned_runs import garbage_problems, run_stage_nodes

pytestmark = ON_GPU

CASES = [(1000, 520, 64, 6, "bfloat16"), (200, 136, 8, 2, "float32")]  # (H, I, E, k, dtype)
TOKENS = (1, 5, 64, 300)  # T values one compiled engine's kernels serve; 300 is past both cases' prefill switch


@pytest.fixture(scope="module", params=CASES, ids=["H{}-I{}-E{}-k{}-{}".format(*case) for case in CASES])
def engine_kernels(request, arch, ptx_version):
    """A case's stage attribute (as the `trt` lowering writes it), each stage's PTX compiled once per tactic for this
    GPU, and the loaded CUfunctions by (stage, tactic), filled on first launch."""
    hidden, inter, experts, top_k, dtype = request.param
    attribute = StageAttribute.select(ExpertDims(hidden, inter, experts, top_k), dtype)
    compiled = {(stage, tactic): engine_stage(stage, attribute, arch, ptx_version, tactic=tactic)
                for stage in MOE_STAGES
                for tactic in ((DECODE_TACTIC, PREFILL_TACTIC) if stage in GEMM_STAGES else (DECODE_TACTIC,))}
    return attribute, compiled, {}


def aot_launcher(driver, compiled, functions):
    def launch(stage, tensors, geometry, tactic):
        key = (stage, tactic if stage in GEMM_STAGES else DECODE_TACTIC)
        if key not in functions:
            functions[key] = driver.load(compiled[key])
        at_t = launch_at(compiled[key], tuple(geometry.grid), tuple(geometry.scalars))
        pointers = {name: tensor.data_ptr() for name, tensor in tensors.items()}
        driver.launch(at_t, functions[key], pointers, torch.cuda.current_stream().cuda_stream)

    return launch


@pytest.mark.parametrize("form", ["jit", "aot"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_stage_nodes_match_the_reference_at_every_token_count(engine_kernels, driver, tokens, form):
    attribute, compiled, functions = engine_kernels
    shape = attribute.shape(tokens)
    problem = random_problem(shape, 7 + tokens, "cuda", skew=3.0)
    launch = aot_launcher(driver, compiled, functions) if form == "aot" else None
    error = relative_error(run_stage_nodes(attribute, problem, launch), routed_experts_reference(**problem))
    assert error <= tolerance(shape), f"relative error {error:.2e}"
    other = {"gate_up": 3 - attribute.tactic_for(tokens)}  # two autotune choices may differ: tactics are 1 and 2
    error = relative_error(run_stage_nodes(attribute, problem, launch, other), routed_experts_reference(**problem))
    assert error <= tolerance(shape), f"gate_up on the other tactic: relative error {error:.2e}"


@pytest.mark.parametrize("form", ["jit", "aot"])
def test_stage_kernels_on_arbitrary_alignment_buffers_touch_nothing_outside_them(engine_kernels, driver, form):
    attribute, compiled, functions = engine_kernels
    launch = aot_launcher(driver, compiled, functions) if form == "aot" else None
    problems = garbage_problems(attribute, 37, seed=5, device="cuda", launch=launch)
    torch.cuda.synchronize()  # a stray access surfaces here as CUDA error 700 at the latest
    assert problems == []
