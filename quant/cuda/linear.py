"""Quantized matmuls on the device: out [n, m] = x [n, k] @ W.T (+ bias), W [m, k] in its GGUF
block layout (the file's bytes, uploaded once), decoded inside the kernels (`decode.VALUE`).

Two kernels per weight type, built on first use:
- `rows`: for decoding and small batches. A block of threads per output row (a warp on a device),
  its threads striding over the row's weights (consecutive threads read consecutive bytes), up to
  `TOKENS` tokens at once from one read of the weights, then a `block_sum` per token.
- `tiles`: for prompts. A block computes a TILE x TILE tile of the output: the weight tile is
  decoded once into shared memory, the activation tile loaded beside it, and every thread
  multiplies its own output cells from shared memory.
Activations stay float32 (the weights are decoded, not the activations quantized): as accurate
as llama.cpp's CUDA backend or more, and as free in float order as the fidelity standard allows.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32

from llmx.errors import LlmxError
from llmx.quant.cuda.decode import VALUE
from llmx.quant.cuda.device import SIMULATED, THREADS, block_sum, f32, launch
from llmx.quant.qtypes import QType, block_size, type_size

TOKENS = 4  # tokens one read of a weight row serves in `rows`
# `tiles`: output tile edge (TILE x TILE threads) and the depth of one step over k (small under
# the simulator, where each thread is a Python thread)
TILE = 4 if SIMULATED else 16
TILED_MIN_TOKENS = 32  # from this many tokens on, `tiles`


def supported(qtype: QType) -> bool:
    return qtype in VALUE


@functools.cache
def _rows_kernel(qtype: QType):
    value, qk, bb = VALUE[qtype], block_size(qtype), type_size(qtype)

    @cuda.jit
    def kernel(raw, x, bias, out):
        """Blocks stride over (row, token group) jobs, threads over the row's k weights."""
        n, k = x.shape
        m = out.shape[1]
        row_bytes = (k // qk) * bb
        scratch = cuda.shared.array(32, float32)
        acc = cuda.local.array(TOKENS, float32)
        groups = (n + TOKENS - 1) // TOKENS
        for job in range(cuda.blockIdx.x, m * groups, cuda.gridDim.x):
            row, t0 = job % m, (job // m) * TOKENS
            tokens = min(TOKENS, n - t0)
            for t in range(TOKENS):
                acc[t] = f32(0)
            for e in range(cuda.threadIdx.x, k, cuda.blockDim.x):
                w = value(raw, row * row_bytes + (e // qk) * bb, e % qk)
                for t in range(tokens):
                    acc[t] += w * x[t0 + t, e]
            for t in range(tokens):
                total = block_sum(acc[t], scratch)
                if cuda.threadIdx.x == 0:
                    out[t0 + t, row] = total + (bias[row] if bias.size else f32(0))

    return kernel


@functools.cache
def _tiles_kernel(qtype: QType):
    value, qk, bb = VALUE[qtype], block_size(qtype), type_size(qtype)

    @cuda.jit
    def kernel(raw, x, bias, out):
        """Blocks of TILE x TILE threads stride over output tiles; thread (i, j) computes
        out[token t0 + i, row r0 + j] from shared tiles of x and of the decoded weights."""
        n, k = x.shape
        m = out.shape[1]
        row_bytes = (k // qk) * bb
        w_tile = cuda.shared.array((TILE, TILE + 1), float32)  # [row, depth] (+1: no bank conflicts)
        x_tile = cuda.shared.array((TILE, TILE + 1), float32)  # [token, depth]
        i, j = cuda.threadIdx.y, cuda.threadIdx.x
        tiles_m = (m + TILE - 1) // TILE
        for tile in range(cuda.blockIdx.x, tiles_m * ((n + TILE - 1) // TILE), cuda.gridDim.x):
            r0, t0 = (tile % tiles_m) * TILE, (tile // tiles_m) * TILE
            acc = f32(0)
            for d0 in range(0, k, TILE):
                # thread (i, j) loads weight (row r0 + i, depth d0 + j) and x (token t0 + i, same depth)
                e = d0 + j
                w_tile[i, j] = value(raw, (r0 + i) * row_bytes + (e // qk) * bb, e % qk) \
                    if r0 + i < m and e < k else f32(0)
                x_tile[i, j] = x[t0 + i, e] if t0 + i < n and e < k else f32(0)
                cuda.syncthreads()
                for d in range(TILE):
                    acc += x_tile[i, d] * w_tile[j, d]
                cuda.syncthreads()
            if t0 + i < n and r0 + j < m:
                out[t0 + i, r0 + j] = acc + (bias[r0 + j] if bias.size else f32(0))

    return kernel


def matmul(x, raw, qtype: QType, m: int, bias=None, out=None):
    """x: device float32 [n, k]; raw: device uint8, the [m, k] weight's bytes; bias: device
    float32 [m] or None. Returns device float32 [n, m] (into `out` when given)."""
    if not supported(qtype):
        raise LlmxError(f"the CUDA backend has no kernel for {qtype.name} weights")
    n, k = x.shape
    if k % block_size(qtype):
        raise LlmxError(f"a {qtype.name} row of {k} values is not whole blocks of {block_size(qtype)}")
    out = cuda.device_array((n, m), np.float32) if out is None else out
    bias = _NO_BIAS() if bias is None else bias
    if n >= TILED_MIN_TOKENS:
        tiles = -(-m // TILE) * -(-n // TILE)
        _tiles_kernel(qtype)[launch(tiles)[0], (TILE, TILE)](raw, x, bias, out)
    else:
        blocks, threads = launch(m * -(-n // TOKENS))
        _rows_kernel(qtype)[blocks, threads](raw, x, bias, out)
    return out


@functools.cache
def _NO_BIAS():
    return cuda.device_array(0, np.float32)


__all__ = ["THREADS", "TILED_MIN_TOKENS", "TOKENS", "matmul", "supported"]
