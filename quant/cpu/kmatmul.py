"""K-quant matmuls for several tokens: each weight row is decoded once, to int16, then reused by
every token, with the same result, bit for bit, as the one-token kernels.

The one-token kernels (`matmul.matmul_q4_k`, ...) unpack each super-block for each token, and
apply the sub-block scales to every partial dot product; with 16 tokens that unpacking is most of
the work. Here a group of 4 weight rows is first decoded into an L1-sized scratch of int16 values
`scale * code`, the sub-block scales folded in, so a super-block's dot product with a token is 16
`vpdpwssd` (or `vpmaddwd` + `vpaddd`) over 256 int16 pairs. The values are stored in
`simd.CHUNK_ORDER`, and the activations too, so each of the 8 integer lanes holds exactly the sum
that lane holds in the one-token kernel; the integer correction (the mins, or Q3_K/Q6_K's code
offset, times the activations' sums per 16) is the same integer, reduced for 8 (row, token) pairs
at once; and the float steps are the one-token kernel's, in its order:
    acc = fma(float(isum), d * dx, acc);  corr = corr - (dmin * dx) * float(extra);  hsum(acc) + corr

Kernel arguments:
    x16  int16 [n_tok * k]          activation codes (Q8_K), widened, in CHUNK_ORDER
    xd   float32 [n_tok, nb]        activation super-block scales
    bs16 int16 [n_tok * k / 16]     activation sums per 16 values
    w    uint8 [m * row_bytes]      the weight rows, flattened
    out  float32 [n_tok, m]
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import matmul as M
from llmx.quant.cpu import simd as S
from llmx.quant.cpu.matmul import GROUP, _row_offsets, _store4, store_sums

QK = 256  # values per super-block
CHUNKS = 64  # prange iterations; each allocates its scratch once and walks its share of row groups


# -- decoders: one super-block at `off` of row r, block b -> the scratch of its row group ----------
#   w16   int16 [4 * nb * 256]    scale * code, in CHUNK_ORDER (at byte `wp`)
#   extra int16 [4 * nb * 16]     per 16 values: the min (Q2/4/5_K) or offset * scale (Q3/6_K) (at `ei`)
#   d, dc float32 [nb * 4]        the super-block scale, and the correction's (dmin, or d) (at `si`)


@njit
def _store_32(w16, at, codes, scale_a, scale_b):
    """32 codes (bytes) -> 32 int16 in CHUNK_ORDER, the first 16 values scaled by scale_a, the rest by scale_b."""
    ordered = S.chunk_order_i8x32(codes)
    S.store_i16x16(w16, at, S.scale_codes_i16x16(S.widen_i16x16(ordered, 0), scale_a, scale_b))
    S.store_i16x16(w16, at + 32, S.scale_codes_i16x16(S.widen_i16x16(ordered, 1), scale_a, scale_b))


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _decode_q45_k(w, off, w16, wp, extra, ei, d, dc, si, codes):
    d[si] = S.load_f16(w, off)
    dc[si] = S.load_f16(w, off + 2)
    for c in range(4):
        codes_a, codes_b, sc_a, mn_a, sc_b, mn_b = codes(w, off, c)
        _store_32(w16, wp + 128 * c, codes_a, sc_a, sc_a)
        _store_32(w16, wp + 128 * c + 64, codes_b, sc_b, sc_b)
        extra[ei + 4 * c] = extra[ei + 4 * c + 1] = mn_a
        extra[ei + 4 * c + 2] = extra[ei + 4 * c + 3] = mn_b


@njit
def _decode_q4_k(w, off, w16, wp, extra, ei, d, dc, si):
    _decode_q45_k(w, off, w16, wp, extra, ei, d, dc, si, M.q4_k_codes)


@njit
def _decode_q5_k(w, off, w16, wp, extra, ei, d, dc, si):
    _decode_q45_k(w, off, w16, wp, extra, ei, d, dc, si, M.q5_k_codes)


@njit
def _decode_q6_k(w, off, w16, wp, extra, ei, d, dc, si):
    d[si] = dc[si] = S.load_f16(w, off + 208)
    for h in range(2):
        for r in range(4):
            codes, sc_a, sc_b = M.q6_k_codes(w, off, h, r)
            _store_32(w16, wp + 2 * (128 * h + 32 * r), codes, sc_a, sc_b)
            j = 8 * h + 2 * r
            extra[ei + j], extra[ei + j + 1] = 32 * sc_a, 32 * sc_b  # codes are stored + 32


@njit
def _decode_q3_k(w, off, w16, wp, extra, ei, d, dc, si):
    d[si] = dc[si] = S.load_f16(w, off + 108)
    for h in range(2):
        for r in range(4):
            codes, sc_a, sc_b = M.q3_k_codes(w, off, h, r)
            _store_32(w16, wp + 2 * (128 * h + 32 * r), codes, sc_a, sc_b)
            j = 8 * h + 2 * r
            extra[ei + j], extra[ei + j + 1] = 4 * sc_a, 4 * sc_b  # codes are stored + 4


@njit
def _decode_q2_k(w, off, w16, wp, extra, ei, d, dc, si):
    d[si] = S.load_f16(w, off + 80)
    dc[si] = S.load_f16(w, off + 82)
    for h in range(2):
        for r in range(4):
            codes, sa, sb = M.q2_k_codes(w, off, h, r)
            _store_32(w16, wp + 2 * (128 * h + 32 * r), codes, sa & 0x0F, sb & 0x0F)
            j = 8 * h + 2 * r
            extra[ei + j], extra[ei + j + 1] = sa >> 4, sb >> 4


# -- the loop nest --------------------------------------------------------------------------------


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _decode_group(decode, w, offsets, nb, block_bytes, w16, extra, d, dc):
    for r in range(GROUP):
        for b in range(nb):
            i = r * nb + b
            decode(w, offsets[r] + b * block_bytes, w16, i * 2 * QK, extra, i * 16, d, dc, b * GROUP + r)


@njit
def _extra_dot(isa, extra, bs16, r, b, t, nb):
    """The integer correction's 16 products for row r's super-block b and token t, in 8 lanes."""
    weights = S.load_i16x16(extra, (r * nb + b) * 32)
    return S.dot_i16x16(isa, S.zero_i32x8(), weights, S.load_i16x16(bs16, (t * nb + b) * 32))


@njit
def _tile(isa, x16, xd, bs16, w16, extra, d, dc, t0, t1, nb):
    """4 decoded rows x tokens t0, t1 -> 8 float32x8 sums (rows major) and their 8 corrections."""
    k = nb * QK
    z = S.zero_f32x8()
    f00 = f01 = f10 = f11 = f20 = f21 = f30 = f31 = corr = z
    for b in range(nb):
        zi = S.zero_i32x8()
        i00 = i01 = i10 = i11 = i20 = i21 = i30 = i31 = zi
        xa, xb = (t0 * k + b * QK) * 2, (t1 * k + b * QK) * 2
        wo = b * QK * 2
        for c in range(0, 2 * QK, 32):  # 16 values per step
            va, vb = S.load_i16x16(x16, xa + c), S.load_i16x16(x16, xb + c)
            w0 = S.load_i16x16(w16, wo + c)
            w1 = S.load_i16x16(w16, wo + 2 * k + c)
            w2 = S.load_i16x16(w16, wo + 4 * k + c)
            w3 = S.load_i16x16(w16, wo + 6 * k + c)
            i00, i01 = S.dot_i16x16(isa, i00, w0, va), S.dot_i16x16(isa, i01, w0, vb)
            i10, i11 = S.dot_i16x16(isa, i10, w1, va), S.dot_i16x16(isa, i11, w1, vb)
            i20, i21 = S.dot_i16x16(isa, i20, w2, va), S.dot_i16x16(isa, i21, w2, vb)
            i30, i31 = S.dot_i16x16(isa, i30, w3, va), S.dot_i16x16(isa, i31, w3, vb)
        da, db = xd[t0, b], xd[t1, b]
        s = b * GROUP
        f00, f01 = S.fma_f32x8(f00, i00, d[s] * da), S.fma_f32x8(f01, i01, d[s] * db)
        f10, f11 = S.fma_f32x8(f10, i10, d[s + 1] * da), S.fma_f32x8(f11, i11, d[s + 1] * db)
        f20, f21 = S.fma_f32x8(f20, i20, d[s + 2] * da), S.fma_f32x8(f21, i21, d[s + 2] * db)
        f30, f31 = S.fma_f32x8(f30, i30, d[s + 3] * da), S.fma_f32x8(f31, i31, d[s + 3] * db)
        extras = S.hsum8_i32x8(
            _extra_dot(isa, extra, bs16, 0, b, t0, nb), _extra_dot(isa, extra, bs16, 0, b, t1, nb),
            _extra_dot(isa, extra, bs16, 1, b, t0, nb), _extra_dot(isa, extra, bs16, 1, b, t1, nb),
            _extra_dot(isa, extra, bs16, 2, b, t0, nb), _extra_dot(isa, extra, bs16, 2, b, t1, nb),
            _extra_dot(isa, extra, bs16, 3, b, t0, nb), _extra_dot(isa, extra, bs16, 3, b, t1, nb))
        corr = S.sub_scaled_f32x8(corr, S.pair_scales_f32x8(dc, s * 4, da, db), extras)
    return f00, f01, f10, f11, f20, f21, f30, f31, corr


@njit(inline="always")
def _kmatmul(x16, xd, bs16, w, row_bytes, m, out, isa, decode, block_bytes):
    n_tok, nb = xd.shape
    n_groups = (m + GROUP - 1) // GROUP
    n_chunks = min(CHUNKS, n_groups)
    h, c = S.hsum_f32x8, S.lane_f32x8
    for chunk in prange(n_chunks):
        w16 = np.empty(GROUP * nb * QK, np.int16)
        extra = np.empty(GROUP * nb * 16, np.int16)
        d = np.empty(GROUP * nb, np.float32)
        dc = np.empty(GROUP * nb, np.float32)
        for g in range(chunk * n_groups // n_chunks, (chunk + 1) * n_groups // n_chunks):
            r0 = g * GROUP
            _decode_group(decode, w, _row_offsets(r0, m, row_bytes), nb, block_bytes, w16, extra, d, dc)
            for t in range(0, n_tok, 2):
                t1 = min(t + 1, n_tok - 1)
                f00, f01, f10, f11, f20, f21, f30, f31, k = _tile(isa, x16, xd, bs16, w16, extra, d, dc, t, t1, nb)
                _store4(out, t, r0, m, h(f00) + c(k, 0), h(f10) + c(k, 2), h(f20) + c(k, 4), h(f30) + c(k, 6))
                if t + 1 < n_tok:
                    _store4(out, t + 1, r0, m, h(f01) + c(k, 1), h(f11) + c(k, 3), h(f21) + c(k, 5), h(f31) + c(k, 7))


# -- AVX-512: two tokens per 512-bit register ---------------------------------------------------
# The same tile over pairs of tokens: each decoded weight vector is loaded into both halves of a
# 512-bit register and dotted with two tokens' activations side by side (the caller's pair layout,
# as in `pairmatmul`), so one `vpdpwssd` does the work of two. Each half holds what the 256-bit
# tile's vector holds for its token, lane for lane: the same bits.
#     x16p int16 [n_pairs * nb * 16 * 2 * 16]   16 values of token 2p, then 16 of 2p + 1, ...
#     xdp  float32 [n_pairs * nb * 2]            the super-block scales of tokens 2p, 2p + 1
#     bs16p int16 [n_pairs * nb * 2 * 16]        the activation sums per 16 values, pairs side by side
# Many tokens (a prompt) go in blocks of PAIR_BLOCK pairs, each block against every row group: the
# int16 activations of 512 tokens (2 MB at k = 2048) would be re-read from L3 by every row group;
# a block's stay in L2, and decoding the rows once per block costs less.
PAIR_BLOCK = 64


@njit
def _corrections(extra, bs16p, dc, b, nb, p, da, db, corr):
    """Pair p's integer corrections for the 4 rows' super-block b (16 products each, both tokens in
    one 512-bit dot per row), reduced to [rows of token 2p, rows of token 2p + 1], then scaled and
    taken from corr (same layout) as the 256-bit tile does, lane by lane."""
    sums = S.load_i16x32(bs16p, (p * nb + b) * 64)
    z = S.zero_i32x16()
    e0 = S.dot_i16x32(z, S.load_twice_i16x32(extra, b * 32), sums)
    e1 = S.dot_i16x32(z, S.load_twice_i16x32(extra, (nb + b) * 32), sums)
    e2 = S.dot_i16x32(z, S.load_twice_i16x32(extra, (2 * nb + b) * 32), sums)
    e3 = S.dot_i16x32(z, S.load_twice_i16x32(extra, (3 * nb + b) * 32), sums)
    extras = S.hsum_halves_i32x16(e0, e1, e2, e3)
    return S.sub_scaled_f32x8(corr, S.rows_pair_scales_f32x8(dc, b * GROUP * 4, da, db), extras)


@njit
def _pair_tile(x16p, xdp, xd, bs16p, w16, extra, d, dc, p0, p1, nb, n_tok):
    """4 decoded rows x pairs p0, p1 -> 8 float32x16 sums (rows major, pair p0 first) and the two
    pairs' corrections (8 lanes each: row r, token 2p + j at lane 2r + j)."""
    k = nb * QK
    z = S.zero_f32x16()
    f00 = f01 = f10 = f11 = f20 = f21 = f30 = f31 = z
    corr0 = corr1 = S.zero_f32x8()
    t00, t01 = 2 * p0, min(2 * p0 + 1, n_tok - 1)
    t10, t11 = 2 * p1, min(2 * p1 + 1, n_tok - 1)
    for b in range(nb):
        zi = S.zero_i32x16()
        i00 = i01 = i10 = i11 = i20 = i21 = i30 = i31 = zi
        xa, xb = (p0 * nb + b) * 16 * 64, (p1 * nb + b) * 16 * 64
        wo = b * QK * 2
        for c in range(16):  # 16 values of each token per step
            va, vb = S.load_i16x32(x16p, xa + 64 * c), S.load_i16x32(x16p, xb + 64 * c)
            w0 = S.load_twice_i16x32(w16, wo + 32 * c)
            w1 = S.load_twice_i16x32(w16, wo + 2 * k + 32 * c)
            w2 = S.load_twice_i16x32(w16, wo + 4 * k + 32 * c)
            w3 = S.load_twice_i16x32(w16, wo + 6 * k + 32 * c)
            i00, i01 = S.dot_i16x32(i00, w0, va), S.dot_i16x32(i01, w0, vb)
            i10, i11 = S.dot_i16x32(i10, w1, va), S.dot_i16x32(i11, w1, vb)
            i20, i21 = S.dot_i16x32(i20, w2, va), S.dot_i16x32(i21, w2, vb)
            i30, i31 = S.dot_i16x32(i30, w3, va), S.dot_i16x32(i31, w3, vb)
        sa, sb = S.load_pair_f32x16(xdp, (p0 * nb + b) * 8), S.load_pair_f32x16(xdp, (p1 * nb + b) * 8)
        s = b * GROUP
        f00, f01 = S.fma_f32x16(f00, i00, S.scale_f32x16(sa, d[s])), S.fma_f32x16(f01, i01, S.scale_f32x16(sb, d[s]))
        f10 = S.fma_f32x16(f10, i10, S.scale_f32x16(sa, d[s + 1]))
        f11 = S.fma_f32x16(f11, i11, S.scale_f32x16(sb, d[s + 1]))
        f20 = S.fma_f32x16(f20, i20, S.scale_f32x16(sa, d[s + 2]))
        f21 = S.fma_f32x16(f21, i21, S.scale_f32x16(sb, d[s + 2]))
        f30 = S.fma_f32x16(f30, i30, S.scale_f32x16(sa, d[s + 3]))
        f31 = S.fma_f32x16(f31, i31, S.scale_f32x16(sb, d[s + 3]))
        corr0 = _corrections(extra, bs16p, dc, b, nb, p0, xd[t00, b], xd[t01, b], corr0)
        corr1 = _corrections(extra, bs16p, dc, b, nb, p1, xd[t10, b], xd[t11, b], corr1)
    return f00, f01, f10, f11, f20, f21, f30, f31, corr0, corr1


