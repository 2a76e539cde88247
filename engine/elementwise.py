"""The transformer's elementwise steps as Numba kernels: RMSNorm and the GELU gate.

Each gives the same bits as the numpy expression it replaces (tests/test_elementwise.py holds
those expressions): numpy's pairwise float64 sum for the mean square, and ggml's float16 GELU
table built once with numpy. Decode runs them ~100 times per token, where numpy's per-call
overhead cost a tenth of the step.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

from llmx.quant.cpu import simd as S


@njit(cache=True, nogil=True)
def _block_sum(a, lo, n):
    """numpy's pairwise_sum for n <= 128: 8 lanes, combined as a tree, then the rest in order."""
    if n < 8:
        total = 0.0
        for i in range(n):
            total += a[lo + i]
        return total
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        total += a[lo + i]
        i += 1
    return total


@njit(cache=True, nogil=True)
def pairwise_sum(a, lo, n):
    """numpy's pairwise summation of float64 a[lo:lo + n]: halves (cut at a multiple of 8)
    summed separately down to blocks of 128, so the mean square equals np.mean's to the last bit.
    Numba cannot cache a recursive function, so the recursion runs on an explicit stack."""
    if n <= 128:
        return _block_sum(a, lo, n)
    starts, sizes = np.empty(64, np.int64), np.empty(64, np.int64)
    stage, left = np.zeros(64, np.int64), np.empty(64, np.float64)
    top, starts[0], sizes[0] = 0, lo, n
    result = 0.0
    while True:
        start, size = starts[top], sizes[top]
        half = size // 2 - (size // 2) % 8
        if stage[top] == 0:  # sum the left half
            stage[top] = 1
            if half > 128:
                top += 1
                starts[top], sizes[top], stage[top] = start, half, 0
                continue
            result = _block_sum(a, start, half)
        if stage[top] == 1:  # `result` is the left half's sum; now the right half
            left[top], stage[top] = result, 2
            if size - half > 128:
                top += 1
                starts[top], sizes[top], stage[top] = start + half, size - half, 0
                continue
            result = _block_sum(a, start + half, size - half)
        result = left[top] + result  # both halves done
        if top == 0:
            return result
        top -= 1


@njit(cache=True, nogil=True)
def _rms_norm_rows(x, weight, eps, out):
    """x, out float32 [rows, n]: x * float32(1 / sqrt(mean(x^2) + eps)) * weight."""
    n = x.shape[1]
    squares = np.empty(n, np.float64)
    for r in range(x.shape[0]):
        for i in range(n):
            squares[i] = np.float64(x[r, i]) * np.float64(x[r, i])
        scale = np.float32(1.0 / np.sqrt(pairwise_sum(squares, 0, n) / n + eps))
        for i in range(n):
            out[r, i] = (x[r, i] * scale) * weight[i]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis of float32 x (any leading shape)."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _rms_norm_rows(rows, np.ascontiguousarray(weight, dtype=np.float32), float(eps), out)
    return out.reshape(x.shape)


@functools.cache
def gelu_table() -> np.ndarray:
    """float32 [65536]: GELU-tanh of every float16 value, rounded to float16 (ggml_table_gelu_f16)."""
    h = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        inner = np.float32(math.sqrt(2 / math.pi)) * (h + np.float32(0.044715) * h * h * h)
        return (np.float32(0.5) * h * (np.float32(1) + np.tanh(inner))).astype(np.float16).astype(np.float32)


@njit(cache=True, nogil=True)
def _gelu(x, table, out):
    for i in range(x.size):
        v = x[i]
        out[i] = 0.0 if v <= -10 else v if v >= 10 else table[S.f16_bits(v)]


def gelu_tanh_f16(x: np.ndarray) -> np.ndarray:
    """GELU as ggml's CPU backend: the float16 table at the input rounded to float16, and the
    identity / zero beyond +-10."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty_like(flat)
    _gelu(flat, gelu_table(), out)
    return out.reshape(x.shape)
