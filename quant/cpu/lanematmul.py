"""Q8_0, Q4_0 and Q5_0 matmuls for 16 tokens at a time on AVX-512: one token per vector lane, with
the same result, bit for bit, as the 256-bit kernels (`matmul`) and the pair kernels (`pairmatmul`).

llama.cpp's order (`ggml_vec_dot_q8_0_q8_0` on AVX2) keeps eight float accumulators per (row,
token), lane l for the block's values 4l..4l+3: acc_l = fma(dw * dx, float(lane l's dot), acc_l)
over the blocks, then the eight lanes' sum. `pairmatmul` holds those eight lanes for two tokens in
one vector, so each (row, block) costs one scale product per pair of tokens. Here a vector holds
lane l for 16 tokens instead: the activations are laid out by token (values 4l..4l+3 of 16
tokens side by side), the weight's 4 bytes are broadcast, and one scale product (dw x the 16
tokens' dx) serves all eight lanes: per (row, 16 tokens, block) 8 dots, 8 conversions, 8 FMAs and
one product, where the pair kernels issue 32 operations. The eight lanes' sum at the end of a
row is `hsum_f32x8`'s, as vector adds of the eight accumulators. (Measured here, 2 threads, at 16
tokens: 0-23% faster than the pair kernels on rows of 1024 and 4096 values; see `linear.TOKEN_LANES_MIN_K`
for shorter rows.)

Weights are decoded per group of 4 rows into `pairmatmul`'s scratch (signed codes, -128 x their
sums per lane, float32 scales), each group while the previous one's first token group is computed
(a double scratch); the activations come as x + 128 (unsigned), so each dot starts from -128 x the
weight lane's sum.

Kernel arguments (token group g = tokens 16g..16g+15, the last one padded with zeros):
    xt  uint8 [n_groups * nb * 8 * 64]   block b, lane l: values 4l..4l+3 + 128 of the 16 tokens
    xd  float32 [n_groups * nb * 16]     block b's activation scales of the 16 tokens
    w   uint8 [m * row_bytes]            the weight rows, flattened
    out float32 [n_tok * m]
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S
from llmx.quant.cpu.kmatmul import CHUNKS
from llmx.quant.cpu.matmul import GROUP, _row_offsets
from llmx.quant.cpu.pairmatmul import _decode_group, _decode_q4_0, _decode_q5_0, _decode_q8_0

TOKENS = 16  # tokens per vector
LANES = 8  # llama.cpp's float accumulators per (row, token)
LANE_BLOCK_BYTES = LANES * 64  # activation bytes per (token group, block)


@njit
def _lane(codes, starts, i, lane, x, scales, acc):
    """acc + float(weight block i's lane `lane` dotted with 16 tokens' values) x (dw x dx)."""
    start = S.splat_i32x16(starts[LANES * i + lane])
    dot = S.dot_u8i8_acc_i32x16(start, x, S.splat_u32_i8x64(codes, 32 * i + 4 * lane))
    return S.fma_f32x16(acc, dot, scales)


@njit
def _sum_lanes(a0, a1, a2, a3, a4, a5, a6, a7):
    """`hsum_f32x8`'s order: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    add = S.add_f32x16
    return add(add(add(a0, a4), add(a2, a6)), add(add(a1, a5), add(a3, a7)))


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _rows_2(codes, starts, dw, i0, i1, xt, xd, g, nb, sums, r, w, ahead, stride,
            decode, block_bytes, d0, d1, j0, j1, decoding):
    """Rows i0 // nb and i1 // nb of the scratch, 16 tokens: their sums into sums[r], sums[r + 1].
    Meanwhile, block by block: bytes ahead .. ahead + nb x stride of `w` are prefetched, two lines per
    block, and with `decoding` (a constant at each call site) the weight rows at bytes d0 and d1 are
    decoded into the scratch at rows j0 // nb and j1 // nb: the decode's operations partly fill issue
    slots that the dots leave idle, where a separate decode pass adds its whole time (3-5% faster at
    16 tokens on 4096 x 4096, measured). The loop holds no branch, so that the accumulators stay in
    their registers from one block to the next."""
    z = S.zero_f32x16()
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
    for b in range(nb):
        S.prefetch(w, ahead + b * stride)
        S.prefetch(w, ahead + b * stride + 64)
        if decoding:
            decode(w, d0 + b * block_bytes, codes, starts, dw, j0 + b)
            decode(w, d1 + b * block_bytes, codes, starts, dw, j1 + b)
        at = (g * nb + b) * LANE_BLOCK_BYTES
        x0, x1, x2, x3 = S.load_i8x64(xt, at), S.load_i8x64(xt, at + 64), S.load_i8x64(xt, at + 128), \
            S.load_i8x64(xt, at + 192)
        x4, x5, x6, x7 = S.load_i8x64(xt, at + 256), S.load_i8x64(xt, at + 320), S.load_i8x64(xt, at + 384), \
            S.load_i8x64(xt, at + 448)
        dx = S.load_f32x16(xd, (g * nb + b) * 4 * TOKENS)
        ia, ib = i0 + b, i1 + b
        sa, sb = S.scale_f32x16(dx, S.load_f32(dw, 4 * ia)), S.scale_f32x16(dx, S.load_f32(dw, 4 * ib))
        a0, b0 = _lane(codes, starts, ia, 0, x0, sa, a0), _lane(codes, starts, ib, 0, x0, sb, b0)
        a1, b1 = _lane(codes, starts, ia, 1, x1, sa, a1), _lane(codes, starts, ib, 1, x1, sb, b1)
        a2, b2 = _lane(codes, starts, ia, 2, x2, sa, a2), _lane(codes, starts, ib, 2, x2, sb, b2)
        a3, b3 = _lane(codes, starts, ia, 3, x3, sa, a3), _lane(codes, starts, ib, 3, x3, sb, b3)
        a4, b4 = _lane(codes, starts, ia, 4, x4, sa, a4), _lane(codes, starts, ib, 4, x4, sb, b4)
        a5, b5 = _lane(codes, starts, ia, 5, x5, sa, a5), _lane(codes, starts, ib, 5, x5, sb, b5)
        a6, b6 = _lane(codes, starts, ia, 6, x6, sa, a6), _lane(codes, starts, ib, 6, x6, sb, b6)
        a7, b7 = _lane(codes, starts, ia, 7, x7, sa, a7), _lane(codes, starts, ib, 7, x7, sb, b7)
    S.store_f32x16(sums, 4 * TOKENS * r, _sum_lanes(a0, a1, a2, a3, a4, a5, a6, a7))
    S.store_f32x16(sums, 4 * TOKENS * (r + 1), _sum_lanes(b0, b1, b2, b3, b4, b5, b6, b7))


