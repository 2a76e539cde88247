"""Causal attention over the paged KV cache on the device, with an online softmax: one pass over
a row's positions, keeping the running maximum, the running sum of exponentials and the
weighted sum of values (rescaled when the maximum moves). A block of threads per (row, head, split
of SPAN positions): the threads split the head dimension for each score's dot product
(`block_sum`) and for the values; long rows' splits are combined by a second launch.

The cache's layer pools are [cells, n_head_kv, dim] of float16 bits (uint16) or of Q8_0 rows
(uint8, 34 bytes per 32 values), cell = block * block_size + slot as on the CPU."""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from llmx.errors import LlmxError
from llmx.quant.cuda.device import (
    SIMULATED,
    Arena,
    block_sum,
    device_function,
    empty,
    f16_value,
    f32,
    i32,
    launch,
    launch_flat,
)

# positions one block attends to before a row is split over blocks (small under the simulator, so
# that the tests split)
SPAN = 4 if SIMULATED else 256
PER_THREAD = 256 if SIMULATED else 16  # value dims one thread accumulates: dv <= PER_THREAD x threads


@device_function
def _f16_cell(pool, cell, head, e):
    bits = i32(pool[cell, head, e])
    return f16_value(bits & 0xFF, bits >> 8)


@device_function
def _q8_0_cell(pool, cell, head, e):
    at = 34 * (e // 32)
    code = i32(pool[cell, head, at + 2 + e % 32])
    return f16_value(pool[cell, head, at], pool[cell, head, at + 1]) * f32(code - 256 if code >= 128 else code)


READERS = {"f16": _f16_cell, "q8_0": _q8_0_cell}


@functools.cache
def _kernel(k_type: str, v_type: str):
    key, val = READERS[k_type], READERS[v_type]

    @cuda.jit
    def kernel(q, k_pool, v_pool, tables, row_seq, positions, block_size, window, group, kq_scale, span, out,
               part_max, part_total, part_acc):
        """Blocks stride over (row, head, split) jobs; a split is `span` consecutive positions of
        the row's range. One split: the result into out; several: each split's running max, sum
        and unnormalized values into the part_ arrays, for `_combine`."""
        scratch = cuda.shared.array(32, float32)
        acc = cuda.local.array(PER_THREAD, float32)
        n, n_head, d = q.shape
        dv = out.shape[2]
        splits = part_max.shape[2]
        tid, width = cuda.threadIdx.x, cuda.blockDim.x
        for job in range(cuda.blockIdx.x, n * n_head * splits, cuda.gridDim.x):
            t, h, split = job // (n_head * splits), (job // splits) % n_head, job % splits
            kv_head, seq, last = h // group, row_seq[t], positions[t]
            first = max(0, last - window + 1) if window > 0 else 0
            for i in range(PER_THREAD):
                acc[i] = f32(0)
            running_max, total = f32(-math.inf), f32(0)  # (float32: a Python float would be float64)
            for p in range(first + split * span, min(first + (split + 1) * span, last + 1)):
                cell = tables[seq, p // block_size] * block_size + p % block_size
                part = f32(0)
                for e in range(tid, d, width):
                    part += q[t, h, e] * key(k_pool, cell, kv_head, e)
                score = block_sum(part, scratch) * kq_scale
                new_max = max(running_max, score)
                shrink = math.exp(running_max - new_max)  # 0 at the first position
                weight = math.exp(score - new_max)
                total = total * shrink + weight
                for i in range((dv - tid + width - 1) // width):
                    acc[i] = acc[i] * shrink + weight * val(v_pool, cell, kv_head, tid + i * width)
                running_max = new_max
            if splits == 1:
                for i in range((dv - tid + width - 1) // width):
                    out[t, h, tid + i * width] = acc[i] / total
            else:
                part_max[t, h, split], part_total[t, h, split] = running_max, total
                for i in range((dv - tid + width - 1) // width):
                    part_acc[t, h, split, tid + i * width] = acc[i]

    return kernel


@cuda.jit
def _combine(part_max, part_total, part_acc, out):
    """out[t, h] from the splits' partial softmaxes: each rescaled to the largest running max.
    (A split past a row's range is empty: max -inf, weight 0.)"""
    n, n_head, dv = out.shape
    splits = part_max.shape[2]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, n * n_head * dv, stride):
        t, h, e = i // (n_head * dv), (i // dv) % n_head, i % dv
        top = f32(-math.inf)
        for s in range(splits):
            top = max(top, part_max[t, h, s])
        weighted, total = f32(0), f32(0)
        for s in range(splits):
            scale = math.exp(part_max[t, h, s] - top)
            weighted += part_acc[t, h, s, e] * scale
            total += part_total[t, h, s] * scale
        out[t, h, e] = weighted / total


def attend(q, k_pool, v_pool, cache_types: tuple[str, str], tables, row_seq, positions, block_size: int,
           window: int | None, group: int, kq_scale: float, dv: int, longest: int, arena: Arena | None = None):
    """q device float32 [n, n_head, d] -> [n, n_head, dv]. k_pool/v_pool: one layer's pools;
    tables int32 [n_seqs, blocks], row_seq and positions int64 [n] (device arrays); `longest`:
    the most positions a row attends to. Rows longer than SPAN positions are split over blocks
    (flash decoding): each split a partial softmax, then one combining launch."""
    n, n_head, _ = q.shape
    splits = max(1, -(-longest // SPAN))
    blocks, threads = launch(n * n_head * splits)
    if dv > PER_THREAD * threads:
        raise LlmxError(f"the CUDA attention kernel handles value heads of up to {PER_THREAD * threads}, not {dv}")
    out = empty((n, n_head, dv), arena)
    part_max, part_total = (empty((n, n_head, splits), arena) for _ in range(2))
    part_acc = empty((n, n_head, splits, dv) if splits > 1 else (0, 0, 0, 0), arena)
    _kernel(*cache_types)[blocks, threads](q, k_pool, v_pool, tables, row_seq, positions, block_size, window or 0,
                                           group, np.float32(kq_scale), SPAN, out, part_max, part_total, part_acc)
    if splits > 1:
        _combine[launch_flat(out.size)](part_max, part_total, part_acc, out)
    return out
