"""The elementwise parts of a forward on the device: embedding rows, RMSNorm (alone, fused with
the residual add around it, or with rope for queries and keys), gating, row gathers, and the KV
cache's writes (float16 or Q8_0 cells, as `KVCache` on
the CPU). Every kernel strides over its work, so any launch size gives the same result."""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from llmx.quant.cuda.decode import VALUE
from llmx.quant.cuda.device import (
    Arena,
    absent,
    block_sum,
    empty,
    f16_bits,
    f32,
    gelu_tanh,
    i32,
    launch,
    launch_flat,
    rint,
    silu,
    u8,
)
from llmx.quant.qtypes import QType, block_size, type_size


@cuda.jit(device=True)
def _flat():
    """(this thread's first item, the stride): an elementwise kernel's grid-stride loop."""
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


def embed(raw, qtype: QType, tokens, width: int, scale: float, arena: Arena | None = None):
    """float32 [n, width]: rows `tokens` (device int64 [n]) of the table `raw`, times `scale`."""
    out = empty((tokens.shape[0], width), arena)
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


def rms_norm(x, weight, eps: float, arena: Arena | None = None):
    """RMSNorm over the last axis of device float32 x (any leading shape), times `weight`."""
    width = x.shape[len(x.shape) - 1]  # (the simulator's shapes take no negative index)
    rows = x.reshape(x.size // width, width)
    out = empty(rows.shape, arena)
    blocks, threads = launch(rows.shape[0])
    _rms_norm_kernel[blocks, threads](rows, weight, np.float32(eps), out)
    return out.reshape(x.shape)


@cuda.jit
def _add_rms_norm_kernel(x, y, pre_weight, weight, eps, total, normed):
    """Per row: total = x + y (y RMS-normed by pre_weight first, when it has any), and normed =
    RMSNorm(total) by weight (when it has any). Each thread reads back only what it wrote."""
    scratch = cuda.shared.array(32, f32)
    rows, width = x.shape
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        factor = f32(1)
        if pre_weight.size:
            acc = f32(0)
            for e in range(cuda.threadIdx.x, width, cuda.blockDim.x):
                acc += y[r, e] * y[r, e]
            factor = f32(1) / math.sqrt(block_sum(acc, scratch) / f32(width) + eps)
        acc = f32(0)
        for e in range(cuda.threadIdx.x, width, cuda.blockDim.x):
            value = x[r, e] + (y[r, e] * factor * pre_weight[e] if pre_weight.size else y[r, e])
            total[r, e] = value
            acc += value * value
        if weight.size:
            factor = f32(1) / math.sqrt(block_sum(acc, scratch) / f32(width) + eps)
            for e in range(cuda.threadIdx.x, width, cuda.blockDim.x):
                normed[r, e] = total[r, e] * factor * weight[e]


def add_rms_norm(x, y, weight, pre_weight, eps: float, arena: Arena | None = None):
    """(x + y, RMSNorm(x + y) by weight), y RMS-normed by pre_weight first; a weight of None leaves
    its norm out (then the second result is None). One launch for the three ops."""
    width = x.shape[len(x.shape) - 1]
    rows = x.size // width
    total = empty((rows, width), arena)
    normed = empty((rows, width), arena) if weight is not None else absent(2)
    blocks, threads = launch(rows)
    _add_rms_norm_kernel[blocks, threads](x.reshape(rows, width), y.reshape(rows, width),
                                          absent() if pre_weight is None else pre_weight,
                                          absent() if weight is None else weight, np.float32(eps), total, normed)
    return total.reshape(x.shape), normed.reshape(x.shape) if weight is not None else None



@cuda.jit(device=True)
def _norm_rope_row(x, weight, cos, sin, neox, scale, eps, out, t, h, scratch):
    """Row (t, h) of x [n, heads, dim]: RMSNorm (when weight has any), the first 2 * half dims
    rotated in pairs, times scale. A thread handles whole pairs."""
    dim, half = x.shape[2], cos.shape[1]
    factor = f32(1)
    if weight.size:
        acc = f32(0)
        for e in range(cuda.threadIdx.x, dim, cuda.blockDim.x):
            acc += x[t, h, e] * x[t, h, e]
        factor = f32(1) / math.sqrt(block_sum(acc, scratch) / f32(dim) + eps)
    for i in range(cuda.threadIdx.x, half, cuda.blockDim.x):
        ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
        a, b = x[t, h, ia] * factor, x[t, h, ib] * factor
        if weight.size:
            a, b = a * weight[ia], b * weight[ib]
        out[t, h, ia] = (a * cos[t, i] - b * sin[t, i]) * scale
        out[t, h, ib] = (a * sin[t, i] + b * cos[t, i]) * scale
    for e in range(2 * half + cuda.threadIdx.x, dim, cuda.blockDim.x):
        out[t, h, e] = x[t, h, e] * factor * (weight[e] if weight.size else f32(1)) * scale


@cuda.jit
def _norm_rope_kernel(q, k, q_weight, k_weight, cos, sin, neox, q_scale, eps, q_out, k_out):
    """Blocks stride over the rows (token, head) of q, then those of k."""
    scratch = cuda.shared.array(32, f32)
    n, q_heads, k_heads = q.shape[0], q.shape[1], k.shape[1]
    for row in range(cuda.blockIdx.x, n * (q_heads + k_heads), cuda.gridDim.x):
        if row < n * q_heads:
            _norm_rope_row(q, q_weight, cos, sin, neox, q_scale, eps, q_out, row // q_heads, row % q_heads, scratch)
        else:
            row -= n * q_heads
            _norm_rope_row(k, k_weight, cos, sin, neox, f32(1), eps, k_out, row // k_heads, row % k_heads, scratch)


def norm_rope(q, k, q_weight, k_weight, cos, sin, layout: str, q_scale: float, eps: float,
              arena: Arena | None = None):
    """Queries [n, n_head, head_dim] and keys [n, n_head_kv, head_dim], in one launch: RMSNorm per
    head by their weight (None: none), rope (cos, sin [n, half]; "normal" pairs (2i, 2i+1),
    "neox" (i, i + half)), the queries times q_scale. Returns (queries, keys)."""
    q_out, k_out = empty(q.shape, arena), empty(k.shape, arena)
    blocks, threads = launch(q.shape[0] * (q.shape[1] + k.shape[1]))
    _norm_rope_kernel[blocks, threads](q, k, absent() if q_weight is None else q_weight,
                                       absent() if k_weight is None else k_weight, cos, sin,
                                       layout != "normal", np.float32(q_scale), np.float32(eps), q_out, k_out)
    return q_out, k_out



@cuda.jit
def _gate_kernel(gate, up, silu_gate, out):
    start, stride = _flat()
    for i in range(start, gate.size, stride):
        g = gate[i]
        out[i] = (silu(g) if silu_gate else gelu_tanh(g)) * up[i]


def _flat_op(kernel, shape, arena, *args):
    out = empty(shape, arena)
    blocks, threads = launch_flat(out.size)
    kernel[blocks, threads](*args, out.reshape(-1))
    return out


def gate(gate, up, kind: str, arena: Arena | None = None):
    """kind(gate) * up elementwise, kind "silu" or "gelu" (tanh approximation)."""
    return _flat_op(_gate_kernel, gate.shape, arena, gate.reshape(-1), up.reshape(-1), kind == "silu")


@cuda.jit
def _rows_kernel(x, rows, out):
    n, width = out.shape
    start, stride = _flat()
    for i in range(start, n * width, stride):
        out[i // width, i % width] = x[rows[i // width], i % width]


def rows(x, rows, arena: Arena | None = None):
    """x [n, width] -> x[rows] (rows: device int64)."""
    out = empty((rows.shape[0], x.shape[1]), arena)
    blocks, threads = launch_flat(out.size)
    _rows_kernel[blocks, threads](x, rows, out)
    return out


@cuda.jit
def _write_f16_kernel(k_pool, v_pool, cells, k, v):
    """Pools uint16 [cells, width_k or width_v]; k, v float32 [n, width_k or width_v]: row i of each
    into its pool's cell cells[i] as float16 bits. Keys and values in one launch."""
    n, width_k = k.shape
    width = width_k + v.shape[1]
    start, stride = _flat()
    for i in range(start, n * width, stride):
        t, e = i // width, i % width
        if e < width_k:
            k_pool[cells[t], e] = f16_bits(k[t, e])
        else:
            v_pool[cells[t], e - width_k] = f16_bits(v[t, e - width_k])


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


def write_cache(k_pool, v_pool, cells, k, v, cache_types: tuple[str, str]) -> None:
    """k, v float32 [n, heads, dim] into `cells` (device int64 [n]) of one layer's pools: one launch
    for float16 keys and values, one per Q8_0 pool."""
    if cache_types == ("f16", "f16"):
        k_flat, v_flat = k.reshape(k.shape[0], k.size // k.shape[0]), v.reshape(v.shape[0], v.size // v.shape[0])
        blocks, threads = launch_flat(k_flat.size + v_flat.size)
        _write_f16_kernel[blocks, threads](k_pool.reshape(k_pool.shape[0], k_flat.shape[1]),
                                           v_pool.reshape(v_pool.shape[0], v_flat.shape[1]), cells, k_flat, v_flat)
        return
    for pool, rows, kind in ((k_pool, k, cache_types[0]), (v_pool, v, cache_types[1])):
        if kind == "q8_0":
            blocks, threads = launch_flat(rows.shape[0] * rows.shape[1] * (rows.shape[2] // 32))
            _write_q8_0_kernel[blocks, threads](pool, cells, rows)
        else:
            width = rows.size // rows.shape[0]
            _write_f16_kernel[launch_flat(rows.size)](pool.reshape(pool.shape[0], width), absent(2, np.uint16),
                                                      cells, rows.reshape(rows.shape[0], width), absent(2))


