"""Device helpers every CUDA kernel shares, in two versions chosen once at import: the real
device's (libdevice bit casts, warp shuffles) and the simulator's (`NUMBA_ENABLE_CUDASIM=1`, where
every thread is a Python thread, libdevice is only stubs and there are no shuffles). Kernels call
only these names, so one kernel source runs, and is tested, on both.

Launch sizes: kernels are written with grid-stride loops and reductions over whatever block size
they get, so their results do not depend on the launch; `launch(n_jobs)` picks a device-sized
grid, or a tiny one under the simulator (each simulated thread costs real Python time).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import config, cuda, float32, int32, uint8, uint32

SIMULATED = bool(config.ENABLE_CUDASIM)
WARP = 32
THREADS = 1 if SIMULATED else WARP  # threads per block for one row's or one head's work
MAX_BLOCKS = 2 if SIMULATED else 65535

# Scalar casts kernels write as f32(x), i32(x), ...: numba's types on a device; under the
# simulator numpy's and Python's, several times cheaper there than numba's own casts and the same
# values (no kernel relies on int32 wrapping: bit patterns go through f32_from_bits, which masks).
if SIMULATED:
    f32, i32, u32 = np.float32, int, int

    def u8(value):
        return int(value) & 0xFF
else:
    f32, i32, u32, u8 = float32, int32, uint32, uint8


def device_function(fn):
    """`cuda.jit(device=True)` on a device; under the simulator the plain Python function (the
    simulator's wrapper swaps modules on every call, which costs more than these functions do).
    For functions that use no `cuda.*` thread API (those stay `cuda.jit`: `block_sum`)."""
    return fn if SIMULATED else cuda.jit(device=True)(fn)


class Arena:
    """Device buffers for one forward pass, handed out again by the next (`reset`): a decode
    step asks for the same shapes every time, so in steady state it allocates nothing (a
    cuMemAlloc per operation would cost more than most of the kernels). Only the last forward's
    buffers are kept, so prompts of many lengths do not pile up memory. Nothing allocated here
    may outlive the forward: results leave through a copy to the host."""

    def __init__(self) -> None:
        self._free: dict[tuple, list] = {}  # (shape, dtype) -> buffers not in use
        self._used: list[tuple[tuple, object]] = []  # handed out since the last reset

    def empty(self, shape: tuple[int, ...], dtype=np.float32):
        key = (tuple(int(d) for d in shape), np.dtype(dtype).str)
        free = self._free.setdefault(key, [])
        buffer = free.pop() if free else cuda.device_array(key[0], dtype)
        self._used.append((key, buffer))
        return buffer

    def reset(self) -> None:
        """A forward starts: the buffers the last one used are free again; older ones are let go."""
        self._free = {}
        for key, buffer in self._used:
            self._free.setdefault(key, []).append(buffer)
        self._used = []


@functools.cache
def absent(ndim: int = 1, dtype=np.float32):
    """A zero-size device array standing for an optional argument a kernel leaves out (kernels
    test `.size`): one per rank and type, shared."""
    return cuda.device_array((0,) * ndim, dtype)


def empty(shape: tuple[int, ...], arena: Arena | None = None, dtype=np.float32):
    """An uninitialized device array, from `arena` when given."""
    return cuda.device_array(shape, dtype) if arena is None else arena.empty(shape, dtype)


def launch(n_jobs: int) -> tuple[int, int]:
    """(blocks, threads) for a kernel whose blocks stride over `n_jobs` independent jobs."""
    return max(1, min(n_jobs, MAX_BLOCKS)), THREADS


def launch_flat(n_items: int) -> tuple[int, int]:
    """(blocks, threads) for an elementwise kernel whose threads stride over `n_items`."""
    per_block = 4 if SIMULATED else 256
    return max(1, min(-(-n_items // per_block), MAX_BLOCKS)), per_block


if SIMULATED:
    def f32_from_bits(bits):
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def bits_from_f32(x):
        return int(np.float32(x).view(np.uint32))

    def rint(x):
        return f32(np.rint(np.float32(x)))

    @cuda.jit(device=True)
    def block_sum(value, scratch):
        """The sum of `value` over the block's threads, returned to all of them (`scratch`:
        float32 shared memory of at least blockDim.x). Shared memory, halving."""
        t, width = cuda.threadIdx.x, cuda.blockDim.x
        if width == 1:  # (the simulator's barriers cost more than the whole sum)
            return value
        cuda.syncthreads()
        scratch[t] = value
        cuda.syncthreads()
        step = 1
        while step < width:
            if t % (2 * step) == 0 and t + step < width:
                scratch[t] += scratch[t + step]
            step *= 2
            cuda.syncthreads()
        total = scratch[0]
        cuda.syncthreads()
        return total
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def f32_from_bits(bits):
        return libdevice.int_as_float(i32(bits))

    @cuda.jit(device=True, inline=True)
    def bits_from_f32(x):
        return u32(libdevice.float_as_int(f32(x)))

    @cuda.jit(device=True, inline=True)
    def rint(x):
        return libdevice.rintf(f32(x))

    @cuda.jit(device=True)
    def block_sum(value, scratch):
        """The sum of `value` over the block's threads, returned to all of them: warp shuffles,
        then the warps' sums through `scratch` (float32 shared memory, one slot per warp)."""
        for offset in (16, 8, 4, 2, 1):
            value += cuda.shfl_down_sync(0xFFFFFFFF, value, offset)
        warps = (cuda.blockDim.x + WARP - 1) // WARP
        if warps == 1:
            return cuda.shfl_sync(0xFFFFFFFF, value, 0)
        cuda.syncthreads()
        if cuda.threadIdx.x % WARP == 0:
            scratch[cuda.threadIdx.x // WARP] = value
        cuda.syncthreads()
        total = f32(0)
        for w in range(warps):
            total += scratch[w]
        cuda.syncthreads()
        return total


@device_function
def f16_value(lo, hi):
    """float32 of the IEEE half whose little-endian bytes are lo, hi."""
    h = i32(lo) | (i32(hi) << 8)
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:  # zero or subnormal: mantissa x 2^-24
        magnitude = f32(mantissa) * f32(5.9604644775390625e-08)
        return -magnitude if sign else magnitude
    if exponent == 31:
        return f32_from_bits(u32(sign) | u32(0x7F800000) | u32(mantissa << 13))
    return f32_from_bits(u32(sign) | u32((exponent + 112) << 23) | u32(mantissa << 13))


@device_function
def f16_bits(x):
    """The IEEE half bits (as an int) of float32 x, rounded to nearest even (numpy's astype)."""
    b = bits_from_f32(x)
    sign = (b >> 16) & 0x8000
    exponent = (b >> 23) & 0xFF
    mantissa = b & 0x7FFFFF
    if exponent == 0xFF:
        return sign | 0x7C00 | (0x200 if mantissa else 0)
    e = i32(exponent) - 112
    if e >= 31:
        return sign | 0x7C00
    if e <= 0:  # a subnormal half, or zero
        if e < -10:
            return sign
        mantissa |= 0x800000
        shift = 14 - e
        kept = mantissa >> shift
        rest = mantissa & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rest > half or (rest == half and (kept & 1)):
            kept += 1
        return sign | kept
    kept = (e << 10) | (mantissa >> 13)
    rest = mantissa & 0x1FFF
    if rest > 0x1000 or (rest == 0x1000 and (kept & 1)):
        kept += 1  # a carry into the exponent is right, up to infinity
    return sign | kept


@device_function
def gelu_tanh(x):
    inner = f32(0.7978845608028654) * (x + f32(0.044715) * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
    return f32(0.5) * x * (f32(1) + math.tanh(inner))


@device_function
def silu(x):
    return x / (f32(1) + math.exp(-x))
