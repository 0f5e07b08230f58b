"""The driver-API launcher packs exactly the parameters an AOT stage lists (checked without a GPU)."""

import ctypes

from moetrt.plugins.aot_kernels import aot_launch
from moetrt.plugins.cuda_driver import CudaDriver
from moetrt.plugins.moe_launch import ExpertsShape


class RecordingLibcuda:
    """Stands in for libcuda's cuLaunchKernel only, decoding the kernelParams array it is handed."""

    def __init__(self, stage):
        self.stage, self.launches = stage, []

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        values = []
        for index, param in enumerate(self.stage.params):
            holder = ctypes.c_int32 if param.kind == "scalar" else ctypes.c_uint64
            values.append(holder.from_address(params[index]).value)
        self.launches.append(((gx, gy, gz), (bx, by, bz), shared, stream.value, values, extra))
        return 0


def test_launch_passes_buffers_scalars_and_null_scratch_pointers_in_order():
    stage = aot_launch(ExpertsShape(9, 40, 24, 4, 2, "float32", "float32")).stages[1]  # gate_up
    driver = object.__new__(CudaDriver)  # no libcuda here: only the packing is under test
    driver.lib = RecordingLibcuda(stage)
    pointers = {param.name: 0x7000_0000_0000 + 256 * index for index, param in enumerate(stage.params)}
    driver.launch(stage, ctypes.c_void_p(1), pointers, stream=0x1234)
    grid, block, shared, stream, values, extra = driver.lib.launches[0]
    assert (grid, block, shared) == (stage.grid, (stage.block_threads, 1, 1), stage.shared_mem)
    assert (stream, extra) == (0x1234, None)
    want = [param.value if param.kind == "scalar" else 0 if param.kind == "hidden" else pointers[param.name]
            for param in stage.params]
    assert values == want
    assert values[5] == 9 * 2  # num_slots, the one int32 extra arg of gate_up
