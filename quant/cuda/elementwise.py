"""The elementwise parts of a forward on the device: embedding rows, RMSNorm, rope, gating,
residual adds, row gathers, and the KV cache's writes (float16 or Q8_0 cells, as `KVCache` on
the CPU). Every kernel strides over its work, so any launch size gives the same result."""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from llmx.quant.cuda.decode import VALUE
from llmx.quant.cuda.device import block_sum, f16_bits, f32, gelu_tanh, i32, launch, launch_flat, rint, silu, u8
from llmx.quant.qtypes import QType, block_size, type_size


def _flat():
    return cuda.grid(1), cuda.gridsize(1)


@functools.cache
def _embed_kernel(qtype: QType):
    value, qk, bb = VALUE[qtype], block_size(qtype), type_size(qtype)

    @cuda.jit
    def kernel(raw, tokens, scale, out):
        n, width = out.shape
        row_bytes = (width // qk) * bb
        start, stride = _flat()
        for i in range(start, n * width, stride):
            t, e = i // width, i % width
            out[t, e] = value(raw, tokens[t] * row_bytes + (e // qk) * bb, e % qk) * scale

    return kernel


def embed(raw, qtype: QType, tokens, width: int, scale: float):
    """float32 [n, width]: rows `tokens` (device int64 [n]) of the table `raw`, times `scale`."""
    out = cuda.device_array((tokens.shape[0], width), np.float32)
    blocks, threads = launch_flat(out.size)
    _embed_kernel(qtype)[blocks, threads](raw, tokens, np.float32(scale), out)
    return out


@cuda.jit
def _rms_norm_kernel(x, weight, eps, out):
    scratch = cuda.shared.array(32, float32)
    rows, width = x.shape
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        acc = f32(0)
        for e in range(cuda.threadIdx.x, width, cuda.blockDim.x):
            acc += x[r, e] * x[r, e]
        scale = f32(1) / math.sqrt(block_sum(acc, scratch) / f32(width) + eps)
        for e in range(cuda.threadIdx.x, width, cuda.blockDim.x):
            out[r, e] = x[r, e] * scale * weight[e]


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis of device float32 x (any leading shape), times `weight`."""
    width = x.shape[len(x.shape) - 1]  # (the simulator's shapes take no negative index)
    rows = x.reshape(x.size // width, width)
    out = cuda.device_array(rows.shape, np.float32)
    blocks, threads = launch(rows.shape[0])
    _rms_norm_kernel[blocks, threads](rows, weight, np.float32(eps), out)
    return out.reshape(x.shape)


@cuda.jit
def _rope_kernel(x, cos, sin, neox, out):
    n, heads, dim = x.shape
    half = cos.shape[1]
    start, stride = _flat()
    for i in range(start, n * heads * dim, stride):
        t, h, d = i // (heads * dim), (i // dim) % heads, i % dim
        if d >= 2 * half:
            out[t, h, d] = x[t, h, d]
            continue
        # pair p of this dimension, and whether it is the pair's first or second member
        if neox:
            p, second = d % half, d >= half
            a, b = x[t, h, p], x[t, h, p + half]
        else:
            p, second = d // 2, d % 2 == 1
            a, b = x[t, h, 2 * p], x[t, h, 2 * p + 1]
        out[t, h, d] = a * sin[t, p] + b * cos[t, p] if second else a * cos[t, p] - b * sin[t, p]


def rope(x, cos, sin, layout: str):
    """x device float32 [n, heads, head_dim]; cos, sin device float32 [n, half]: the first 2 *
    half dims rotated (pairs (2i, 2i+1) for "normal", (i, i + half) for "neox"), the rest kept."""
    out = cuda.device_array(x.shape, np.float32)
    blocks, threads = launch_flat(x.size)
    _rope_kernel[blocks, threads](x, cos, sin, layout != "normal", out)
    return out


@cuda.jit
def _scale_kernel(x, factor, out):
    start, stride = _flat()
    for i in range(start, x.size, stride):
        out[i] = x[i] * factor


@cuda.jit
def _add_kernel(x, y, out):
    start, stride = _flat()
    for i in range(start, x.size, stride):
        out[i] = x[i] + y[i]


@cuda.jit
def _gate_kernel(gate, up, silu_gate, out):
    start, stride = _flat()
    for i in range(start, gate.size, stride):
        g = gate[i]
        out[i] = (silu(g) if silu_gate else gelu_tanh(g)) * up[i]


def _flat_op(kernel, shape, *args):
    out = cuda.device_array(shape, np.float32)
    blocks, threads = launch_flat(out.size)
    kernel[blocks, threads](*args, out.reshape(-1))
    return out


def scale(x, factor: float):
    return _flat_op(_scale_kernel, x.shape, x.reshape(-1), np.float32(factor))


def add(x, y):
    return _flat_op(_add_kernel, x.shape, x.reshape(-1), y.reshape(-1))


def gate(gate, up, kind: str):
    """kind(gate) * up elementwise, kind "silu" or "gelu" (tanh approximation)."""
    return _flat_op(_gate_kernel, gate.shape, gate.reshape(-1), up.reshape(-1), kind == "silu")


@cuda.jit
def _rows_kernel(x, rows, out):
    n, width = out.shape
    start, stride = _flat()
    for i in range(start, n * width, stride):
        out[i // width, i % width] = x[rows[i // width], i % width]


def rows(x, rows):
    """x [n, width] -> x[rows] (rows: device int64)."""
    out = cuda.device_array((rows.shape[0], x.shape[1]), np.float32)
    blocks, threads = launch_flat(out.size)
    _rows_kernel[blocks, threads](x, rows, out)
    return out


@cuda.jit
def _write_f16_kernel(pool, cells, rows):
    """pool uint16 [cells, width]; rows float32 [n, width] -> pool[cells[i]] as float16 bits."""
    n, width = rows.shape
    start, stride = _flat()
    for i in range(start, n * width, stride):
        pool[cells[i // width], i % width] = f16_bits(rows[i // width, i % width])


@cuda.jit
def _write_q8_0_kernel(pool, cells, rows):
    """pool uint8 [cells, heads, row_bytes]; rows float32 [n, heads, dim]: each 32 values as
    llama.cpp's Q8_0 (a float16 scale amax / 127, codes rint(x * 127 / amax)), one thread each."""
    n, heads, dim = rows.shape
    per_row = dim // 32
    start, stride = _flat()
    for i in range(start, n * heads * per_row, stride):
        t, h, b = i // (heads * per_row), (i // per_row) % heads, i % per_row
        amax = f32(0)
        for j in range(32):
            amax = max(amax, abs(rows[t, h, 32 * b + j]))
        inverse = f32(127) / amax if amax != 0 else f32(0)
        bits = f16_bits(amax / f32(127))
        cell = pool[cells[t], h]
        cell[34 * b], cell[34 * b + 1] = u8(bits & 0xFF), u8(bits >> 8)
        for j in range(32):
            code = i32(min(rint(rows[t, h, 32 * b + j] * inverse), f32(127)))
            cell[34 * b + 2 + j] = u8(code & 0xFF)


def write_cache(pool, cells, rows, cache_type: str) -> None:
    """rows float32 [n, heads, dim] into `cells` (device int64 [n]) of one layer's pool."""
    if cache_type == "q8_0":
        blocks, threads = launch_flat(rows.shape[0] * rows.shape[1] * (rows.shape[2] // 32))
        _write_q8_0_kernel[blocks, threads](pool, cells, rows)
        return
    flat = rows.reshape(rows.shape[0], -1)
    blocks, threads = launch_flat(flat.size)
    _write_f16_kernel[blocks, threads](pool.reshape(pool.shape[0], -1), cells, flat)
