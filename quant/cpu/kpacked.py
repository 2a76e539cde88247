"""Q4_K and Q6_K weights repacked at load: 16 rows in the lanes of one vector, as `repacked` does
for Q4_0.

Per (16 rows, token, super-block of 256 values): each 32-value sub-block's integer dot for the 16
rows at once (eight 4-byte activation splats against 64-byte code vectors), times the rows' 6-bit
scales, summed in int32; the mins times the activations' sub-block sums by `vpmaddwd`; then two
float steps, acc += isum * (d * dx) and acc -= mins * (dmin * dx). (On AVX2, Q4_K's sub-block
dots stay int16 until one `vpmaddwd` against the scales: `packed_q4_k_words`.) The row-by-row
kernels (`matmul`, `kmatmul`) decode each row's scales per super-block and end in a horizontal
sum per row; here the scales are unpacked once, at load, and no lane is summed across.

Packed layout, per group of 16 rows (the last one padded with zero rows), per super-block: 2368
bytes (16 x 144, and 64 for the unpacked scales and mins),
    2048 bytes  codes: for sub-block pair c (0..3), 8 vectors of 64; vector v, lane r (4 bytes) =
                row r's code bytes 32c + 4v .. +3 (low nibbles: sub-block 2c, values 4v..4v+3;
                high nibbles: sub-block 2c + 1, the same values)
     128 bytes  mins: for sub-block pair p (0..3), 32 bytes; lane r = row r's mins of 2p, 2p + 1
     128 bytes  scales: for sub-block j (0..7), 16 bytes, one per row
      32 bytes  the rows' d (float16), then 32 bytes their dmin

Q6_K (3360 bytes per group and super-block, 16 x 210): per 16-value sub-block the dots times the
signed 8-bit scales; the stored codes' offset of 32 comes off as 32 x the sum over sub-blocks of
scale x activation sum (`vpmaddwd`), and one float step, acc += (isum - 32 x that) * (d * dx).
    2048 bytes  codes' low four bits: for half h and ql half s (block 2h + s), 8 vectors of 64;
                vector v, lane r = row r's ql bytes 64h + 32s + 4v .. +3 (low nibbles: quarter
                s, values 128h + 32s + 4v ..; high nibbles: quarter s + 2)
    1024 bytes  their high two bits: for half h, 8 vectors; vector v, lane r = row r's qh bytes
                32h + 4v .. +3 (bits 2q, 2q + 1: quarter q's)
     256 bytes  scales: for sub-block pair p (0..7), 32 bytes; lane r = row r's scales of 2p, 2p + 1
      32 bytes  the rows' d (float16)

Kernel arguments:
    xq  int8 [n_tok * k]        the Q8_K activation codes
    xd  float32 [n_tok * nb]    their super-block scales
    xs  int32 [n_tok * k / 16]  their sums per 16 values
    wp  uint8                   the packed weights, flattened
    out float32 [n_tok, m]
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llmx.quant.cpu import simd as S
from llmx.quant.cpu.repacked import (
    AHEAD,
    GROUP_ROWS,
    _grouped,
    _store,
    fill,
    prefetch,
    prefetch_once,
    records,
    walk_groups,
)

Q4_K_BLOCK_BYTES = 144
Q4_K_PACKED_BYTES = 2368
MINS_AT, SCALES_AT, D_AT, DMIN_AT = 2048, 2176, 2304, 2336
Q6_K_BLOCK_BYTES = 210
Q6_K_PACKED_BYTES = 3360
Q6_PLANES_AT, Q6_SCALES_AT, Q6_D_AT = 2048, 3072, 3328
# Q6_K's super-blocks take long to compute: in tiles of four tokens each prefetches the next one
# (a group ahead, as the others, they left the cache before use; measured at one token, cold
# 640 x 2048 on one AVX2 thread: 78 us, one super-block ahead 52, hot 37)
Q6_AHEAD_BYTES = Q6_K_PACKED_BYTES
# One token reads a matrix as fast as it computes it, so each block's prefetch asks for a block
# this far on, a part per step of the block rather than all at its start (a burst of 37-53 lines
# at once measured slower). Cold from DRAM (a decode step's per-layer matrices), 640 x 2048 on
# one thread, Zen 4: Q6_K 47 -> 31-33 us, Q4_K 28-33 -> 21-26 us on VNNI; AVX2 1.2-1.7x.
Q4_SPREAD_AHEAD = 4 * Q4_K_PACKED_BYTES
Q6_SPREAD_AHEAD = 3 * Q6_K_PACKED_BYTES


def pack_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K rows uint8 [m, nb * 144] -> the packed layout, uint8 [ceil(m / 16) * nb * 2368]."""
    by_group = _grouped(w, Q4_K_BLOCK_BYTES)  # [g, 16, nb, 144]: d, dmin, 12 bytes of scales, qs (128)
    groups, _, nb, _ = by_group.shape
    scales, mins = k4_scales_mins(by_group[..., 4:16])  # each [g, 16, nb, 8]
    out = records(groups, nb, Q4_K_PACKED_BYTES)
    at = fill(out, 0, by_group[..., 16:].view(np.uint32).transpose(0, 2, 3, 1))  # [g, b, 8c + v, r]
    at = fill(out, at, mins.reshape(groups, GROUP_ROWS, nb, 4, 2).view(np.uint16)[..., 0].transpose(0, 2, 3, 1))
    at = fill(out, at, scales.transpose(0, 2, 3, 1))  # [g, b, j, r]
    at = fill(out, at, by_group[..., 0:2].view(np.uint16)[..., 0].transpose(0, 2, 1))  # d [g, b, r]
    fill(out, at, by_group[..., 2:4].view(np.uint16)[..., 0].transpose(0, 2, 1))  # dmin
    return out.reshape(-1)


