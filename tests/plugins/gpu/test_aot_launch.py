"""The AOT PTX of every stage launched through the CUDA driver with exactly its parameter list, as a TensorRT AOT
plugin launches it, against the reference: with Triton's shared memory, capped at the portable 48 KiB, and at the
PTX ISA a TensorRT built for CUDA 12 takes (8.0 for sm_90a)."""

import pytest
import torch

from moetrt.plugins import triton_moe
from moetrt.plugins.aot_kernels import PORTABLE_SHARED_BYTES, aot_launch, ptx_version_for_driver
from moetrt.plugins.cuda_driver import run_stages
from moetrt.plugins.moe_inputs import poisoned, random_problem, relative_error
from moetrt.plugins.moe_launch import ExpertsShape
from moetrt.plugins.routed_experts import routed_experts_reference
from tests.plugins.gpu import ON_GPU, tolerance

pytestmark = ON_GPU

SHAPE = ExpertsShape(37, 200, 136, 8, 2, "float32", "float32")


@pytest.mark.parametrize("cap, tensorrt_cuda", [(None, None), (PORTABLE_SHARED_BYTES, None), (PORTABLE_SHARED_BYTES, 12)],
                         ids=["uncapped", "48KiB", "48KiB-cuda12-tensorrt"])
def test_driver_launched_ptx_matches_the_reference(driver, ptx_version, arch, cap, tensorrt_cuda):
    problem = random_problem(SHAPE, 99, "cuda")
    if tensorrt_cuda is not None:
        ptx_version = ptx_version_for_driver(driver.driver_version(), arch, tensorrt_cuda)
    aot = aot_launch(SHAPE, arch=arch, ptx_version=ptx_version, max_shared_bytes=cap)
    tensors = triton_moe.plan_tensors(aot.plan, problem, allocate=poisoned)
    pointers = {name: tensor.data_ptr() for name, tensor in tensors.items()}
    run_stages(driver, aot.stages, pointers, torch.cuda.current_stream().cuda_stream)
    error = relative_error(tensors["output"], routed_experts_reference(**problem))
    assert error <= tolerance(SHAPE), f"relative error {error:.2e}"
