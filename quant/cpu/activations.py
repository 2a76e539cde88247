"""Numba twins of `llmx.quant.activations`: the same codes and scales, bit for bit."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S


@njit(inline="always")
def _q8_block(x, lo, codes):
    """One 32-value block at x[lo:lo+32] -> codes; returns (d unrounded, sum of codes)."""
    amax = np.float32(0)
    for i in range(lo, lo + 32):
        amax = max(amax, abs(x[i]))
    inv = np.float32(127) / amax if amax != 0 else np.float32(0)
    total = 0
    for i in range(lo, lo + 32):
        q = np.int32(np.rint(x[i] * inv))
        codes[i] = q
        total += q
    return amax / np.float32(127), total


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_0(x):
    n, k = x.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // 32), np.float32)
    for t in prange(n):
        for b in range(k // 32):
            d, _ = _q8_block(x[t], b * 32, codes[t])
            scales[t, b] = S.round_f16(d)
    return codes, scales


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_1(x):
    n, k = x.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // 32), np.float32)
    sums = np.empty((n, k // 32), np.float32)
    for t in prange(n):
        for b in range(k // 32):
            d, total = _q8_block(x[t], b * 32, codes[t])
            scales[t, b] = S.round_f16(d)
            sums[t, b] = S.round_f16(d * np.float32(total))
    return codes, scales, sums


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_k(x):
    n, k = x.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // 256), np.float32)
    sums = np.empty((n, k // 16), np.int32)
    for t in prange(n):
        row = x[t]
        for b in range(k // 256):
            lo = b * 256
            imax = lo
            for i in range(lo, lo + 256):
                if abs(row[i]) > abs(row[imax]):
                    imax = i
            maxv = row[imax]
            iscale = np.float32(-127) / maxv if maxv != 0 else np.float32(0)
            scales[t, b] = np.float32(1) / iscale if maxv != 0 else np.float32(0)
            for j in range(16):
                total = 0
                for i in range(lo + 16 * j, lo + 16 * j + 16):
                    q = min(127, np.int32(np.rint(row[i] * iscale)))
                    codes[t, i] = q
                    total += q
                sums[t, b * 16 + j] = total
    return codes, scales, sums


@njit(cache=True, nogil=True, parallel=True)
def round_to_f16(x):
    """ggml feeds F16 weights float16 activations: round x through float16."""
    out = np.empty_like(x)
    for t in prange(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = S.round_f16(x[t, i])
    return out


@njit(cache=True, nogil=True, parallel=True)
def round_to_bf16(x):
    out = np.empty_like(x)
    for t in prange(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = S.round_bf16(x[t, i])
    return out