def pack_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K rows uint8 [m, nb * 210] -> the packed layout, uint8 [ceil(m / 16) * nb * 3360]."""
    by_group = _grouped(w, Q6_K_BLOCK_BYTES)  # [g, 16, nb, 210]: ql (128), qh (64), scales (16), d
    groups, _, nb, _ = by_group.shape
    out = records(groups, nb, Q6_K_PACKED_BYTES)
    at = fill(out, 0, by_group[..., :128].view(np.uint32).transpose(0, 2, 3, 1))  # ql [g, b, 8(2h + s) + v, r]
    at = fill(out, at, by_group[..., 128:192].view(np.uint32).transpose(0, 2, 3, 1))  # qh [g, b, 8h + v, r]
    at = fill(out, at, by_group[..., 192:208].view(np.uint16).transpose(0, 2, 3, 1))  # scale pairs [g, b, p, r]
    fill(out, at, by_group[..., 208:210].view(np.uint16)[..., 0].transpose(0, 2, 1))  # d [g, b, r]
    return out.reshape(-1)


def k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins [..., 12] -> scales, mins uint8 [..., 8]."""
    s = packed.astype(np.uint8)
    low, high = s[..., 0:4], s[..., 4:8]
    tail = s[..., 8:12]
    scales = np.concatenate([low & 63, (tail & 0x0F) | ((low >> 6) << 4)], axis=-1)
    mins = np.concatenate([high & 63, (tail >> 4) | ((high >> 6) << 4)], axis=-1)
    return scales, mins


@njit
def _pair_codes(wp, at):
    """Sub-blocks 2c (low nibbles) and 2c + 1 (high) of one pair at `at`: 8 vectors each."""
    v = (S.load_i8x64(wp, at), S.load_i8x64(wp, at + 64), S.load_i8x64(wp, at + 128), S.load_i8x64(wp, at + 192),
         S.load_i8x64(wp, at + 256), S.load_i8x64(wp, at + 320), S.load_i8x64(wp, at + 384), S.load_i8x64(wp, at + 448))
    n = S.nibbles_i8x64
    low = (n(v[0], 0), n(v[1], 0), n(v[2], 0), n(v[3], 0), n(v[4], 0), n(v[5], 0), n(v[6], 0), n(v[7], 0))
    high = (n(v[0], 1), n(v[1], 1), n(v[2], 1), n(v[3], 1), n(v[4], 1), n(v[5], 1), n(v[6], 1), n(v[7], 1))
    return low, high


