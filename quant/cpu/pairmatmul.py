"""Q8_0, Q4_0 and Q5_0 matmuls for several tokens on AVX-512: two tokens per 512-bit register,
with the same result, bit for bit, as the 256-bit kernels (`matmul`).

Per (row, token, block) the 256-bit kernels issue four vector operations (the byte dot, the
int -> float conversion, the scale product and the FMA), all on the two FMA ports: that, not
memory, bounds them from a few tokens on. Here each operation covers two tokens at once. A group
of 4 weight rows is first decoded into an L1-sized scratch (signed codes, -128 x their sums per
lane, float32 scales), then each decoded block is loaded into both halves of a 512-bit register
and dotted with the activation blocks of tokens 2p and 2p + 1, which the caller lays side by side,
as x + 128 (unsigned). Each half of every vector holds what the 256-bit kernel's vector holds for
its token, lane for lane: the same integers, the same float steps in the same order (llama.cpp's:
acc = fma(float(lane dot), dw * dx, acc), then the 8-lane sum).

Kernel arguments (the pair layout: pair p = tokens 2p and 2p + 1, an odd count padded with zeros):
    xq  uint8 [n_pairs * nb * 64]     activation codes + 128 of block b: token 2p's 32, then 2p + 1's
    xd  float32 [n_pairs * nb * 16]   the activation block scales of tokens 2p, 2p + 1, 8 times each
    w   uint8 [m * row_bytes]         the weight rows, flattened
    out float32 [n_tok, m]
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S
from llmx.quant.cpu.kmatmul import CHUNKS
from llmx.quant.cpu.matmul import GROUP, _prefetch_group, _row_offsets, store_sums

PAIR_BYTES = 64  # activation bytes per (pair, block)


# -- decoders: block b of row r -> the row group's scratch -----------------------------------------
#   codes  int8 [4 * nb * 32]     the weights (codes less their offset: 8 for Q4_0, 16 for Q5_0)
#   starts int32 [4 * nb * 8]     -128 x their sums per lane (4 values): where the dot starts
#   dw     float32 [4 * nb]       the block scale
# (at index i = r * nb + b: bytes 32 i, 32 i, element i)


@njit
def _store_block(codes, starts, i, signed):
    S.store_i8x32(codes, 32 * i, signed)
    S.store_i32x8(starts, 32 * i, S.neg_sums128_i32x8(signed))


@njit
def _decode_q4_0(w, off, codes, starts, dw, i):
    S.store_f32(dw, 4 * i, S.load_f16(w, off))
    _store_block(codes, starts, i, S.add_i8x32(S.load_nibbles_i8x32(w, off + 2), -8))


@njit
def _decode_q5_0(w, off, codes, starts, dw, i):
    S.store_f32(dw, 4 * i, S.load_f16(w, off))
    _store_block(codes, starts, i, S.q5_0_codes_i8x32(S.load_nibbles_i8x32(w, off + 6), S.load_u32(w, off + 2)))


@njit
def _decode_q8_0(w, off, codes, starts, dw, i):
    S.store_f32(dw, 4 * i, S.load_f16(w, off))
    _store_block(codes, starts, i, S.load_i8x32(w, off + 2))


@njit(inline="always")  # `decode` must be a constant: a dispatcher argument cannot be cached
def _decode_group(decode, w, offsets, nb, block_bytes, codes, starts, dw):
    for r in range(GROUP):  # row by row: one stream for the hardware prefetcher
        for b in range(nb):
            decode(w, offsets[r] + b * block_bytes, codes, starts, dw, r * nb + b)


@njit
def _step(codes, starts, dw, i, xq, xd, at, acc):
    """acc + float(the lane dots of decoded block i with a pair's activation blocks) x (dw x dx).
    The activations are x + 128 (unsigned), so the dot starts from -128 x the weight sums: the
    integers of the signed dot, which the 256-bit kernels take by other means."""
    dot = S.dot_u8i8_acc_i32x16(S.load_twice_i32x16(starts, 32 * i), S.load_i8x64(xq, at),
                                S.load_twice_i8x64(codes, 32 * i))
    return S.fma_f32x16(acc, dot, S.scale_f32x16(S.load_f32x16(xd, at), S.load_f32(dw, 4 * i)))


# -- tiles: 4 rows x 2 pairs, and 4 rows x 1 pair for the last odd pair ---------------------------


@njit
def _store_pair(out, t, r0, m, n_tok, a0, a1, a2, a3):
    """Rows r0..r0+3's sums (each `hsum_f32x8` of one half) for tokens t, t + 1."""
    store_sums(out, t, r0, m, n_tok, S.hsum_halves_f32x8(a0, a1, a2, a3))


@njit
def _row_4(codes, starts, dw, i, xq, xd, at0, at1, at2, at3, a0, a1, a2, a3):
    return (_step(codes, starts, dw, i, xq, xd, at0, a0), _step(codes, starts, dw, i, xq, xd, at1, a1),
            _step(codes, starts, dw, i, xq, xd, at2, a2), _step(codes, starts, dw, i, xq, xd, at3, a3))


@njit
def _tile_4(codes, starts, dw, xq, xd, p, nb, w, ahead, block_bytes, out, r0, m, n_tok):
    """4 rows x 4 pairs: each decoded block loaded once for 8 tokens."""
    z = S.zero_f32x16()
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    for b in range(nb):
        if p == 0:  # the next row group's bytes, while this one computes (it decodes them next)
            _prefetch_group(w, ahead, b, GROUP * block_bytes)
        at0, at1 = (p * nb + b) * PAIR_BYTES, ((p + 1) * nb + b) * PAIR_BYTES
        at2, at3 = ((p + 2) * nb + b) * PAIR_BYTES, ((p + 3) * nb + b) * PAIR_BYTES
        a00, a01, a02, a03 = _row_4(codes, starts, dw, b, xq, xd, at0, at1, at2, at3, a00, a01, a02, a03)
        a10, a11, a12, a13 = _row_4(codes, starts, dw, nb + b, xq, xd, at0, at1, at2, at3, a10, a11, a12, a13)
        a20, a21, a22, a23 = _row_4(codes, starts, dw, 2 * nb + b, xq, xd, at0, at1, at2, at3, a20, a21, a22, a23)
        a30, a31, a32, a33 = _row_4(codes, starts, dw, 3 * nb + b, xq, xd, at0, at1, at2, at3, a30, a31, a32, a33)
    _store_pair(out, 2 * p, r0, m, n_tok, a00, a10, a20, a30)
    _store_pair(out, 2 * p + 2, r0, m, n_tok, a01, a11, a21, a31)
    _store_pair(out, 2 * p + 4, r0, m, n_tok, a02, a12, a22, a32)
    _store_pair(out, 2 * p + 6, r0, m, n_tok, a03, a13, a23, a33)


@njit
def _tile_2(codes, starts, dw, xq, xd, p, nb, w, ahead, block_bytes, out, r0, m, n_tok):
    z = S.zero_f32x16()
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
    for b in range(nb):
        if p == 0:  # the next row group's bytes, while this one computes (it decodes them next)
            _prefetch_group(w, ahead, b, GROUP * block_bytes)
        at0, at1 = (p * nb + b) * PAIR_BYTES, ((p + 1) * nb + b) * PAIR_BYTES
        a00 = _step(codes, starts, dw, b, xq, xd, at0, a00)
        a01 = _step(codes, starts, dw, b, xq, xd, at1, a01)
        a10 = _step(codes, starts, dw, nb + b, xq, xd, at0, a10)
        a11 = _step(codes, starts, dw, nb + b, xq, xd, at1, a11)
        a20 = _step(codes, starts, dw, 2 * nb + b, xq, xd, at0, a20)
        a21 = _step(codes, starts, dw, 2 * nb + b, xq, xd, at1, a21)
        a30 = _step(codes, starts, dw, 3 * nb + b, xq, xd, at0, a30)
        a31 = _step(codes, starts, dw, 3 * nb + b, xq, xd, at1, a31)
    _store_pair(out, 2 * p, r0, m, n_tok, a00, a10, a20, a30)
    _store_pair(out, 2 * p + 2, r0, m, n_tok, a01, a11, a21, a31)


@njit
def _tile_1(codes, starts, dw, xq, xd, p, nb, w, ahead, block_bytes, out, r0, m, n_tok):
    a0 = a1 = a2 = a3 = S.zero_f32x16()
    for b in range(nb):
        if p == 0:
            _prefetch_group(w, ahead, b, GROUP * block_bytes)
        at = (p * nb + b) * PAIR_BYTES
        a0 = _step(codes, starts, dw, b, xq, xd, at, a0)
        a1 = _step(codes, starts, dw, nb + b, xq, xd, at, a1)
        a2 = _step(codes, starts, dw, 2 * nb + b, xq, xd, at, a2)
        a3 = _step(codes, starts, dw, 3 * nb + b, xq, xd, at, a3)
    _store_pair(out, 2 * p, r0, m, n_tok, a0, a1, a2, a3)


@njit(inline="always")
def _pairmatmul(xq, xd, w, row_bytes, m, n_tok, out, decode, block_bytes):
    nb = row_bytes // block_bytes
    n_pairs = (n_tok + 1) // 2
    n_groups = (m + GROUP - 1) // GROUP
    n_chunks = min(CHUNKS, n_groups)
    for chunk in prange(n_chunks):
        codes = np.empty(GROUP * nb * 32, np.uint8)
        starts = np.empty(GROUP * nb * 8, np.int32)
        dw = np.empty(GROUP * nb, np.float32)
        for g in range(chunk * n_groups // n_chunks, (chunk + 1) * n_groups // n_chunks):
            r0 = g * GROUP
            ahead = (r0 + GROUP) * row_bytes
            _decode_group(decode, w, _row_offsets(r0, m, row_bytes), nb, block_bytes, codes, starts, dw)
            p = 0
            while p + 4 <= n_pairs:
                _tile_4(codes, starts, dw, xq, xd, p, nb, w, ahead, block_bytes, out, r0, m, n_tok)
                p += 4
            while p + 2 <= n_pairs:
                _tile_2(codes, starts, dw, xq, xd, p, nb, w, ahead, block_bytes, out, r0, m, n_tok)
                p += 2
            if p < n_pairs:
                _tile_1(codes, starts, dw, xq, xd, p, nb, w, ahead, block_bytes, out, r0, m, n_tok)


@njit(cache=True, nogil=True, parallel=True)
def pairmatmul_q8_0(xq, xd, w, row_bytes, m, n_tok, out):
    _pairmatmul(xq, xd, w, row_bytes, m, n_tok, out, _decode_q8_0, 34)


@njit(cache=True, nogil=True, parallel=True)
def pairmatmul_q4_0(xq, xd, w, row_bytes, m, n_tok, out):
    _pairmatmul(xq, xd, w, row_bytes, m, n_tok, out, _decode_q4_0, 18)


@njit(cache=True, nogil=True, parallel=True)
def pairmatmul_q5_0(xq, xd, w, row_bytes, m, n_tok, out):
    _pairmatmul(xq, xd, w, row_bytes, m, n_tok, out, _decode_q5_0, 22)


def pair_layout(a: np.ndarray) -> np.ndarray:
    """[n_tok, nb, L] -> flat [n_pairs, nb, 2, L]: block b of tokens 2p and 2p + 1 side by side
    (an odd last token paired with zeros)."""
    n_tok = a.shape[0]
    padded = np.zeros((n_tok + n_tok % 2, *a.shape[1:]), a.dtype)
    padded[:n_tok] = a
    pairs = padded.reshape(-1, 2, *a.shape[1:]).swapaxes(1, 2)
    out = S.np_line_aligned_empty(pairs.size, a.dtype)  # read by 512-bit loads
    out.reshape(pairs.shape)[...] = pairs
    return out


# -- activations into the pair layout (one pass, threads over pairs) --------------------------------


@njit(cache=True, nogil=True, parallel=True)
def q8_0_pairs(codes):
    """Q8_0 codes int8 [n_tok, k] -> the kernels' xq: uint8 [n_pairs * nb * 64], x + 128."""
    n_tok, k = codes.shape
    nb, n_pairs = k // 32, (n_tok + 1) // 2
    flat = codes.reshape(-1)
    out = S.line_aligned_empty(n_pairs * nb * 64, np.uint8)  # read by 512-bit loads
    for p in prange(n_pairs):
        for s in range(2):
            t = 2 * p + s
            for b in range(nb):
                at = ((p * nb + b) * 2 + s) * 32
                if t < n_tok:
                    S.store_i8x32(out, at, S.add_i8x32(S.load_i8x32(flat, t * k + 32 * b), -128))  # = x ^ 0x80
                else:
                    out[at:at + 32] = 0
    return out


@njit(cache=True, nogil=True, parallel=True)
def q8_k_pairs(codes):
    """Q8_K codes int8 [n_tok, k] -> `kmatmul`'s x16p: int16, each 32 values in CHUNK_ORDER, pairs
    side by side 16 values at a time."""
    n_tok, k = codes.shape
    n_pairs, steps = (n_tok + 1) // 2, k // 16
    flat = codes.reshape(-1)
    out = S.line_aligned_empty(n_pairs * k * 2, np.int16)  # read by 512-bit loads
    for p in prange(n_pairs):
        for s in range(2):
            t = 2 * p + s
            for b in range(k // 32):
                at = ((p * steps + 2 * b) * 2 + s) * 32  # bytes; the second 16 values one step (64 bytes) on
                if t < n_tok:
                    ordered = S.chunk_order_i8x32(S.load_i8x32(flat, t * k + 32 * b))
                    S.store_i16x16(out, at, S.widen_signed_i16x16(ordered, 0))
                    S.store_i16x16(out, at + 64, S.widen_signed_i16x16(ordered, 1))
                else:
                    out[at // 2:at // 2 + 16] = 0
                    out[at // 2 + 32:at // 2 + 48] = 0
    return out
