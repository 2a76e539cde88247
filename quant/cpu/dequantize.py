"""Numba dequantization, bit-exact with the numpy reference (and so with gguf-py and ggml).

Used where float weights are wanted: BLAS prefill on dequantized tiles, and inspection.
Each `_rows_*` kernel turns uint8 [m, row_bytes] into float32 [m, k], rows in parallel; every
product is taken in float32 in the same order as ggml's `dequantize_row_*`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import blocks as B
from llmx.quant.cpu import simd as S
from llmx.quant.qtypes import QType, block_size, type_size

f32 = np.float32


@njit
def _nibble(w, qs, j):
    """Element j (0..31) of a 32-element block whose 16 code bytes start at `qs`."""
    return B.byte(w, qs + j) & 0x0F if j < 16 else B.byte(w, qs + j - 16) >> 4


@njit(cache=True, nogil=True, parallel=True)
def _rows_q8_0(w, out):
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 32):
            d = S.load_f16(row, 34 * b)
            for j in range(32):
                q = B.byte(row, 34 * b + 2 + j)
                out[r, 32 * b + j] = d * f32(q - 256 if q > 127 else q)


@njit(inline="always")
def _rows_nibble_table(w, out, values):
    """Q4_0 and IQ4_NL: 32 nibbles per 18-byte block, each naming one of 16 values, times d."""
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 32):
            d = S.load_f16(row, 18 * b)
            for j in range(32):
                out[r, 32 * b + j] = d * values[_nibble(row, 18 * b + 2, j)]


_Q4_0 = np.arange(-8, 8, dtype=np.float32)  # code - 8
_IQ4_NL = np.array(S.IQ4_NL_VALUES, np.float32)


@njit(cache=True, nogil=True, parallel=True)
def _rows_q4_0(w, out):
    _rows_nibble_table(w, out, _Q4_0)


@njit(cache=True, nogil=True, parallel=True)
def _rows_q4_1(w, out):
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 32):
            d, m = S.load_f16(row, 20 * b), S.load_f16(row, 20 * b + 2)
            for j in range(32):
                out[r, 32 * b + j] = d * f32(_nibble(row, 20 * b + 4, j)) + m


@njit(cache=True, nogil=True, parallel=True)
def _rows_q5_0(w, out):
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 32):
            d, qh = S.load_f16(row, 22 * b), S.load_u32(row, 22 * b + 2)
            for j in range(32):
                q = _nibble(row, 22 * b + 6, j) | (np.int32((qh >> j) & 1) << 4)
                out[r, 32 * b + j] = d * f32(q - 16)


@njit(cache=True, nogil=True, parallel=True)
def _rows_q5_1(w, out):
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 32):
            d, m, qh = S.load_f16(row, 24 * b), S.load_f16(row, 24 * b + 2), S.load_u32(row, 24 * b + 4)
            for j in range(32):
                q = _nibble(row, 24 * b + 8, j) | (np.int32((qh >> j) & 1) << 4)
                out[r, 32 * b + j] = d * f32(q) + m


@njit(cache=True, nogil=True, parallel=True)
def _rows_q2_k(w, out):
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 256):
            o = 84 * b
            d, dmin = S.load_f16(row, o + 80), S.load_f16(row, o + 82)
            for e in range(256):
                h, r4, j = e // 128, (e // 32) % 4, e % 32
                sc = B.byte(row, o + e // 16)
                q = (B.byte(row, o + 16 + 32 * h + j) >> (2 * r4)) & 3
                out[r, 256 * b + e] = (d * f32(sc & 0x0F)) * f32(q) - dmin * f32(sc >> 4)


@njit(cache=True, nogil=True, parallel=True)
def _rows_q3_k(w, out):
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 256):
            o = 110 * b
            d = S.load_f16(row, o + 108)
            for e in range(256):
                h, r4, j = e // 128, (e // 32) % 4, e % 32
                low = (B.byte(row, o + 32 + 32 * h + j) >> (2 * r4)) & 3
                high = (B.byte(row, o + j) >> (e // 32)) & 1
                dl = d * f32(B.q3_k_scale(row, o + 96, e // 16))
                out[r, 256 * b + e] = dl * f32(low - 4 * (1 - high))


@njit(inline="always")
def _rows_k_scale_min(w, out, block_bytes, qs_at, qh_at):
    """Q4_K (qh_at < 0) and Q5_K (fifth bits at qh_at): 8 sub-blocks of 32 with a scale and min."""
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 256):
            o = block_bytes * b
            d, dmin = S.load_f16(row, o), S.load_f16(row, o + 2)
            for s in range(8):
                sc, mn = B.k4_scale_min(row, o + 4, s)
                dl, ml = d * f32(sc), dmin * f32(mn)
                for j in range(32):
                    byte = B.byte(row, o + qs_at + 32 * (s // 2) + j)
                    q = (byte & 0x0F) if s % 2 == 0 else (byte >> 4)
                    if qh_at >= 0:
                        q |= ((B.byte(row, o + qh_at + j) >> s) & 1) << 4
                    out[r, 256 * b + 32 * s + j] = dl * f32(q) - ml


@njit(cache=True, nogil=True, parallel=True)
def _rows_q4_k(w, out):
    _rows_k_scale_min(w, out, 144, 16, -1)


@njit(cache=True, nogil=True, parallel=True)
def _rows_q5_k(w, out):
    _rows_k_scale_min(w, out, 176, 48, 16)


@njit(cache=True, nogil=True, parallel=True)
def _rows_q6_k(w, out):
    for r in prange(w.shape[0]):
        row = w[r]
        for b in range(out.shape[1] // 256):
            o = 210 * b
            d = S.load_f16(row, o + 208)
            for e in range(256):
                h, r4, j = e // 128, (e // 32) % 4, e % 32
                ql = B.byte(row, o + 64 * h + 32 * (r4 % 2) + j)
                low = (ql & 0x0F) if r4 < 2 else (ql >> 4)
                high = (B.byte(row, o + 128 + 32 * h + j) >> (2 * r4)) & 3
                sc = B.byte(row, o + 192 + e // 16)
                dl = d * f32(sc - 256 if sc > 127 else sc)
                out[r, 256 * b + e] = dl * f32((low | (high << 4)) - 32)


@njit
def _f16_exact(row, off):
    """float16 -> float32 keeping a NaN's payload as is (the hardware conversion sets the quiet
    bit; numpy and so gguf-py do not). Only plain F16 tensors need it: scales feed arithmetic,
    which quiets NaNs on both sides."""
    h = B.byte(row, off) | (B.byte(row, off + 1) << 8)
    if (h & 0x7C00) == 0x7C00 and (h & 0x03FF) != 0:
        bits = np.uint32(((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x03FF) << 13))
        return S.bits_to_f32(bits)
    return S.load_f16(row, off)


@njit(cache=True, nogil=True, parallel=True)
def _rows_f16(w, out):
    for r in prange(w.shape[0]):
        for i in range(out.shape[1]):
            out[r, i] = _f16_exact(w[r], 2 * i)


@njit(cache=True, nogil=True, parallel=True)
def _rows_bf16(w, out):
    for r in prange(w.shape[0]):
        for i in range(out.shape[1]):
            out[r, i] = S.load_bf16(w[r], 2 * i)


@njit(cache=True, nogil=True, parallel=True)
def _rows_f32(w, out):
    for r in prange(w.shape[0]):
        for i in range(out.shape[1]):
            out[r, i] = S.load_f32(w[r], 4 * i)


@njit(cache=True, nogil=True, parallel=True)
def _rows_iq4_nl(w, out):
    _rows_nibble_table(w, out, _IQ4_NL)


_ROWS = {
    QType.F32: _rows_f32, QType.F16: _rows_f16, QType.BF16: _rows_bf16,
    QType.Q8_0: _rows_q8_0, QType.Q4_0: _rows_q4_0, QType.Q4_1: _rows_q4_1,
    QType.Q5_0: _rows_q5_0, QType.Q5_1: _rows_q5_1, QType.IQ4_NL: _rows_iq4_nl,
    QType.Q2_K: _rows_q2_k, QType.Q3_K: _rows_q3_k, QType.Q4_K: _rows_q4_k,
    QType.Q5_K: _rows_q5_k, QType.Q6_K: _rows_q6_k,
}


def dequantize(w: np.ndarray, qtype: QType) -> np.ndarray:
    """uint8 [..., row_bytes] in `qtype`'s layout -> float32 [..., k]."""
    raw = np.ascontiguousarray(w).view(np.uint8)
    rows = raw.reshape(-1, raw.shape[-1])
    k = rows.shape[1] // type_size(qtype) * block_size(qtype)
    out = np.empty((rows.shape[0], k), np.float32)
    _ROWS[qtype](rows, out)
    return out.reshape(*raw.shape[:-1], k)
