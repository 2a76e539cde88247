"""Numba twins of `llmx.quant.activations`: the same codes and scales, bit for bit."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S


@njit
def _max_abs(raw, lo, n):
    """max |x| over n float32 (n a multiple of 8) from element lo of raw (bytes), 8 lanes at a time."""
    top = S.zero_f32x8()
    for i in range(lo, lo + n, 8):
        top = S.max_abs_f32x8(top, S.load_f32x8(raw, 4 * i))
    amax = S.lane_f32x8(top, 0)
    for i in range(1, 8):
        amax = max(amax, S.lane_f32x8(top, i))
    return amax


@njit
def _round_8(raw, codes, i, factor, cap):
    """codes[i..i+7] = min(cap, rint(x * factor)); returns the 8 codes as int32 lanes."""
    q = S.round_codes_i32x8(S.load_f32x8(raw, 4 * i), factor, cap)
    S.store_i8x8(codes, i, q)
    return q


@njit
def _q8_block(x, lo, codes):
    """One 32-value block at x[lo:lo+32] -> codes; returns (d unrounded, sum of codes)."""
    raw = x.view(np.uint8)
    amax = _max_abs(raw, lo, 32)
    inv = np.float32(127) / amax if amax != 0 else np.float32(0)
    q = S.add_i32x8(S.add_i32x8(_round_8(raw, codes, lo, inv, 127), _round_8(raw, codes, lo + 8, inv, 127)),
                    S.add_i32x8(_round_8(raw, codes, lo + 16, inv, 127), _round_8(raw, codes, lo + 24, inv, 127)))
    return amax / np.float32(127), S.hsum_i32x8(q)


# The row functions and their single-thread callers take numpy's error model, as the parallel
# quantizers do: activations that overflowed to inf give inf and NaN scales, not a ZeroDivisionError.
@njit(error_model="numpy")
def q8_0_row(x, t, codes, scales):
    """Row t of x as Q8_0 into codes[t] and scales[t] (callers: `quantize_q8_0` and fused kernels)."""
    for b in range(x.shape[1] // 32):
        d, _ = _q8_block(x[t], b * 32, codes[t])
        scales[t, b] = S.round_f16(d)


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_0(x):
    n, k = x.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // 32), np.float32)
    for t in prange(n):
        q8_0_row(x, t, codes, scales)
    return codes, scales


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_q8_0_into(x, codes, scales):
    """`quantize_q8_0` into given arrays, on the calling thread: for a row or two, where a parallel
    region's start and the returned arrays cost more than the work (`cpu_decode`)."""
    for t in range(x.shape[0]):
        q8_0_row(x, t, codes, scales)


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


@njit(error_model="numpy")
def q8_k_row(x, t, codes, scales, sums):
    """Row t of x as Q8_K into codes[t], scales[t] and sums[t] (callers: `quantize_q8_k` and fused kernels)."""
    row = x[t]
    raw = row.view(np.uint8)
    for b in range(x.shape[1] // 256):
        lo = b * 256
        amax = _max_abs(raw, lo, 256)
        imax = lo  # the first value of largest magnitude (its sign matters)
        while imax < lo + 255 and abs(row[imax]) != amax:
            imax += 1
        maxv = row[imax]
        iscale = np.float32(-127) / maxv if maxv != 0 else np.float32(0)
        scales[t, b] = np.float32(1) / iscale if maxv != 0 else np.float32(0)
        for j in range(16):
            at = lo + 16 * j
            q = S.add_i32x8(_round_8(raw, codes[t], at, iscale, 127), _round_8(raw, codes[t], at + 8, iscale, 127))
            sums[t, b * 16 + j] = S.hsum_i32x8(q)


@njit(cache=True, nogil=True, parallel=True)
def quantize_q8_k(x):
    n, k = x.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // 256), np.float32)
    sums = np.empty((n, k // 16), np.int32)
    for t in prange(n):
        q8_k_row(x, t, codes, scales, sums)
    return codes, scales, sums


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_q8_k_into(x, codes, scales, sums):
    """`quantize_q8_k` into given arrays, on the calling thread (see `quantize_q8_0_into`)."""
    for t in range(x.shape[0]):
        q8_k_row(x, t, codes, scales, sums)


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
