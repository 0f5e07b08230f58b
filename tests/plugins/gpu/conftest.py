"""The GPU tests' shared state: exact fp32 matmuls, and the CUDA driver that launches PTX as TensorRT would."""

import pytest
import torch

from moetrt.plugins.aot_kernels import ptx_version_for_driver
from moetrt.plugins.cuda_driver import CudaDriver


@pytest.fixture(scope="session", autouse=True)
def exact_fp32_matmuls():
    """The fp32 reference must not use TF32 either."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="session")
def driver() -> CudaDriver:
    return CudaDriver()


@pytest.fixture(scope="session")
def ptx_version(driver: CudaDriver) -> int:
    """The PTX ISA both Triton's ptxas and this machine's driver accept (the driver JIT-compiles the PTX)."""
    return ptx_version_for_driver(driver.driver_version())


@pytest.fixture(scope="session")
def arch() -> int:
    """This GPU's sm version, e.g. 90."""
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor
