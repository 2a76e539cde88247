"""Q4_0 weights repacked at load, and their matmul in llama.cpp's repacked float order.

llama.cpp's CPU backend re-lays out a Q4_0 weight matrix whose row count is a multiple of 8 when
it loads it (its CPU_REPACK buffer, `q4_0_8x8` on x86 with AVX2; not `token_embd`, which it reads
by rows) and multiplies it with `ggml_gemv/gemm_q4_0_8x8_q8_0`. Per (row, token) those take each
block's integer dot whole and accumulate acc = fma(float(block dot), dw * dx, acc) over the blocks
in order: one float step per block, where `vec_dot_q4_0_q8_0` takes one per lane of eight and then
sums the lanes. Here the same arithmetic, with 16 weight rows in the lanes of one vector: per
(16 rows, token, block) eight byte dots, one conversion, one scale product and one FMA.

Packed layout, per group of 16 rows (the last one padded with zero rows), per block: 288 bytes,
    256 bytes  4 vectors of 64; vector i, lane r (4 bytes) = row r's code bytes 4i..4i+3, whose
               low nibbles are the block's values 4i..4i+3 and high nibbles values 16+4i..16+4i+3
     32 bytes  the 16 rows' float16 scales

Kernel arguments:
    xq  int8 [n_tok * k]       the Q8_0 activation codes
    xd  float32 [n_tok * nb]   their block scales
    xs  int32 [n_tok * nb]     -8 x their block sums: where each block dot starts, as the weights'
                               codes are dotted unsigned (stored value = code + 8)
    wp  uint8                  the packed weights, flattened
    out float32 [n_tok, m]
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S
from llmx.quant.cpu.kmatmul import CHUNKS

GROUP_ROWS = 16
Q4_0_BLOCK_BYTES = 18
PACKED_BLOCK_BYTES = 288  # 16 rows x 18 bytes, regrouped
LLAMA_CPP_ROW_MULTIPLE = 8  # llama.cpp repacks only matrices with a multiple of 8 rows


def pack_q4_0(w: np.ndarray) -> np.ndarray:
    """Q4_0 rows uint8 [m, nb * 18] -> the packed layout, uint8 [ceil(m / 16) * nb * 288]."""
    m, row_bytes = w.shape
    nb = row_bytes // Q4_0_BLOCK_BYTES
    groups = -(-m // GROUP_ROWS)
    padded = np.zeros((groups * GROUP_ROWS, nb, Q4_0_BLOCK_BYTES), np.uint8)
    padded[:m] = w.reshape(m, nb, Q4_0_BLOCK_BYTES)
    by_group = padded.reshape(groups, GROUP_ROWS, nb, Q4_0_BLOCK_BYTES)
    codes = by_group[..., 2:].reshape(groups, GROUP_ROWS, nb, 4, 4).transpose(0, 2, 3, 1, 4)  # [g, b, i, r, 4]
    scales = by_group[..., :2].transpose(0, 2, 1, 3)  # [g, b, r, 2]
    packed = np.concatenate([codes.reshape(groups, nb, 256), scales.reshape(groups, nb, 32)], axis=2)
    return packed.reshape(-1)


@njit
def _codes(wp, at):
    """A packed block's 16 x 32 codes (stored, 0..15) as 8 vectors: vector c, lane r = row r's
    values 4c..4c+3."""
    v0, v1, v2, v3 = S.load_i8x64(wp, at), S.load_i8x64(wp, at + 64), S.load_i8x64(wp, at + 128), \
        S.load_i8x64(wp, at + 192)
    return (S.nibbles_i8x64(v0, 0), S.nibbles_i8x64(v1, 0), S.nibbles_i8x64(v2, 0), S.nibbles_i8x64(v3, 0),
            S.nibbles_i8x64(v0, 1), S.nibbles_i8x64(v1, 1), S.nibbles_i8x64(v2, 1), S.nibbles_i8x64(v3, 1))


@njit
def _step(isa, c, dw, xq, xd, xs, i, acc):
    """acc + float(the 16 rows' block dots with activation block i) x (dw x dx), one rounding."""
    at = 32 * i
    dot = S.splat_i32x16(xs[i])
    dot = S.dot16_u8i8_acc(isa, dot, c[0], S.splat_u32_i8x64(xq, at))
    dot = S.dot16_u8i8_acc(isa, dot, c[1], S.splat_u32_i8x64(xq, at + 4))
    dot = S.dot16_u8i8_acc(isa, dot, c[2], S.splat_u32_i8x64(xq, at + 8))
    dot = S.dot16_u8i8_acc(isa, dot, c[3], S.splat_u32_i8x64(xq, at + 12))
    dot = S.dot16_u8i8_acc(isa, dot, c[4], S.splat_u32_i8x64(xq, at + 16))
    dot = S.dot16_u8i8_acc(isa, dot, c[5], S.splat_u32_i8x64(xq, at + 20))
    dot = S.dot16_u8i8_acc(isa, dot, c[6], S.splat_u32_i8x64(xq, at + 24))
    dot = S.dot16_u8i8_acc(isa, dot, c[7], S.splat_u32_i8x64(xq, at + 28))
    return S.fma_f32x16(acc, dot, S.scale_f32x16(dw, xd[i]))


@njit
def _store(out, t, r0, m, acc, spill):
    """Rows r0..r0+15 of token t's output (fewer in a padded last group)."""
    if r0 + GROUP_ROWS <= m:
        S.store_f32x16(out, 4 * (t * m + r0), acc)
    else:
        S.store_f32x16(spill, 0, acc)
        out[t * m + r0:t * m + m] = spill[:m - r0]


@njit
def _tile_4(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    """16 rows x tokens t..t+3: each block's codes unpacked once for four tokens."""
    a0 = a1 = a2 = a3 = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * PACKED_BLOCK_BYTES
        c = _codes(wp, at)
        dw = S.load_f16_f32x16(wp, at + 256)
        a0 = _step(isa, c, dw, xq, xd, xs, t * nb + b, a0)
        a1 = _step(isa, c, dw, xq, xd, xs, (t + 1) * nb + b, a1)
        a2 = _step(isa, c, dw, xq, xd, xs, (t + 2) * nb + b, a2)
        a3 = _step(isa, c, dw, xq, xd, xs, (t + 3) * nb + b, a3)
    _store(out, t, r0, m, a0, spill)
    _store(out, t + 1, r0, m, a1, spill)
    _store(out, t + 2, r0, m, a2, spill)
    _store(out, t + 3, r0, m, a3, spill)


@njit
def _tile_1(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    acc = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * PACKED_BLOCK_BYTES
        acc = _step(isa, _codes(wp, at), S.load_f16_f32x16(wp, at + 256), xq, xd, xs, t * nb + b, acc)
    _store(out, t, r0, m, acc, spill)


@njit(cache=True, nogil=True, parallel=True)
def repacked_q4_0(xq, xd, xs, wp, nb, m, n_tok, out, isa):
    n_groups = -(-m // GROUP_ROWS)
    n_chunks = min(CHUNKS, n_groups)
    flat_out = out.reshape(-1)
    for chunk in prange(n_chunks):
        spill = np.empty(GROUP_ROWS, np.float32)
        for g in range(chunk * n_groups // n_chunks, (chunk + 1) * n_groups // n_chunks):
            g_at = g * nb * PACKED_BLOCK_BYTES
            t = 0
            while t + 4 <= n_tok:
                _tile_4(isa, wp, g_at, nb, xq, xd, xs, t, flat_out, g * GROUP_ROWS, m, spill)
                t += 4
            while t < n_tok:
                _tile_1(isa, wp, g_at, nb, xq, xd, xs, t, flat_out, g * GROUP_ROWS, m, spill)
                t += 1