@njit
def _rows_scaled(f0, f1, f2, f3, i0, i1, i2, i3, sx, d, s):
    """Four rows' float sums gain float(ints) x (d_row x dx), the pair's dx in sx."""
    return (S.fma_f32x16(f0, i0, S.scale_f32x16(sx, d[s])), S.fma_f32x16(f1, i1, S.scale_f32x16(sx, d[s + 1])),
            S.fma_f32x16(f2, i2, S.scale_f32x16(sx, d[s + 2])), S.fma_f32x16(f3, i3, S.scale_f32x16(sx, d[s + 3])))


@njit
def _pair_tile_4(x16p, xdp, xd, bs16p, w16, extra, d, dc, p, nb):
    """`_pair_tile` for pairs p..p+3 (all real): each decoded weight vector loaded once for 8 tokens.
    Returns 16 float32x16 sums (pair major, then rows), then the four pairs' corrections."""
    k = nb * QK
    z = S.zero_f32x16()
    f00 = f01 = f02 = f03 = f10 = f11 = f12 = f13 = z  # f<pair><row>
    f20 = f21 = f22 = f23 = f30 = f31 = f32 = f33 = z
    c0 = c1 = c2 = c3 = S.zero_f32x8()
    for b in range(nb):
        zi = S.zero_i32x16()
        i00 = i01 = i02 = i03 = i10 = i11 = i12 = i13 = zi
        i20 = i21 = i22 = i23 = i30 = i31 = i32 = i33 = zi
        x0, x1 = (p * nb + b) * 16 * 64, ((p + 1) * nb + b) * 16 * 64
        x2, x3 = ((p + 2) * nb + b) * 16 * 64, ((p + 3) * nb + b) * 16 * 64
        wo = b * QK * 2
        for c in range(16):  # 16 values of each token per step
            v0, v1 = S.load_i16x32(x16p, x0 + 64 * c), S.load_i16x32(x16p, x1 + 64 * c)
            v2, v3 = S.load_i16x32(x16p, x2 + 64 * c), S.load_i16x32(x16p, x3 + 64 * c)
            w = S.load_twice_i16x32(w16, wo + 32 * c)
            i00, i10, i20, i30 = S.dot_i16x32(i00, w, v0), S.dot_i16x32(i10, w, v1), S.dot_i16x32(i20, w, v2), \
                S.dot_i16x32(i30, w, v3)
            w = S.load_twice_i16x32(w16, wo + 2 * k + 32 * c)
            i01, i11, i21, i31 = S.dot_i16x32(i01, w, v0), S.dot_i16x32(i11, w, v1), S.dot_i16x32(i21, w, v2), \
                S.dot_i16x32(i31, w, v3)
            w = S.load_twice_i16x32(w16, wo + 4 * k + 32 * c)
            i02, i12, i22, i32 = S.dot_i16x32(i02, w, v0), S.dot_i16x32(i12, w, v1), S.dot_i16x32(i22, w, v2), \
                S.dot_i16x32(i32, w, v3)
            w = S.load_twice_i16x32(w16, wo + 6 * k + 32 * c)
            i03, i13, i23, i33 = S.dot_i16x32(i03, w, v0), S.dot_i16x32(i13, w, v1), S.dot_i16x32(i23, w, v2), \
                S.dot_i16x32(i33, w, v3)
        s = b * GROUP
        f00, f01, f02, f03 = _rows_scaled(f00, f01, f02, f03, i00, i01, i02, i03,
                                          S.load_pair_f32x16(xdp, (p * nb + b) * 8), d, s)
        f10, f11, f12, f13 = _rows_scaled(f10, f11, f12, f13, i10, i11, i12, i13,
                                          S.load_pair_f32x16(xdp, ((p + 1) * nb + b) * 8), d, s)
        f20, f21, f22, f23 = _rows_scaled(f20, f21, f22, f23, i20, i21, i22, i23,
                                          S.load_pair_f32x16(xdp, ((p + 2) * nb + b) * 8), d, s)
        f30, f31, f32, f33 = _rows_scaled(f30, f31, f32, f33, i30, i31, i32, i33,
                                          S.load_pair_f32x16(xdp, ((p + 3) * nb + b) * 8), d, s)
        t = 2 * p
        c0 = _corrections(extra, bs16p, dc, b, nb, p, xd[t, b], xd[t + 1, b], c0)
        c1 = _corrections(extra, bs16p, dc, b, nb, p + 1, xd[t + 2, b], xd[t + 3, b], c1)
        c2 = _corrections(extra, bs16p, dc, b, nb, p + 2, xd[t + 4, b], xd[t + 5, b], c2)
        c3 = _corrections(extra, bs16p, dc, b, nb, p + 3, xd[t + 6, b], xd[t + 7, b], c3)
    return f00, f01, f02, f03, f10, f11, f12, f13, f20, f21, f22, f23, f30, f31, f32, f33, c0, c1, c2, c3


