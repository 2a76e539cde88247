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
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda, float32

from llmx.errors import LlmxError
from llmx.quant.cuda.decode import VALUE
from llmx.quant.cuda.device import SIMULATED, Arena, absent, block_sum, empty, f32, launch
from llmx.quant.qtypes import QType, block_size, type_size

TOKENS = 4  # tokens one read of a weight row serves in `rows`
# `tiles`: output tile edge (TILE x TILE threads) and the depth of one step over k (small under
# the simulator, where each thread is a Python thread)
TILE = 4 if SIMULATED else 16
TILE_ROW = TILE + 1  # a shared tile's row: one more than TILE, so a column's reads hit distinct banks
TILED_MIN_TOKENS = 32  # from this many tokens on, `tiles`


def supported(qtype: QType) -> bool:
    return qtype in VALUE


@cuda.jit(device=True)
def _put(out, bounds, n, t, row, value):
    """out is flat: segment s (rows bounds[s]..bounds[s+1] of a stacked weight) is its own
    contiguous [n, rows] matrix starting at n * bounds[s] (one weight: plain [n, m])."""
    s = 0
    while row >= bounds[s + 1]:
        s += 1
    start = bounds[s]
    out[n * start + t * (bounds[s + 1] - start) + row - start] = value


@functools.cache
def _rows_kernel(qtype: QType):
    value, qk, bb = VALUE[qtype], block_size(qtype), type_size(qtype)

    @cuda.jit
    def kernel(raw, x, bias, bounds, out):
        """Blocks stride over (row, token group) jobs, threads over the row's k weights."""
        n, k = x.shape
        m = bounds[bounds.size - 1]
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
                    _put(out, bounds, n, t0 + t, row, total + (bias[row] if bias.size else f32(0)))

    return kernel


@functools.cache
def _tiles_kernel(qtype: QType):
    value, qk, bb = VALUE[qtype], block_size(qtype), type_size(qtype)

    @cuda.jit
    def kernel(raw, x, bias, bounds, out):
        """Blocks of TILE x TILE threads stride over output tiles; thread (i, j) computes
        out[token t0 + i, row r0 + j] from shared tiles of x and of the decoded weights."""
        n, k = x.shape
        m = bounds[bounds.size - 1]
        row_bytes = (k // qk) * bb
        w_tile = cuda.shared.array((TILE, TILE_ROW), float32)  # [row, depth]
        x_tile = cuda.shared.array((TILE, TILE_ROW), float32)  # [token, depth]
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
                _put(out, bounds, n, t0 + i, r0 + j, acc + (bias[r0 + j] if bias.size else f32(0)))

    return kernel


@dataclass(frozen=True)
class DeviceMatrix:
    """A weight on the device as the file's bytes; or several weights of one type and row length
    stacked (their rows one after another), which one launch multiplies (`matmul`)."""

    raw: Any  # device uint8 [rows x row bytes]
    qtype: QType
    bounds: tuple[int, ...]  # where each weight's rows start, then the total
    bounds_on_device: Any  # the same, device int64 (the kernels read it)

    @classmethod
    def upload(cls, weights: list[np.ndarray], qtype: QType) -> DeviceMatrix:
        """weights: each uint8 [rows, row bytes] (the file's bytes), of one row length."""
        if not supported(qtype):
            raise LlmxError(f"the CUDA backend has no kernel for {qtype.name} weights")
        bounds = tuple(int(b) for b in np.cumsum([0] + [len(w) for w in weights]))
        raw = np.concatenate([np.ascontiguousarray(w).reshape(-1) for w in weights])
        return cls(cuda.to_device(raw), qtype, bounds, cuda.to_device(np.array(bounds, np.int64)))


def matmul(x, matrix: DeviceMatrix, bias=None, arena: Arena | None = None) -> list:
    """x: device float32 [n, k] times each weight of `matrix` (transposed), plus `bias` (device
    float32 [m], one weight only) -> a device float32 [n, m_i] per weight, in one launch."""
    n, k = x.shape
    qk = block_size(matrix.qtype)
    if k % qk:
        raise LlmxError(f"a {matrix.qtype.name} row of {k} values is not whole blocks of {qk}")
    bounds, m = matrix.bounds, matrix.bounds[-1]
    out = empty((n * m,), arena)
    args = (matrix.raw, x, absent() if bias is None else bias, matrix.bounds_on_device, out)
    if n >= TILED_MIN_TOKENS:
        _tiles_kernel(matrix.qtype)[launch(-(-m // TILE) * -(-n // TILE))[0], (TILE, TILE)](*args)
    else:
        _rows_kernel(matrix.qtype)[launch(m * -(-n // TOKENS))](*args)
    return [out[n * a:n * b].reshape(n, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]