@njit
def _store_group(out, sums, g, r0, m, n_tok):
    """sums [4 rows, 16 tokens] -> out[token, r0..r0+3] (rows and tokens that exist)."""
    for j in range(TOKENS):
        t = g * TOKENS + j
        if t < n_tok:
            for r in range(min(GROUP, m - r0)):
                out[t * m + r0 + r] = sums[r * TOKENS + j]


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _row_group(codes, starts, dw, cur, nxt, nb, xt, xd, g, sums, w, ahead, stride, decode, block_bytes,
               next_offsets, decoding):
    """The 4 rows at scratch row cur // nb, token group g: their sums into `sums`; with `decoding`,
    meanwhile the next 4 rows (bytes at `next_offsets`) into the scratch at row nxt // nb."""
    o0, o1, o2, o3 = next_offsets
    _rows_2(codes, starts, dw, cur, cur + nb, xt, xd, g, nb, sums, 0, w, ahead, stride,
            decode, block_bytes, o0, o1, nxt, nxt + nb, decoding)
    _rows_2(codes, starts, dw, cur + 2 * nb, cur + 3 * nb, xt, xd, g, nb, sums, 2, w, ahead + nb * stride, stride,
            decode, block_bytes, o2, o3, nxt + 2 * nb, nxt + 3 * nb, decoding)


