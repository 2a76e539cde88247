"""llama.cpp's reference quantizers for Q8_0, Q4_0 and Q5_0 (`quantize_row_q*_ref`) in Numba.

The same float32 operations as ggml (and gguf-py), so the same bytes, at a few hundred million
values per second: the token embedding of a small model is most of its values.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from llmx.quant.kquants import _JIT, _ZERO, F32


@njit(**_JIT)
def quantize_q8_0(x):
    """float32 [n, 32] -> (d float32 [n], codes int8 [n, 32]); codes = roundf(x / d), halves away from 0."""
    n = x.shape[0]
    d = np.empty(n, np.float32)
    q = np.empty((n, 32), np.int8)
    for b in range(n):
        amax = _ZERO
        for v in x[b]:
            amax = max(amax, abs(v))
        d[b] = amax / F32(127)
        inverse = F32(1) / d[b] if d[b] != 0 else _ZERO
        for j in range(32):
            v = x[b, j] * inverse
            q[b, j] = int(math.copysign(math.floor(abs(np.float64(v)) + 0.5), v))
    return d, q


@njit(**_JIT)
def quantize_signed_offset(x, half):
    """Q4_0 (half 8) and Q5_0 (half 16): d = -max/half, codes min(2 half - 1, trunc(x / d + half + 0.5))."""
    n = x.shape[0]
    d = np.empty(n, np.float32)
    q = np.empty((n, 32), np.uint8)
    top = F32(2 * half - 1)
    bias = F32(half) + F32(0.5)
    for b in range(n):
        amax = peak = _ZERO
        for v in x[b]:
            if amax < abs(v):
                amax, peak = abs(v), v
        d[b] = peak / F32(-half)
        inverse = F32(1) / d[b] if d[b] != 0 else _ZERO
        for j in range(32):
            q[b, j] = int(min(top, F32(int(x[b, j] * inverse + bias))))
    return d, q
