"""Compile every CUDA kernel of `quant/cuda` to PTX, for every weight type and KV cache type,
with the argument types the backend launches them with: typing errors show here, without a GPU
(the simulator runs kernels as Python and checks no types), and so does float64 arithmetic that
crept in (a Python float constant in a float32 loop), which fails the kernel too. Needs libnvvm (CUDA's toolkit, e.g.
CUDA_HOME=/usr/local/cuda-13.0) and NVRTC (`pip install nvidia-cuda-nvrtc`), not a device.

Usage: NUMBA_ENABLE_CUDASIM=0 python scripts/compile_cuda_kernels.py [--cc 8.0]
"""

from __future__ import annotations

import argparse
import sys

from numba import cuda, types

from llmx.quant.cuda import attention, elementwise, linear
from llmx.quant.cuda.decode import VALUE

F32, I64 = types.float32, types.int64


def array(dtype, ndim: int):
    return types.Array(dtype, ndim, "C")


def signatures():
    """(name, python function, argument types) of every kernel the backend launches."""
    f1, f2, f3, f4 = (array(types.float32, d) for d in (1, 2, 3, 4))
    i64, u8 = array(types.int64, 1), array(types.uint8, 1)
    for qtype in VALUE:
        matmul_args = (u8, f2, f1, i64, f1)
        yield f"rows {qtype.name}", linear._rows_kernel(qtype), matmul_args
        yield f"tiles {qtype.name}", linear._tiles_kernel(qtype), matmul_args
        yield f"embed {qtype.name}", elementwise._embed_kernel(qtype), (u8, i64, F32, f2)
    yield "rms_norm", elementwise._rms_norm_kernel, (f2, f1, F32, f2)
    yield "add_rms_norm", elementwise._add_rms_norm_kernel, (f2, f2, f1, f1, F32, f2, f2)
    yield "norm_rope", elementwise._norm_rope_kernel, (f3, f3, f1, f1, f2, f2, types.boolean, F32, F32, f3, f3)
    yield "gate", elementwise._gate_kernel, (f1, f1, types.boolean, f1)
    yield "rows gather", elementwise._rows_kernel, (f2, i64, f2)
    yield "write f16", elementwise._write_f16_kernel, (array(types.uint16, 2), array(types.uint16, 2), i64, f2, f2)
    yield "write q8_0", elementwise._write_q8_0_kernel, (array(types.uint8, 3), i64, f3)
    pools = {"f16": array(types.uint16, 3), "q8_0": array(types.uint8, 3)}
    for k_type, k_pool in pools.items():
        for v_type, v_pool in pools.items():
            yield f"attention {k_type}/{v_type}", attention._kernel(k_type, v_type), (
                f3, k_pool, v_pool, array(types.int32, 2), i64, i64, I64, I64, I64, F32, I64, f3, f3, f3, f4)
    yield "attention combine", attention._combine, (f3, f3, f4, f3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cc", default="8.0", help="compute capability to compile for")
    cc = tuple(int(v) for v in parser.parse_args().cc.split("."))
    # Device functions compile for the current device's capability, which asks the driver; here
    # there need not be one: they get `cc` too.
    from types import SimpleNamespace

    from numba.cuda import dispatcher

    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    failed = 0
    for name, kernel, args in signatures():
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, args, cc=cc)
        except Exception as error:  # every kernel's verdict, then the count
            failed += 1
            print(f"FAILED  {name}: {str(error).splitlines()[0]}")
            continue
        doubles = ptx.count(".f64")
        failed += doubles > 0
        print(f"FAILED  {name}: {doubles} float64 instructions" if doubles else f"ok      {name}")
    print(f"{failed} of the kernels failed to compile" if failed else "every kernel compiles")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