@njit
def _sub_dot(isa, c, xq, at):
    """The 16 rows' integer dots of one 32-value sub-block (codes c, 8 vectors) with xq[at:at + 32]."""
    x = S.splat_u32_i8x64
    dot = S.dot16x4_u8i8_acc(isa, S.zero_i32x16(), c[0], x(xq, at), c[1], x(xq, at + 4),
                             c[2], x(xq, at + 8), c[3], x(xq, at + 12))
    return S.dot16x4_u8i8_acc(isa, dot, c[4], x(xq, at + 16), c[5], x(xq, at + 20),
                              c[6], x(xq, at + 24), c[7], x(xq, at + 28))


@njit
def _pair_step(isa, low, high, sc_low, sc_high, xq, at, isum):
    """isum + the scaled dots of one sub-block pair; `at`: the pair's first activation."""
    isum = S.add_i32x16(isum, S.mul_i32x16(_sub_dot(isa, low, xq, at), sc_low))
    return S.add_i32x16(isum, S.mul_i32x16(_sub_dot(isa, high, xq, at + 32), sc_high))


@njit
def _mins(wp, at, xs, s0):
    """The 16 rows' sum over the 8 sub-blocks of min x the activations' sub-block sum; s0: the
    super-block's first entry in xs (sums per 16 values)."""
    total = S.zero_i32x16()
    for p in range(4):
        j = s0 + 4 * p  # sub-blocks 2p and 2p + 1: sums j, j + 1 and j + 2, j + 3
        sums = S.splat_pair_i16x32(xs[j] + xs[j + 1], xs[j + 2] + xs[j + 3])
        total = S.add_i32x16(total, S.madd_i16x32(S.load_u8_i16x32(wp, at + MINS_AT + 32 * p), sums))
    return total


