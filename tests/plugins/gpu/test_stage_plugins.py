"""The TensorRT stage plugins without TensorRT: each stage node as an engine runs it, chained from poisoned buffers
sized by the plugin's shape formulas, at several T from one compilation, against the reference. In the JIT form
(the Triton launch @trtp.impl makes) and the AOT form (the one PTX @trtp.aot_impl hands TensorRT, launched with the
grid and int32 extra arguments it declares)."""

import pytest
import torch

from moetrt.plugins.aot_kernels import engine_stage, launch_at
from moetrt.plugins.moe_configs import select_config
from moetrt.plugins.moe_inputs import random_problem, relative_error
from moetrt.plugins.moe_launch import ExpertsShape
from moetrt.plugins.routed_experts import routed_experts_reference
from moetrt.plugins.spec import MOE_STAGES
from moetrt.plugins.trt_stages import StageAttribute
from tests.plugins.gpu import ON_GPU, tolerance
from tests.plugins.poisoned_runs import run_stage_nodes

pytestmark = ON_GPU

CASES = [(1000, 520, 64, 6, "bfloat16"), (200, 136, 8, 2, "float32")]  # (H, I, E, k, dtype)
TOKENS = (1, 5, 64, 300)  # T values one compiled engine's kernels serve


@pytest.fixture(scope="module", params=CASES, ids=["H{}-I{}-E{}-k{}-{}".format(*case) for case in CASES])
def engine_kernels(request, arch, ptx_version):
    """A case's stage attribute (block sizes picked at T=512, as the `trt` lowering does), each stage's PTX compiled
    once for this GPU, and the loaded CUfunctions by stage (filled on first launch)."""
    hidden, inter, experts, top_k, dtype = request.param
    shape = ExpertsShape(512, hidden, inter, experts, top_k, dtype, dtype)
    attribute = StageAttribute(shape.dims, dtype, select_config(shape))
    compiled = {stage: engine_stage(stage, attribute, arch, ptx_version) for stage in MOE_STAGES}
    return attribute, compiled, {}


def aot_launcher(driver, compiled, functions):
    def launch(stage, tensors, geometry):
        if stage not in functions:
            functions[stage] = driver.load(compiled[stage])
        at_t = launch_at(compiled[stage], tuple(geometry.grid), tuple(geometry.scalars))
        pointers = {name: tensor.data_ptr() for name, tensor in tensors.items()}
        driver.launch(at_t, functions[stage], pointers, torch.cuda.current_stream().cuda_stream)

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
