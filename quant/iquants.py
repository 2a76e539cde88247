"""IQ4_NL's quantizer, as llama.cpp's `quantize_row_iq4_nl_impl` (block of 32, ntry 7), bit for bit.

Codes index a fixed non-linear table (`kvalues_iq4nl`); the block scale is searched over 15
candidates for the best weighted fit. llama.cpp falls back to IQ4_NL for Q2_K/Q3_K tensors whose
rows are not whole 256-value super-blocks. Float32 throughout, operation by operation (see kquants).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llmx.quant.cpu.simd import IQ4_NL_VALUES, round_f16
from llmx.quant.kquants import _EPS, _JIT, _ZERO, F32

VALUES = np.array(IQ4_NL_VALUES, np.float32)
NTRY = 7


@njit(**_JIT)
def best_index(values, x):
    """The table entry nearest x (ties to the upper one), by bisection as ggml's best_index_int8."""
    n = values.size
    if x <= values[0]:
        return 0
    if x >= values[n - 1]:
        return n - 1
    lo, hi = 0, n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < values[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if x - values[hi - 1] < values[hi] - x else hi


@njit(**_JIT)
def _fit(xb, w, values, inverse):
    """(sum w q x, sum w q^2) with q = the table value nearest inverse * x."""
    sumqx = sumq2 = _ZERO
    for j in range(xb.size):
        q = values[best_index(values, inverse * xb[j])]
        sumqx += w[j] * q * xb[j]
        sumq2 += w[j] * q * q
    return sumqx, sumq2


@njit(**_JIT)
def _block(xb, imp, values, codes):
    """One block of 32: its scale (float16-exact) and codes 0..15."""
    n = xb.size
    sigma2 = _ZERO
    for j in range(n):
        sigma2 += xb[j] * xb[j]
    sigma2 *= F32(2.0) / F32(n)
    w = np.empty(n, np.float32)
    for j in range(n):
        w[j] = imp[j] * np.sqrt(sigma2 + xb[j] * xb[j]) if imp.size else xb[j] * xb[j]
    top = amax = _ZERO
    for j in range(n):
        if abs(xb[j]) > amax:
            amax, top = abs(xb[j]), xb[j]
    scale = _ZERO
    if amax >= _EPS:
        d = -top / values[0]
        sumqx, sumq2 = _fit(xb, w, values, F32(1.0) / d)
        scale = sumqx / sumq2
        best = scale * sumqx
        for step in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = _fit(xb, w, values, (F32(step) + values[0]) / top)
            if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                scale = sumqx / sumq2
                best = scale * sumqx
    inverse = F32(1.0) / scale if scale != 0 else _ZERO
    for j in range(n):
        codes[j] = best_index(values, inverse * xb[j])
    return round_f16(scale)


@njit(**_JIT)
def quantize_iq4_nl_blocks(x, importance):
    """float32 [n_blocks, 32] -> (scales float32 [n_blocks], codes uint8 [n_blocks, 32])."""
    n_blocks = x.shape[0]
    scales = np.empty(n_blocks, np.float32)
    codes = np.empty((n_blocks, 32), np.uint8)
    for b in range(n_blocks):
        imp = importance[b] if importance.size else importance.reshape(-1)[:0]
        scales[b] = _block(x[b], imp, VALUES, codes[b])
    return scales, codes