@njit
def _finish(wp, at, isum, mins, dx, acc):
    """acc + isum * (d * dx) - mins * (dmin * dx), each product rounded once."""
    acc = S.fma_f32x16(acc, isum, S.scale_f32x16(S.load_f16_f32x16(wp, at + D_AT), dx))
    return S.fma_f32x16(acc, mins, S.neg_f32x16(S.scale_f32x16(S.load_f16_f32x16(wp, at + DMIN_AT), dx)))


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _k4_tile_4(isa, pair_sums, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    """16 rows x tokens t..t+3; `pair_sums` adds each sub-block pair's scaled dots for the four."""
    a0 = a1 = a2 = a3 = S.zero_f32x16()
    k = nb * 256
    for b in range(nb):
        at = g_at + b * Q4_K_PACKED_BYTES
        prefetch(wp, at + AHEAD * nb * Q4_K_PACKED_BYTES, Q4_K_PACKED_BYTES)
        i0 = i1 = i2 = i3 = S.zero_i32x16()
        for c in range(4):
            i0, i1, i2, i3 = pair_sums(isa, wp, at, c, xq, t * k + b * 256 + 64 * c, k, i0, i1, i2, i3)
        s0 = (t * nb + b) * 16
        a0 = _finish(wp, at, i0, _mins(wp, at, xs, s0), xd[t * nb + b], a0)
        a1 = _finish(wp, at, i1, _mins(wp, at, xs, s0 + nb * 16), xd[(t + 1) * nb + b], a1)
        a2 = _finish(wp, at, i2, _mins(wp, at, xs, s0 + 2 * nb * 16), xd[(t + 2) * nb + b], a2)
        a3 = _finish(wp, at, i3, _mins(wp, at, xs, s0 + 3 * nb * 16), xd[(t + 3) * nb + b], a3)
    _store(out, t, r0, m, a0, spill)
    _store(out, t + 1, r0, m, a1, spill)
    _store(out, t + 2, r0, m, a2, spill)
    _store(out, t + 3, r0, m, a3, spill)


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _k4_tile_1(isa, pair_sum, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    acc = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * Q4_K_PACKED_BYTES
        isum = S.zero_i32x16()
        for c in range(4):
            prefetch_once(wp, at + Q4_SPREAD_AHEAD + 592 * c, 592)
            isum = pair_sum(isa, wp, at, c, xq, (t * nb + b) * 256 + 64 * c, isum)
        acc = _finish(wp, at, isum, _mins(wp, at, xs, (t * nb + b) * 16), xd[t * nb + b], acc)
    _store(out, t, r0, m, acc, spill)


@njit(inline="always")
def _unpacked_pair_4(isa, wp, at, c, xq, x0, k, i0, i1, i2, i3):
    """Sub-block pair c's codes unpacked once for four tokens (activations at x0 + t k), each
    sub-block's dots then times its scales (`vpmulld`)."""
    low, high = _pair_codes(wp, at + 512 * c)
    sc_low = S.load_u8_i32x16(wp, at + SCALES_AT + 32 * c)
    sc_high = S.load_u8_i32x16(wp, at + SCALES_AT + 32 * c + 16)
    return (_pair_step(isa, low, high, sc_low, sc_high, xq, x0, i0),
            _pair_step(isa, low, high, sc_low, sc_high, xq, x0 + k, i1),
            _pair_step(isa, low, high, sc_low, sc_high, xq, x0 + 2 * k, i2),
            _pair_step(isa, low, high, sc_low, sc_high, xq, x0 + 3 * k, i3))


@njit(inline="always")
def _unpacked_pair_1(isa, wp, at, c, xq, x0, isum):
    low, high = _pair_codes(wp, at + 512 * c)
    return _pair_step(isa, low, high, S.load_u8_i32x16(wp, at + SCALES_AT + 32 * c),
                      S.load_u8_i32x16(wp, at + SCALES_AT + 32 * c + 16), xq, x0, isum)


@njit(inline="always")
def _low_nibbles(v):
    return S.nibbles_i8x64(v, 0)


@njit(inline="always")
def _high_nibbles(v):
    return S.nibbles_i8x64(v, 1)


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _scaled_sub_block_4(isa, nibbles, wp, at, scales_at, xq, x0, k, i0, i1, i2, i3):
    """i_t + token t's dot with one sub-block times the rows' scales, for tokens t = 0..3 (whose
    activations start at x0 + t k); the sub-block's codes are the `nibbles` of the pair's 8 code
    vectors at `at`, each loaded just before its four tokens. The 8 vectors' pair sums add up as
    int16 (at most 8 x 2 x 15 x 127 = 30480), and one `vpmaddwd` against the scales makes them
    int32: no `vpmulld`, and only one vector and four tokens' sums live (AVX2's 16 registers)."""
    w0 = w1 = w2 = w3 = S.zero_i16x32()
    x, f = S.splat_u32_i8x64, S.madd_u8i8_acc_i16x32
    for v in range(8):
        c, o = nibbles(S.load_i8x64(wp, at + 64 * v)), x0 + 4 * v
        w0, w1 = f(isa, w0, c, x(xq, o)), f(isa, w1, c, x(xq, o + k))
        w2, w3 = f(isa, w2, c, x(xq, o + 2 * k)), f(isa, w3, c, x(xq, o + 3 * k))
    sc, m, add = S.load_u8_twice_i16x32(wp, scales_at), S.madd_i16x32, S.add_i32x16
    return add(i0, m(w0, sc)), add(i1, m(w1, sc)), add(i2, m(w2, sc)), add(i3, m(w3, sc))


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _scaled_sub_block_1(isa, nibbles, wp, at, scales_at, xq, x0, isum):
    """`_scaled_sub_block_4` for one token."""
    w, x, f = S.zero_i16x32(), S.splat_u32_i8x64, S.madd_u8i8_acc_i16x32
    for v in range(8):
        w = f(isa, w, nibbles(S.load_i8x64(wp, at + 64 * v)), x(xq, x0 + 4 * v))
    return S.add_i32x16(isum, S.madd_i16x32(w, S.load_u8_twice_i16x32(wp, scales_at)))


@njit(inline="always")
def _words_pair_4(isa, wp, at, c, xq, x0, k, i0, i1, i2, i3):
    """`_unpacked_pair_4` for AVX2, sub-block by sub-block (`_scaled_sub_block_4`); the same integers."""
    sc_at = at + SCALES_AT + 32 * c
    i0, i1, i2, i3 = _scaled_sub_block_4(isa, _low_nibbles, wp, at + 512 * c, sc_at, xq, x0, k, i0, i1, i2, i3)
    return _scaled_sub_block_4(isa, _high_nibbles, wp, at + 512 * c, sc_at + 16, xq, x0 + 32, k, i0, i1, i2, i3)


@njit(inline="always")
def _words_pair_1(isa, wp, at, c, xq, x0, isum):
    sc_at = at + SCALES_AT + 32 * c
    isum = _scaled_sub_block_1(isa, _low_nibbles, wp, at + 512 * c, sc_at, xq, x0, isum)
    return _scaled_sub_block_1(isa, _high_nibbles, wp, at + 512 * c, sc_at + 16, xq, x0 + 32, isum)


@njit
def _tile_4(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _k4_tile_4(isa, _unpacked_pair_4, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill)


@njit
def _tile_1(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _k4_tile_1(isa, _unpacked_pair_1, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill)


@njit
def _tile_4_words(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _k4_tile_4(isa, _words_pair_4, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill)


@njit
def _tile_1_words(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _k4_tile_1(isa, _words_pair_1, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill)


@njit(cache=True, nogil=True, parallel=True)
def packed_q4_k(xq, xd, xs, wp, nb, m, n_tok, out, isa):
    walk_groups(None, _tile_4, _tile_1, Q4_K_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd, xs, out)


@njit(cache=True, nogil=True, parallel=True)
def packed_q4_k_words(xq, xd, xs, wp, nb, m, n_tok, out, isa):
    """`packed_q4_k` for AVX2 (`_tile_4_words`, `_tile_1_words`); the same bits."""
    walk_groups(None, _tile_4_words, _tile_1_words, Q4_K_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd, xs, out)


# -- Q6_K ----------------------------------------------------------------------------------------


@njit
def _q6_vector(wp, base, planes, v, quarter, high):
    """Vector v of a ql half: its low (high=0) or high nibbles with quarter `quarter`'s high bits."""
    raw, bits = S.load_i8x64(wp, base + 64 * v), S.load_i8x64(wp, planes + 64 * v)
    nibbles = S.nibbles_i8x64(raw, 1) if high else S.nibbles_i8x64(raw, 0)
    return S.or_i8x64(nibbles, S.two_bits_i8x64(bits, quarter))


@njit
def _q6_quarter(wp, at, h, q):
    """Codes 0..63 (stored + 32) of quarter q of half h: 8 vectors, values 128h + 32q + 4v .."""
    base, planes = at + 512 * (2 * h + q % 2), at + Q6_PLANES_AT + 512 * h
    high = q >= 2
    return (_q6_vector(wp, base, planes, 0, q, high), _q6_vector(wp, base, planes, 1, q, high),
            _q6_vector(wp, base, planes, 2, q, high), _q6_vector(wp, base, planes, 3, q, high),
            _q6_vector(wp, base, planes, 4, q, high), _q6_vector(wp, base, planes, 5, q, high),
            _q6_vector(wp, base, planes, 6, q, high), _q6_vector(wp, base, planes, 7, q, high))


@njit
def _q6_quarter_step(isa, c, wp, at, p, xq, xo, isum):
    """isum + quarter's two 16-value sub-blocks (codes c, scales pair p), dotted with xq[xo:xo + 32]."""
    x = S.splat_u32_i8x64
    zero = S.zero_i32x16()
    first = S.dot16x4_u6i8_acc(isa, zero, c[0], x(xq, xo), c[1], x(xq, xo + 4), c[2], x(xq, xo + 8),
                               c[3], x(xq, xo + 12))
    second = S.dot16x4_u6i8_acc(isa, zero, c[4], x(xq, xo + 16), c[5], x(xq, xo + 20), c[6], x(xq, xo + 24),
                                c[7], x(xq, xo + 28))
    scales = at + Q6_SCALES_AT + 32 * p
    isum = S.add_i32x16(isum, S.mul_i32x16(first, S.load_pair_i8_i32x16(wp, scales, 0)))
    return S.add_i32x16(isum, S.mul_i32x16(second, S.load_pair_i8_i32x16(wp, scales, 1)))


@njit
def _q6_finish(wp, at, isum, xs, s0, dx, acc):
    """acc + (isum - 32 x sum of scale x activation sum) * (d * dx); s0: the super-block's first
    entry in xs (sums per 16 values, one per sub-block)."""
    offset = S.zero_i32x16()
    for p in range(8):
        sums = S.splat_pair_i16x32(xs[s0 + 2 * p], xs[s0 + 2 * p + 1])
        offset = S.add_i32x16(offset, S.madd_i16x32(S.load_i8_i16x32(wp, at + Q6_SCALES_AT + 32 * p), sums))
    isum = S.add_i32x16(isum, S.mul_i32x16(offset, S.splat_i32x16(-32)))
    return S.fma_f32x16(acc, isum, S.scale_f32x16(S.load_f16_f32x16(wp, at + Q6_D_AT), dx))


@njit
def _q6_tile_4(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    a0 = a1 = a2 = a3 = S.zero_f32x16()
    k = nb * 256
    for b in range(nb):
        at = g_at + b * Q6_K_PACKED_BYTES
        prefetch(wp, at + Q6_AHEAD_BYTES, Q6_K_PACKED_BYTES)
        i0 = i1 = i2 = i3 = S.zero_i32x16()
        for h in range(2):
            for q in range(4):
                c = _q6_quarter(wp, at, h, q)
                xo = t * k + b * 256 + 128 * h + 32 * q
                i0 = _q6_quarter_step(isa, c, wp, at, 4 * h + q, xq, xo, i0)
                i1 = _q6_quarter_step(isa, c, wp, at, 4 * h + q, xq, xo + k, i1)
                i2 = _q6_quarter_step(isa, c, wp, at, 4 * h + q, xq, xo + 2 * k, i2)
                i3 = _q6_quarter_step(isa, c, wp, at, 4 * h + q, xq, xo + 3 * k, i3)
        s0 = (t * nb + b) * 16
        a0 = _q6_finish(wp, at, i0, xs, s0, xd[t * nb + b], a0)
        a1 = _q6_finish(wp, at, i1, xs, s0 + nb * 16, xd[(t + 1) * nb + b], a1)
        a2 = _q6_finish(wp, at, i2, xs, s0 + 2 * nb * 16, xd[(t + 2) * nb + b], a2)
        a3 = _q6_finish(wp, at, i3, xs, s0 + 3 * nb * 16, xd[(t + 3) * nb + b], a3)
    _store(out, t, r0, m, a0, spill)
    _store(out, t + 1, r0, m, a1, spill)
    _store(out, t + 2, r0, m, a2, spill)
    _store(out, t + 3, r0, m, a3, spill)


@njit
def _q6_tile_1(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    acc = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * Q6_K_PACKED_BYTES
        isum = S.zero_i32x16()
        for h in range(2):
            for q in range(4):
                prefetch_once(wp, at + Q6_SPREAD_AHEAD + 420 * (4 * h + q), 420)
                isum = _q6_quarter_step(isa, _q6_quarter(wp, at, h, q), wp, at, 4 * h + q, xq,
                                        (t * nb + b) * 256 + 128 * h + 32 * q, isum)
        acc = _q6_finish(wp, at, isum, xs, (t * nb + b) * 16, xd[t * nb + b], acc)
    _store(out, t, r0, m, acc, spill)


@njit(cache=True, nogil=True, parallel=True)
def packed_q6_k(xq, xd, xs, wp, nb, m, n_tok, out, isa):
    walk_groups(None, _q6_tile_4, _q6_tile_1, Q6_K_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd, xs, out)