@njit(inline="always")
def _lanematmul(xt, xd, w, row_bytes, m, n_tok, out, decode, block_bytes):
    nb = row_bytes // block_bytes
    n_groups = (n_tok + TOKENS - 1) // TOKENS
    n_row_groups = (m + GROUP - 1) // GROUP
    n_chunks = min(CHUNKS, n_row_groups)
    stride = GROUP // 2 * block_bytes  # bytes of a row group that each `_rows_2` prefetches per block (<= 128)
    half = GROUP * nb  # the scratch holds two row groups: the one computed and the next, being decoded
    for chunk in prange(n_chunks):
        codes = np.empty(2 * half * 32, np.uint8)
        starts = np.empty(2 * half * LANES, np.int32)
        dw = np.empty(2 * half, np.float32)
        sums = S.line_aligned_empty(GROUP * TOKENS, np.float32)
        first, end = chunk * n_row_groups // n_chunks, (chunk + 1) * n_row_groups // n_chunks
        _decode_group(decode, w, _row_offsets(first * GROUP, m, row_bytes), nb, block_bytes, codes, starts, dw)
        for rg in range(first, end):
            r0 = rg * GROUP
            cur = (rg - first) % 2 * half
            nxt = half - cur
            ahead = min(r0 + 2 * GROUP, m - 1) * row_bytes  # the group after the next (or the last row)
            next_offsets = _row_offsets(min(r0 + GROUP, m - 1), m, row_bytes)
            if rg + 1 < end:
                _row_group(codes, starts, dw, cur, nxt, nb, xt, xd, 0, sums, w, ahead, stride, decode, block_bytes,
                           next_offsets, True)
            else:
                _row_group(codes, starts, dw, cur, nxt, nb, xt, xd, 0, sums, w, ahead, stride, decode, block_bytes,
                           next_offsets, False)
            _store_group(out, sums, 0, r0, m, n_tok)
            for g in range(1, n_groups):
                _row_group(codes, starts, dw, cur, nxt, nb, xt, xd, g, sums, w, ahead, stride, decode, block_bytes,
                           next_offsets, False)
                _store_group(out, sums, g, r0, m, n_tok)


@njit(cache=True, nogil=True, parallel=True)
def lanematmul_q8_0(xt, xd, w, row_bytes, m, n_tok, out):
    _lanematmul(xt, xd, w, row_bytes, m, n_tok, out, _decode_q8_0, 34)


@njit(cache=True, nogil=True, parallel=True)
def lanematmul_q4_0(xt, xd, w, row_bytes, m, n_tok, out):
    _lanematmul(xt, xd, w, row_bytes, m, n_tok, out, _decode_q4_0, 18)


@njit(cache=True, nogil=True, parallel=True)
def lanematmul_q5_0(xt, xd, w, row_bytes, m, n_tok, out):
    _lanematmul(xt, xd, w, row_bytes, m, n_tok, out, _decode_q5_0, 22)


@njit(cache=True, nogil=True, parallel=True)
def token_lanes(codes, scales):
    """Q8_0 codes int8 [n_tok, k] and scales float32 [n_tok, nb] -> the kernels' xt (x + 128) and xd."""
    n_tok, k = codes.shape
    nb, n_groups = k // 32, (n_tok + TOKENS - 1) // TOKENS
    words = codes.reshape(-1).view(np.uint32)  # 4 values of one token: one lane's share
    xt = S.line_aligned_empty(n_groups * nb * LANES * TOKENS, np.uint32)
    xt[:] = 0x80808080  # padding tokens: x = 0
    xd = S.line_aligned_empty(n_groups * nb * TOKENS, np.float32)
    xd[:] = 0
    for gb in prange(n_groups * nb):  # (token group, block)
        g, b = gb // nb, gb % nb
        for j in range(min(TOKENS, n_tok - g * TOKENS)):
            t = g * TOKENS + j
            xd[gb * TOKENS + j] = scales[t, b]
            for lane in range(LANES):
                xt[(gb * LANES + lane) * TOKENS + j] = words[(t * k + 32 * b) // 4 + lane] ^ np.uint32(0x80808080)
    return xt.view(np.uint8), xd
