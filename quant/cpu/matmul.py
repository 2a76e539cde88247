"""Fused quantized matmuls: out[t, r] = sum_k x[t, k] * W[r, k] for W in its GGUF block format.

Activations are quantized once per call to the type llama.cpp pairs with the weights (see
`quant.activations`), then every weight block is dotted with integer arithmetic (`simd.dot_*`)
and scaled in float. Rows go four at a time (each activation block is loaded once for four rows)
and row groups are spread over threads with `prange`. Each block step also prefetches the bytes
of the row group two groups ahead: four interleaved row streams defeat the hardware prefetcher
here (the Q8_0 kernel read 7 GB/s on one thread without this, 41 GB/s with it).

Kernel arguments, all kernels alike:
    xq   int8 [n_tok * k]       activation codes, flattened
    xd   float32 [n_tok, nb]    activation block scales
    xs   per-type block sums    (Q8_1: float32 [n_tok, k / 32]; Q8_K: int32 [n_tok, k / 16])
    w    uint8 [m * row_bytes]  the weight rows, flattened
    out  float32 [n_tok, m]
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import blocks as B
from llmx.quant.cpu import simd as S

GROUP = 4  # rows per pass
AHEAD = 2  # row groups prefetched ahead


@njit
def _prefetch_group(w, base, step, step_bytes):
    for p in range(0, step_bytes, 64):
        S.prefetch(w, base + step * step_bytes + p)


@njit
def _row_offsets(r0, m, row_bytes):
    return (r0 * row_bytes, min(r0 + 1, m - 1) * row_bytes,
            min(r0 + 2, m - 1) * row_bytes, min(r0 + 3, m - 1) * row_bytes)


@njit
def _store4(out, t, r0, m, v0, v1, v2, v3):
    out[t, r0] = v0
    if r0 + 1 < m:
        out[t, r0 + 1] = v1
    if r0 + 2 < m:
        out[t, r0 + 2] = v2
    if r0 + 3 < m:
        out[t, r0 + 3] = v3


@njit
def store_sums(out, t, r0, m, n_tok, sums):
    """sums F32x8: [rows r0..r0+3 of token t, the same rows of token t + 1] -> out[t], out[t + 1]."""
    if r0 + GROUP <= m:
        S.store_low4_f32x8(out, 4 * (t * m + r0), sums)
        if t + 1 < n_tok:
            S.store_high4_f32x8(out, 4 * ((t + 1) * m + r0), sums)
    else:
        c = S.lane_f32x8
        _store4(out, t, r0, m, c(sums, 0), c(sums, 1), c(sums, 2), c(sums, 3))
        if t + 1 < n_tok:
            _store4(out, t + 1, r0, m, c(sums, 4), c(sums, 5), c(sums, 6), c(sums, 7))


# -- the loop nest shared by every integer kernel --------------------------------------------
# A `block` function handles one weight block of one row against one token:
#     block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb) -> (acc, corr)
# accumulating vector partial sums in `acc` and a scalar correction in `corr`; the output is
# hsum(acc) + corr. Tiles of 4 rows x 4 tokens call it 16 times per block step: the weight decode
# (and the activation loads) are the same expressions on the same bytes, which LLVM computes once,
# so each block is unpacked once for four tokens.


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _tile_1(isa, block, w, o0, o1, o2, o3, xq, xd, xs, t, nb, block_bytes, ahead):
    a0 = S.zero_f32x8()
    a1 = S.zero_f32x8()
    a2 = S.zero_f32x8()
    a3 = S.zero_f32x8()
    c0 = c1 = c2 = c3 = np.float32(0)
    for b in range(nb):
        _prefetch_group(w, ahead, b, GROUP * block_bytes)
        o = b * block_bytes
        a0, c0 = block(isa, a0, c0, w, o0 + o, xq, xd, xs, t, b, nb)
        a1, c1 = block(isa, a1, c1, w, o1 + o, xq, xd, xs, t, b, nb)
        a2, c2 = block(isa, a2, c2, w, o2 + o, xq, xd, xs, t, b, nb)
        a3, c3 = block(isa, a3, c3, w, o3 + o, xq, xd, xs, t, b, nb)
    return S.hsum_f32x8(a0) + c0, S.hsum_f32x8(a1) + c1, S.hsum_f32x8(a2) + c2, S.hsum_f32x8(a3) + c3


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _column_4(isa, block, w, off, xq, xd, xs, t, b, nb, a0, a1, a2, a3, c0, c1, c2, c3):
    """One weight row's block against tokens t..t+3."""
    a0, c0 = block(isa, a0, c0, w, off, xq, xd, xs, t, b, nb)
    a1, c1 = block(isa, a1, c1, w, off, xq, xd, xs, t + 1, b, nb)
    a2, c2 = block(isa, a2, c2, w, off, xq, xd, xs, t + 2, b, nb)
    a3, c3 = block(isa, a3, c3, w, off, xq, xd, xs, t + 3, b, nb)
    return a0, a1, a2, a3, c0, c1, c2, c3


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _tile_4(isa, block, w, o0, o1, o2, o3, xq, xd, xs, t, nb, block_bytes, ahead, out, r0, m):
    z = S.zero_f32x8()
    f = np.float32(0)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = f
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = f
    for b in range(nb):
        _prefetch_group(w, ahead, b, GROUP * block_bytes)
        o = b * block_bytes
        a00, a01, a02, a03, c00, c01, c02, c03 = _column_4(
            isa, block, w, o0 + o, xq, xd, xs, t, b, nb, a00, a01, a02, a03, c00, c01, c02, c03)
        a10, a11, a12, a13, c10, c11, c12, c13 = _column_4(
            isa, block, w, o1 + o, xq, xd, xs, t, b, nb, a10, a11, a12, a13, c10, c11, c12, c13)
        a20, a21, a22, a23, c20, c21, c22, c23 = _column_4(
            isa, block, w, o2 + o, xq, xd, xs, t, b, nb, a20, a21, a22, a23, c20, c21, c22, c23)
        a30, a31, a32, a33, c30, c31, c32, c33 = _column_4(
            isa, block, w, o3 + o, xq, xd, xs, t, b, nb, a30, a31, a32, a33, c30, c31, c32, c33)
    h = S.hsum_f32x8
    _store4(out, t, r0, m, h(a00) + c00, h(a10) + c10, h(a20) + c20, h(a30) + c30)
    _store4(out, t + 1, r0, m, h(a01) + c01, h(a11) + c11, h(a21) + c21, h(a31) + c31)
    _store4(out, t + 2, r0, m, h(a02) + c02, h(a12) + c12, h(a22) + c22, h(a32) + c32)
    _store4(out, t + 3, r0, m, h(a03) + c03, h(a13) + c13, h(a23) + c23, h(a33) + c33)


@njit(inline="always")
def _matmul(xq, xd, xs, w, row_bytes, m, out, isa, block, block_bytes):
    """Tiles of 4 rows x 1 token: every token re-reads the row group's blocks (from L1)."""
    n_tok, nb = xd.shape
    for g in prange((m + GROUP - 1) // GROUP):
        r0 = g * GROUP
        o0, o1, o2, o3 = _row_offsets(r0, m, row_bytes)
        ahead = (r0 + AHEAD * GROUP) * row_bytes
        for t in range(n_tok):
            v0, v1, v2, v3 = _tile_1(isa, block, w, o0, o1, o2, o3, xq, xd, xs, t, nb, block_bytes, ahead)
            _store4(out, t, r0, m, v0, v1, v2, v3)


@njit(inline="always")
def _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, block, block_bytes):
    """Tiles of 4 rows x 4 tokens, then 4 x 1 for the leftover tokens. Only for small block
    bodies: 16 inlined copies of a k-quant block cost LLVM most of a minute per kernel."""
    n_tok, nb = xd.shape
    for g in prange((m + GROUP - 1) // GROUP):
        r0 = g * GROUP
        o0, o1, o2, o3 = _row_offsets(r0, m, row_bytes)
        ahead = (r0 + AHEAD * GROUP) * row_bytes
        t = 0
        while t + 4 <= n_tok:
            _tile_4(isa, block, w, o0, o1, o2, o3, xq, xd, xs, t, nb, block_bytes, ahead, out, r0, m)
            t += 4
        while t < n_tok:
            v0, v1, v2, v3 = _tile_1(isa, block, w, o0, o1, o2, o3, xq, xd, xs, t, nb, block_bytes, ahead)
            _store4(out, t, r0, m, v0, v1, v2, v3)
            t += 1


# -- Q8_0 activations: Q8_0, Q4_0, Q5_0 weights -----------------------------------------


@njit
def _q8_0_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    xv = S.load_i8x32(xq, (t * nb + b) * 32)
    scale = S.load_f16(w, off) * xd[t, b]
    return S.fma_f32x8(acc, S.dot_i8x32(isa, S.load_i8x32(w, off + 2), xv), scale), corr


# Q4_0 and Q5_0 codes are stored + 8 / + 16. The dot takes the stored (unsigned) codes in one
# vpdpbusd that starts from xs = -8 or -16 times the activations' sums per lane (4 values): the
# same integers as centring the codes first, without the sign juggling a signed x signed dot needs.
#     xs  int32 [n_tok, nb * 8]


@njit
def _offset_dot(isa, codes, xq, xs, t, b, nb):
    at = (t * nb + b) * 32
    return S.dot_u8i8_acc_i32x8(isa, S.load_i32x8(xs, at), codes, S.load_i8x32(xq, at))


@njit
def _q8_0_unsigned_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    """VNNI only (vpdpbusd does not saturate): xq holds x + 128 as unsigned bytes, and the dot
    starts from -128 x the weights' sums per lane: the integers of x . w, with no per-token sign
    juggling (the weight sums are computed once per row for a tile of four tokens)."""
    wv = S.load_i8x32(w, off + 2)
    dot = S.dot_u8i8_acc_i32x8(isa, S.neg_sums128_i32x8(wv), S.load_i8x32(xq, (t * nb + b) * 32), wv)
    return S.fma_f32x8(acc, dot, S.load_f16(w, off) * xd[t, b]), corr


@njit
def _q4_0_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    dot = _offset_dot(isa, S.load_nibbles_i8x32(w, off + 2), xq, xs, t, b, nb)
    return S.fma_f32x8(acc, dot, S.load_f16(w, off) * xd[t, b]), corr


@njit
def _q5_0_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    codes = S.or_i8x32(S.load_nibbles_i8x32(w, off + 6), S.bits_i8x32(S.load_u32(w, off + 2), 16))
    dot = _offset_dot(isa, codes, xq, xs, t, b, nb)
    return S.fma_f32x8(acc, dot, S.load_f16(w, off) * xd[t, b]), corr


@njit
def _iq4_nl_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    xv = S.load_i8x32(xq, (t * nb + b) * 32)
    codes = S.iq4_nl_i8x32(isa, S.load_nibbles_i8x32(w, off + 2))
    return S.fma_f32x8(acc, S.dot_i8x32(isa, codes, xv), S.load_f16(w, off) * xd[t, b]), corr


# -- Q8_1 activations: Q4_1, Q5_1 weights (unsigned codes plus a per-block min) ----------


@njit
def _q4_1_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    xv = S.load_i8x32(xq, (t * nb + b) * 32)
    dot = S.dot_u8i8x32(isa, S.load_nibbles_i8x32(w, off + 4), xv)
    return S.fma_f32x8(acc, dot, S.load_f16(w, off) * xd[t, b]), corr + S.load_f16(w, off + 2) * xs[t, b]


@njit
def _q5_1_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    xv = S.load_i8x32(xq, (t * nb + b) * 32)
    codes = S.or_i8x32(S.load_nibbles_i8x32(w, off + 8), S.bits_i8x32(S.load_u32(w, off + 4), 16))
    dot = S.dot_u8i8x32(isa, codes, xv)
    return S.fma_f32x8(acc, dot, S.load_f16(w, off) * xd[t, b]), corr + S.load_f16(w, off + 2) * xs[t, b]


# -- Q8_K activations: k-quants ----------------------------------------------------------
# The `_q*_k_sums` return, for one 256-element super-block, the integer dot with the sub-block
# scales applied (8 x i32) and an integer correction (the mins, or the stored code offset).


@njit(inline="always")
def _pair_sums(bs, bo, c):
    """Sums of activation codes of the two 32-element sub-blocks 2c and 2c + 1."""
    return bs[bo + 4 * c] + bs[bo + 4 * c + 1], bs[bo + 4 * c + 2] + bs[bo + 4 * c + 3]


# Unpacking of one super-block's codes (shared with `kmatmul`'s decoders). Q4_K/Q5_K: 32 bytes
# group c holds sub-blocks 2c (low nibbles) and 2c + 1 (high); Q2_K/Q3_K/Q6_K: step (h, r) holds
# values 128h + 32r .. + 31, two sub-blocks of 16 (j and j + 1, j = 8h + 2r).


@njit(inline="always")
def q4_k_codes(w, off, c):
    """-> codes of sub-blocks 2c and 2c + 1 (0..15), then their scales and mins."""
    packed = S.load_i8x32(w, off + 16 + 32 * c)
    sc_a, mn_a = B.k4_scale_min(w, off + 4, 2 * c)
    sc_b, mn_b = B.k4_scale_min(w, off + 4, 2 * c + 1)
    return S.field_i8x32(packed, 0, 15), S.field_i8x32(packed, 4, 15), sc_a, mn_a, sc_b, mn_b


@njit(inline="always")
def q5_k_codes(w, off, c):
    """-> codes of sub-blocks 2c and 2c + 1 (0..31), then their scales and mins."""
    high = S.load_i8x32(w, off + 16)  # bit p of byte j: fifth bit of element 32p + j
    packed = S.load_i8x32(w, off + 48 + 32 * c)
    sc_a, mn_a = B.k4_scale_min(w, off + 4, 2 * c)
    sc_b, mn_b = B.k4_scale_min(w, off + 4, 2 * c + 1)
    codes_a = S.or_i8x32(S.field_i8x32(packed, 0, 15), S.shl_i8x32(S.field_i8x32(high, 2 * c, 1), 4))
    codes_b = S.or_i8x32(S.field_i8x32(packed, 4, 15), S.shl_i8x32(S.field_i8x32(high, 2 * c + 1, 1), 4))
    return codes_a, codes_b, sc_a, mn_a, sc_b, mn_b


@njit(inline="always")
def q6_k_codes(w, off, h, r):
    """-> 32 codes (0..63, stored + 32) and the signed scales of their two sub-blocks of 16."""
    low = S.field_i8x32(S.load_i8x32(w, off + 64 * h + 32 * (r % 2)), 4 * (r // 2), 15)
    codes = S.or_i8x32(low, S.shl_i8x32(S.field_i8x32(S.load_i8x32(w, off + 128 + 32 * h), 2 * r, 3), 4))
    j = 8 * h + 2 * r
    return codes, B.signed_byte(B.byte(w, off + 192 + j)), B.signed_byte(B.byte(w, off + 193 + j))


@njit(inline="always")
def q3_k_codes(w, off, h, r):
    """-> 32 codes (0..7, stored + 4) and the signed scales of their two sub-blocks of 16."""
    high_bit = S.shl_i8x32(S.field_i8x32(S.load_i8x32(w, off), 4 * h + r, 1), 2)
    codes = S.or_i8x32(S.field_i8x32(S.load_i8x32(w, off + 32 + 32 * h), 2 * r, 3), high_bit)
    j = 8 * h + 2 * r
    return codes, B.q3_k_scale(w, off + 96, j), B.q3_k_scale(w, off + 96, j + 1)


@njit(inline="always")
def q2_k_codes(w, off, h, r):
    """-> 32 codes (0..3) and the packed bytes of their two sub-blocks (scale low nibble, min high)."""
    j = 8 * h + 2 * r
    return S.field_i8x32(S.load_i8x32(w, off + 16 + 32 * h), 2 * r, 3), B.byte(w, off + j), B.byte(w, off + j + 1)


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _q45_k_sums(isa, w, off, xq, xo, bs, bo, codes):
    isum = S.zero_i32x8()
    mins = 0
    for c in range(4):
        codes_a, codes_b, sc_a, mn_a, sc_b, mn_b = codes(w, off, c)
        lo = S.dot_u8i8x32(isa, codes_a, S.load_i8x32(xq, xo + 64 * c))
        hi = S.dot_u8i8x32(isa, codes_b, S.load_i8x32(xq, xo + 64 * c + 32))
        isum = S.add_i32x8(isum, S.add_i32x8(S.scale_i32x8(lo, sc_a, sc_a), S.scale_i32x8(hi, sc_b, sc_b)))
        sum_a, sum_b = _pair_sums(bs, bo, c)
        mins += mn_a * sum_a + mn_b * sum_b
    return isum, mins


@njit(inline="always")
def _q4_k_sums(isa, w, off, xq, xo, bs, bo):
    return _q45_k_sums(isa, w, off, xq, xo, bs, bo, q4_k_codes)


@njit(inline="always")
def _q5_k_sums(isa, w, off, xq, xo, bs, bo):
    return _q45_k_sums(isa, w, off, xq, xo, bs, bo, q5_k_codes)


@njit(inline="always")
def _q6_k_sums(isa, w, off, xq, xo, bs, bo):
    isum = S.zero_i32x8()
    offset_sum = 0  # codes are stored + 32
    for h in range(2):
        for r in range(4):
            codes, sc_a, sc_b = q6_k_codes(w, off, h, r)
            j = 8 * h + 2 * r
            dot = S.dot_u8i8x32(isa, codes, S.load_i8x32(xq, xo + 128 * h + 32 * r))
            isum = S.add_i32x8(isum, S.scale_i32x8(dot, sc_a, sc_b))
            offset_sum += sc_a * bs[bo + j] + sc_b * bs[bo + j + 1]
    return isum, 32 * offset_sum


@njit(inline="always")
def _q3_k_sums(isa, w, off, xq, xo, bs, bo):
    isum = S.zero_i32x8()
    offset_sum = 0  # codes are stored + 4
    for h in range(2):
        for r in range(4):
            codes, sc_a, sc_b = q3_k_codes(w, off, h, r)
            j = 8 * h + 2 * r
            dot = S.dot_u8i8x32(isa, codes, S.load_i8x32(xq, xo + 128 * h + 32 * r))
            isum = S.add_i32x8(isum, S.scale_i32x8(dot, sc_a, sc_b))
            offset_sum += sc_a * bs[bo + j] + sc_b * bs[bo + j + 1]
    return isum, 4 * offset_sum


@njit(inline="always")
def _q2_k_sums(isa, w, off, xq, xo, bs, bo):
    isum = S.zero_i32x8()
    mins = 0
    for h in range(2):
        for r in range(4):
            codes, sa, sb = q2_k_codes(w, off, h, r)
            j = 8 * h + 2 * r
            dot = S.dot_u8i8x32(isa, codes, S.load_i8x32(xq, xo + 128 * h + 32 * r))
            isum = S.add_i32x8(isum, S.scale_i32x8(dot, sa & 0x0F, sb & 0x0F))
            mins += (sa >> 4) * bs[bo + j] + (sb >> 4) * bs[bo + j + 1]
    return isum, mins


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb, sums, d_at, dmin_at):
    """One super-block: d * dx * isum, minus dmin * dx * mins (Q2_K/Q4_K/Q5_K, dmin_at >= 0)
    or minus d * dx * the code offset (Q3_K/Q6_K)."""
    isum, extra = sums(isa, w, off, xq, (t * nb + b) * 256, xs[t], b * 16)
    dx = xd[t, b]
    d = S.load_f16(w, off + d_at) * dx
    scale = S.load_f16(w, off + dmin_at) * dx if dmin_at >= 0 else d
    return S.fma_f32x8(acc, isum, d), corr - scale * np.float32(extra)


@njit(inline="always")
def _q2_k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    return _k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb, _q2_k_sums, 80, 82)


@njit(inline="always")
def _q3_k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    return _k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb, _q3_k_sums, 108, -1)


@njit(inline="always")
def _q4_k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    return _k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb, _q4_k_sums, 0, 2)


@njit(inline="always")
def _q5_k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    return _k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb, _q5_k_sums, 0, 2)


@njit(inline="always")
def _q6_k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb):
    return _k_block(isa, acc, corr, w, off, xq, xd, xs, t, b, nb, _q6_k_sums, 208, -1)


# -- the kernels: one per weight type ------------------------------------------------------


@njit(cache=True, nogil=True, parallel=True)
def matmul_q8_0(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, _q8_0_block, 34)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q8_0_unsigned(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, _q8_0_unsigned_block, 34)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_0(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, _q4_0_block, 18)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q5_0(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, _q5_0_block, 22)


@njit(cache=True, nogil=True, parallel=True)
def matmul_iq4_nl(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, _iq4_nl_block, 18)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_1(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, _q4_1_block, 20)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q5_1(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul_tiled(xq, xd, xs, w, row_bytes, m, out, isa, _q5_1_block, 24)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q2_k(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul(xq, xd, xs, w, row_bytes, m, out, isa, _q2_k_block, 84)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q3_k(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul(xq, xd, xs, w, row_bytes, m, out, isa, _q3_k_block, 110)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q4_k(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul(xq, xd, xs, w, row_bytes, m, out, isa, _q4_k_block, 144)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q5_k(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul(xq, xd, xs, w, row_bytes, m, out, isa, _q5_k_block, 176)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q6_k(xq, xd, xs, w, row_bytes, m, out, isa):
    _matmul(xq, xd, xs, w, row_bytes, m, out, isa, _q6_k_block, 210)


# -- float weights: F32, F16, BF16 ------------------------------------------------------------


@njit
def _load_weights_f32x8(w, off, kind):
    if kind == 0:
        return S.load_f32x8(w, off)
    if kind == 1:
        return S.load_f16x8(w, off)
    return S.load_bf16x8(w, off)


@njit
def _load_weight(w, off, kind):
    if kind == 0:
        return S.load_f32(w, off)
    if kind == 1:
        return S.load_f16(w, off)
    return S.load_bf16(w, off)


@njit(inline="always")
def _matmul_float(x, w, row_bytes, m, out, kind, esize):
    """x float32 [n_tok, k], already rounded to the weights' precision as ggml does."""
    n_tok, k = x.shape
    xf = x.reshape(-1)
    xb = xf.view(np.uint8)
    k8 = k - k % 8
    step = GROUP * 8 * esize
    for g in prange((m + GROUP - 1) // GROUP):
        r0 = g * GROUP
        o0, o1, o2, o3 = _row_offsets(r0, m, row_bytes)
        ahead = (r0 + AHEAD * GROUP) * row_bytes
        for t in range(n_tok):
            a0 = S.zero_f32x8()
            a1 = S.zero_f32x8()
            a2 = S.zero_f32x8()
            a3 = S.zero_f32x8()
            for i in range(0, k8, 8):
                _prefetch_group(w, ahead, i // 8, step)
                xv = S.load_f32x8(xb, (t * k + i) * 4)
                a0 = S.fmadd_f32x8(a0, _load_weights_f32x8(w, o0 + i * esize, kind), xv)
                a1 = S.fmadd_f32x8(a1, _load_weights_f32x8(w, o1 + i * esize, kind), xv)
                a2 = S.fmadd_f32x8(a2, _load_weights_f32x8(w, o2 + i * esize, kind), xv)
                a3 = S.fmadd_f32x8(a3, _load_weights_f32x8(w, o3 + i * esize, kind), xv)
            s0, s1, s2, s3 = S.hsum_f32x8(a0), S.hsum_f32x8(a1), S.hsum_f32x8(a2), S.hsum_f32x8(a3)
            for i in range(k8, k):
                xi = xf[t * k + i]
                s0 += _load_weight(w, o0 + i * esize, kind) * xi
                s1 += _load_weight(w, o1 + i * esize, kind) * xi
                s2 += _load_weight(w, o2 + i * esize, kind) * xi
                s3 += _load_weight(w, o3 + i * esize, kind) * xi
            _store4(out, t, r0, m, s0, s1, s2, s3)


@njit(cache=True, nogil=True, parallel=True)
def matmul_f32(x, w, row_bytes, m, out):
    _matmul_float(x, w, row_bytes, m, out, 0, 4)


@njit(cache=True, nogil=True, parallel=True)
def matmul_f16(x, w, row_bytes, m, out):
    _matmul_float(x, w, row_bytes, m, out, 1, 2)


@njit(cache=True, nogil=True, parallel=True)
def matmul_bf16(x, w, row_bytes, m, out):
    _matmul_float(x, w, row_bytes, m, out, 2, 2)
