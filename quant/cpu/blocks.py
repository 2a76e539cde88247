"""Scalar reads of packed block fields, shared by the matmul and dequantize kernels."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit
def byte(w, i):
    """w[i] as an int32 (Numba would mix uint8 and int64 arithmetic into float64)."""
    return np.int32(w[i])


@njit
def signed_byte(v):
    return v - 256 if v > 127 else v


@njit
def k4_scale_min(w, off, j):
    """Q4_K/Q5_K's 6-bit scale and min of sub-block j from the 12 packed bytes at `off`."""
    if j < 4:
        return byte(w, off + j) & 63, byte(w, off + j + 4) & 63
    sc = (byte(w, off + j + 4) & 0x0F) | ((byte(w, off + j - 4) >> 6) << 4)
    mn = (byte(w, off + j + 4) >> 4) | ((byte(w, off + j) >> 6) << 4)
    return sc, mn


@njit
def q3_k_scale(w, off, j):
    """Q3_K's signed 6-bit scale of sub-block j (of 16) from the 12 packed bytes at `off`."""
    low = (byte(w, off + j) & 0x0F) if j < 8 else (byte(w, off + j - 8) >> 4)
    high = (byte(w, off + 8 + j % 4) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32