@njit
def _store_pair(out, t, r0, m, n_tok, f0, f1, f2, f3, k):
    """Rows r0..r0+3 for tokens t, t + 1: each half's `hsum_f32x8` plus its correction (k: rows of
    token t, then rows of token t + 1)."""
    sums = S.add_f32x8(S.hsum_halves_f32x8(f0, f1, f2, f3), k)
    store_sums(out, t, r0, m, n_tok, sums)


@njit(inline="always")
def _pair_kmatmul(x16p, xdp, xd, bs16p, w, row_bytes, m, out, decode, block_bytes):
    n_tok, nb = xd.shape
    n_pairs = (n_tok + 1) // 2
    n_groups = (m + GROUP - 1) // GROUP
    n_chunks = min(CHUNKS, n_groups)
    for chunk in prange(n_chunks):
        w16 = np.empty(GROUP * nb * QK, np.int16)
        extra = np.empty(GROUP * nb * 16, np.int16)
        d = np.empty(GROUP * nb, np.float32)
        dc = np.empty(GROUP * nb, np.float32)
        for first in range(0, n_pairs, PAIR_BLOCK):  # so that the block's activations stay in L2
            end = min(first + PAIR_BLOCK, n_pairs)
            for g in range(chunk * n_groups // n_chunks, (chunk + 1) * n_groups // n_chunks):
                r0 = g * GROUP
                _decode_group(decode, w, _row_offsets(r0, m, row_bytes), nb, block_bytes, w16, extra, d, dc)
                p = first
                while p + 4 <= end and 2 * p + 8 <= n_tok:  # four whole pairs
                    a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, e2, e3, g0, g1, g2, g3, k0, k1, k2, k3 = _pair_tile_4(
                        x16p, xdp, xd, bs16p, w16, extra, d, dc, p, nb)
                    _store_pair(out, 2 * p, r0, m, n_tok, a0, a1, a2, a3, k0)
                    _store_pair(out, 2 * p + 2, r0, m, n_tok, b0, b1, b2, b3, k1)
                    _store_pair(out, 2 * p + 4, r0, m, n_tok, e0, e1, e2, e3, k2)
                    _store_pair(out, 2 * p + 6, r0, m, n_tok, g0, g1, g2, g3, k3)
                    p += 4
                while p < end:
                    p1 = min(p + 1, end - 1)
                    f00, f01, f10, f11, f20, f21, f30, f31, k0, k1 = _pair_tile(
                        x16p, xdp, xd, bs16p, w16, extra, d, dc, p, p1, nb, n_tok)
                    _store_pair(out, 2 * p, r0, m, n_tok, f00, f10, f20, f30, k0)
                    if p + 1 < end:
                        _store_pair(out, 2 * p + 2, r0, m, n_tok, f01, f11, f21, f31, k1)
                    p += 2


@njit(cache=True, nogil=True, parallel=True)
def pair_kmatmul_q2_k(x16p, xdp, xd, bs16p, w, row_bytes, m, out):
    _pair_kmatmul(x16p, xdp, xd, bs16p, w, row_bytes, m, out, _decode_q2_k, 84)


@njit(cache=True, nogil=True, parallel=True)
def pair_kmatmul_q3_k(x16p, xdp, xd, bs16p, w, row_bytes, m, out):
    _pair_kmatmul(x16p, xdp, xd, bs16p, w, row_bytes, m, out, _decode_q3_k, 110)


@njit(cache=True, nogil=True, parallel=True)
def pair_kmatmul_q4_k(x16p, xdp, xd, bs16p, w, row_bytes, m, out):
    _pair_kmatmul(x16p, xdp, xd, bs16p, w, row_bytes, m, out, _decode_q4_k, 144)


@njit(cache=True, nogil=True, parallel=True)
def pair_kmatmul_q5_k(x16p, xdp, xd, bs16p, w, row_bytes, m, out):
    _pair_kmatmul(x16p, xdp, xd, bs16p, w, row_bytes, m, out, _decode_q5_k, 176)


@njit(cache=True, nogil=True, parallel=True)
def pair_kmatmul_q6_k(x16p, xdp, xd, bs16p, w, row_bytes, m, out):
    _pair_kmatmul(x16p, xdp, xd, bs16p, w, row_bytes, m, out, _decode_q6_k, 210)


@njit(cache=True, nogil=True, parallel=True)
def kmatmul_q2_k(x16, xd, bs16, w, row_bytes, m, out, isa):
    _kmatmul(x16, xd, bs16, w, row_bytes, m, out, isa, _decode_q2_k, 84)


@njit(cache=True, nogil=True, parallel=True)
def kmatmul_q3_k(x16, xd, bs16, w, row_bytes, m, out, isa):
    _kmatmul(x16, xd, bs16, w, row_bytes, m, out, isa, _decode_q3_k, 110)


@njit(cache=True, nogil=True, parallel=True)
def kmatmul_q4_k(x16, xd, bs16, w, row_bytes, m, out, isa):
    _kmatmul(x16, xd, bs16, w, row_bytes, m, out, isa, _decode_q4_k, 144)


@njit(cache=True, nogil=True, parallel=True)
def kmatmul_q5_k(x16, xd, bs16, w, row_bytes, m, out, isa):
    _kmatmul(x16, xd, bs16, w, row_bytes, m, out, isa, _decode_q5_k, 176)


@njit(cache=True, nogil=True, parallel=True)
def kmatmul_q6_k(x16, xd, bs16, w, row_bytes, m, out, isa):
    _kmatmul(x16, xd, bs16, w, row_bytes, m, out, isa, _decode_q6_k, 210)
