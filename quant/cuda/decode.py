"""One weight of a GGUF block, decoded on the device: `value_<type>(raw, at, j)` is element j of
the block whose bytes start at raw[at] (raw: the matrix's bytes, uint8, as in the file). Each
mirrors its numpy reference in `quant.formats` (the same products in float32, so the same
values), and a matmul or an embedding lookup calls the one of its weight's type (`VALUE`).
"""

from __future__ import annotations

import numpy as np

from llmx.quant.cpu.simd import IQ4_NL_VALUES
from llmx.quant.cuda.device import device_function, f16_value, f32, f32_from_bits, i32, u32
from llmx.quant.qtypes import QType

_IQ4_NL = np.array(IQ4_NL_VALUES, np.float32)


@device_function
def _f16(raw, at):
    return f16_value(raw[at], raw[at + 1])


@device_function
def _nibble(raw, at, j):
    """Element j of 32 stored as 16 bytes of nibbles (low: 0..15, high: 16..31)."""
    byte = i32(raw[at + (j & 15)])
    return (byte >> 4) if j >= 16 else (byte & 15)


@device_function
def _u32(raw, at):
    return u32(raw[at]) | (u32(raw[at + 1]) << 8) | (u32(raw[at + 2]) << 16) | (u32(raw[at + 3]) << 24)


@device_function
def value_f32(raw, at, j):
    return f32_from_bits(_u32(raw, at))


@device_function
def value_f16(raw, at, j):
    return _f16(raw, at)


@device_function
def value_bf16(raw, at, j):
    return f32_from_bits((u32(raw[at]) << 16) | (u32(raw[at + 1]) << 24))


@device_function
def value_q8_0(raw, at, j):
    code = i32(raw[at + 2 + j])
    return _f16(raw, at) * f32(code - 256 if code >= 128 else code)


@device_function
def value_q4_0(raw, at, j):
    return _f16(raw, at) * f32(_nibble(raw, at + 2, j) - 8)


@device_function
def value_q4_1(raw, at, j):
    return _f16(raw, at) * f32(_nibble(raw, at + 4, j)) + _f16(raw, at + 2)


@device_function
def value_q5_0(raw, at, j):
    high = i32((_u32(raw, at + 2) >> j) & 1) << 4
    return _f16(raw, at) * f32((_nibble(raw, at + 6, j) | high) - 16)


@device_function
def value_q5_1(raw, at, j):
    high = i32((_u32(raw, at + 4) >> j) & 1) << 4
    return _f16(raw, at) * f32(_nibble(raw, at + 8, j) | high) + _f16(raw, at + 2)


@device_function
def value_iq4_nl(raw, at, j):
    return _f16(raw, at) * _IQ4_NL[_nibble(raw, at + 2, j)]


@device_function
def _two_bits(raw, at, j):
    """Element j of 256 stored as 2-bit planes: 32 bytes x 4 shifts per 128 elements."""
    w = j & 127
    return (i32(raw[at + (j >> 7) * 32 + (w & 31)]) >> (2 * (w >> 5))) & 3


@device_function
def value_q2_k(raw, at, j):
    sc = i32(raw[at + (j >> 4)])
    return _f16(raw, at + 80) * f32(sc & 15) * f32(_two_bits(raw, at + 16, j)) \
        - _f16(raw, at + 82) * f32(sc >> 4)


@device_function
def _q3_k_scale(raw, at, s):
    """Sub-block s's signed 6-bit scale from Q3_K's 12 bytes at raw[at]."""
    low = (i32(raw[at + (s & 7)]) >> (4 * (s >> 3))) & 15
    high = (i32(raw[at + 8 + (s & 3)]) >> (2 * (s >> 2))) & 3
    return (low | (high << 4)) - 32


@device_function
def value_q3_k(raw, at, j):
    low = _two_bits(raw, at + 32, j)
    high_bit = (i32(raw[at + (j & 31)]) >> (j >> 5)) & 1
    scale = _f16(raw, at + 108) * f32(_q3_k_scale(raw, at + 96, j >> 4))
    return scale * f32(low - (0 if high_bit else 4))


@device_function
def _k_scale_min(raw, at, s):
    """Q4_K/Q5_K: sub-block s's 6-bit (scale, min) from the 12 bytes at raw[at]."""
    if s < 4:
        return i32(raw[at + s]) & 63, i32(raw[at + s + 4]) & 63
    packed = i32(raw[at + s + 4])
    return (packed & 15) | ((i32(raw[at + s - 4]) >> 6) << 4), (packed >> 4) | ((i32(raw[at + s]) >> 6) << 4)


@device_function
def _k_nibble(raw, at, j):
    """Q4_K/Q5_K's code nibble of element j: 32 bytes hold sub-block 2c low, 2c + 1 high."""
    byte = i32(raw[at + (j >> 6) * 32 + (j & 31)])
    return (byte >> 4) if (j >> 5) & 1 else (byte & 15)


@device_function
def value_q4_k(raw, at, j):
    sc, mn = _k_scale_min(raw, at + 4, j >> 5)
    return _f16(raw, at) * f32(sc) * f32(_k_nibble(raw, at + 16, j)) - _f16(raw, at + 2) * f32(mn)


@device_function
def value_q5_k(raw, at, j):
    sc, mn = _k_scale_min(raw, at + 4, j >> 5)
    high = ((i32(raw[at + 16 + (j & 31)]) >> (j >> 5)) & 1) << 4
    code = _k_nibble(raw, at + 48, j) | high
    return _f16(raw, at) * f32(sc) * f32(code) - _f16(raw, at + 2) * f32(mn)


@device_function
def value_q6_k(raw, at, j):
    half, w = j >> 7, j & 127
    quarter, lane = w >> 5, w & 31
    low = (i32(raw[at + half * 64 + (quarter & 1) * 32 + lane]) >> (4 * (quarter >> 1))) & 15
    high = (i32(raw[at + 128 + half * 32 + lane]) >> (2 * quarter)) & 3
    sc = i32(raw[at + 192 + (j >> 4)])
    sc = sc - 256 if sc >= 128 else sc
    return _f16(raw, at + 208) * f32(sc) * f32((low | (high << 4)) - 32)


VALUE = {QType.F32: value_f32, QType.F16: value_f16, QType.BF16: value_bf16, QType.Q8_0: value_q8_0,
         QType.Q4_0: value_q4_0, QType.Q4_1: value_q4_1, QType.Q5_0: value_q5_0, QType.Q5_1: value_q5_1,
         QType.IQ4_NL: value_iq4_nl, QType.Q2_K: value_q2_k, QType.Q3_K: value_q3_k, QType.Q4_K: value_q4_k,
         QType.Q5_K: value_q5_k, QType.Q6_K: value_q6_k}
