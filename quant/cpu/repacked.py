"""Q4_0 and Q5_0 weights repacked at load, and their matmul in llama.cpp's repacked float order.

llama.cpp's CPU backend re-lays out a Q4_0 weight matrix whose row count is a multiple of 8 when
it loads it (its CPU_REPACK buffer, `q4_0_8x8` on x86 with AVX2; not `token_embd`, which it reads
by rows) and multiplies it with `ggml_gemv/gemm_q4_0_8x8_q8_0`. Per (row, token) those take each
block's integer dot whole and accumulate acc = fma(float(block dot), dw * dx, acc) over the blocks
in order: one float step per block, where `vec_dot_q4_0_q8_0` takes one per lane of eight and then
sums the lanes. Here the same arithmetic, with 16 weight rows in the lanes of one vector: per
(16 rows, token, block) eight byte dots, one conversion, one scale product and one FMA.

Q5_0 (not repacked by llama.cpp) takes the same layout and steps, with its fifth bits in bit
planes: the same arithmetic (any float order within the fidelity bounds may be chosen), and
2.5x the throughput of the row-by-row kernel on AVX2 (`scripts/bench_kernels.py`).

Packed layout, per group of 16 rows (the last one padded with zero rows), per block: 288 bytes
(Q4_0) or 352 (Q5_0),
    256 bytes  4 vectors of 64; vector i, lane r (4 bytes) = row r's code bytes 4i..4i+3, whose
               low nibbles are the block's values 4i..4i+3 and high nibbles values 16+4i..16+4i+3
     64 bytes  (Q5_0) fifth-bit planes: bit c of byte 4r + j = the fifth bit of the value that
               unpacked vector c holds at byte j of lane r (see `_codes_q5_0`)
     32 bytes  the 16 rows' float16 scales

Each block dot starts from -8 (Q4_0) or -16 (Q5_0) times the activation block's sum, as the
weights' codes are dotted unsigned (stored value = code + 8 or + 16).

Kernel arguments:
    xq  int8 [n_tok * k]       the Q8_0 activation codes
    xd  float32 [n_tok * nb]   their block scales
    wp  uint8                  the packed weights, flattened
    out float32 [n_tok, m]
"""

from __future__ import annotations

import mmap

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S
from llmx.quant.cpu.kmatmul import CHUNKS

GROUP_ROWS = 16
Q4_0_BLOCK_BYTES = 18
Q5_0_BLOCK_BYTES = 22
Q4_0_PACKED_BYTES = 288  # 16 rows x 18 bytes, regrouped
Q8_0_BLOCK_BYTES = 34
Q8_0_PACKED_BYTES = 544  # 16 rows x 34 bytes
Q5_0_PACKED_BYTES = 352  # 16 rows x 22 bytes
PLANES_AT = 256  # Q5_0's bit planes, after the nibbles
LLAMA_CPP_ROW_MULTIPLE = 8  # llama.cpp repacks only matrices with a multiple of 8 rows
AHEAD = 2  # row groups prefetched ahead (`prefetch`)
# Q8_0 (the tied output table: half a decode step) prefetches 16 blocks (8.5 KiB) ahead. Measured
# on gemma's 262144 x 640 at one token (Zen 4, `scripts/bench_kernels.py`): 8 groups ahead (87
# KiB, past the L1) read at 38.5 / 42 GB/s on 1 / 2 threads, 8.5 KiB ahead at 41 / 49.
Q8_0_AHEAD_BYTES = 16 * Q8_0_PACKED_BYTES
# One token's Q5_0 prefetches about as far, 8.4 KiB, where it took two groups (14 KiB at k = 640).
# `scripts/bench_kernels.py --cold`, one thread: 640 x 2048 31-33 -> 26-27 us on VNNI, 30-31 -> 28
# on AVX2; 4096 x 640 51-54 -> 44-52 us, about the same on AVX2 (half the distance: 12% slower)
Q5_0_AHEAD_BYTES = 24 * Q5_0_PACKED_BYTES


def pack_q4_0(w: np.ndarray) -> np.ndarray:
    """Q4_0 rows uint8 [m, nb * 18] -> the packed layout, uint8 [ceil(m / 16) * nb * 288]."""
    by_group = _grouped(w, Q4_0_BLOCK_BYTES)  # [g, 16, nb, 18]
    return _assemble(by_group[..., 2:], None, by_group[..., :2])


def pack_q5_0(w: np.ndarray) -> np.ndarray:
    """Q5_0 rows uint8 [m, nb * 22] -> the packed layout, uint8 [ceil(m / 16) * nb * 352]."""
    by_group = _grouped(w, Q5_0_BLOCK_BYTES)  # [g, 16, nb, 22]: d, qh (4 bytes), qs (16)
    qh = by_group[..., 2:6].view("<u4")[..., 0]  # [g, 16, nb]: bit v = value v's fifth bit
    # byte j of a lane holds values 4 (c % 4) + j (+ 16 for c >= 4) in unpacked vector c: bits
    # j, j + 4, ..., j + 28 of qh, gathered into one byte (bit c)
    planes = np.stack([_every_fourth_bit(qh >> j) for j in range(4)], axis=-1)  # [g, 16, nb, 4]
    return _assemble(by_group[..., 6:], planes, by_group[..., :2])


def pack_q8_0(w: np.ndarray) -> np.ndarray:
    """Q8_0 rows uint8 [m, nb * 34] -> the packed layout, uint8 [ceil(m / 16) * nb * 544]: 8 code
    vectors (vector v, lane r = row r's values 4v..4v+3), then the 16 rows' float16 scales. A
    Numba loop: a tied output table is large (gemma's: 178 MB, 0.35 s through numpy's strided
    copies, 0.03 s here)."""
    m, row_bytes = w.shape
    nb = row_bytes // Q8_0_BLOCK_BYTES
    out = records(-(-m // GROUP_ROWS), nb, Q8_0_PACKED_BYTES).reshape(-1)
    _pack_q8_0(np.ascontiguousarray(w).reshape(-1), m, nb, out.view(np.uint32), out.view(np.uint16))
    return out


@njit(cache=True, nogil=True)
def _pack_q8_0(w, m, nb, out32, out16):
    """Rows read in order into their records (rows past m: zeros). One thread:
    this runs at load, on the caller's thread, and a parallel region there would start a second
    OpenMP team beside the compute thread's (measured: decoding then ran at half speed)."""
    row_bytes = nb * Q8_0_BLOCK_BYTES
    record = Q8_0_PACKED_BYTES // 4  # uint32 per record
    if m % GROUP_ROWS:  # the padding rows of a last, part-full group
        out32[(m // GROUP_ROWS) * nb * record:] = 0
    for row in range(m):  # each row read in order; its group's records (~11 KB) stay in L1
        g, r = row // GROUP_ROWS, row % GROUP_ROWS
        src = row * row_bytes
        for b in range(nb):
            rec = (g * nb + b) * record
            for v in range(8):
                out32[rec + 16 * v + r] = S.load_u32(w, src + 2 + 4 * v)
            out16[2 * rec + 256 + r] = w[src] | (np.uint16(w[src + 1]) << 8)
            src += Q8_0_BLOCK_BYTES


def q8_0_rows(wp: np.ndarray, rows: np.ndarray, nb: int) -> np.ndarray:
    """Rows of a packed Q8_0 matrix back in the stored layout, uint8 [len(rows), nb * 34] (a tied
    embedding table is read by rows from its packed copy)."""
    out = np.empty((len(rows), nb * Q8_0_BLOCK_BYTES), np.uint8)
    _q8_0_rows(wp, np.asarray(rows, np.int64), nb, out)
    return out


@njit(cache=True, nogil=True)
def _q8_0_rows(wp, rows, nb, out):
    """One kernel call: a decode step embeds one token, and numpy's gathers took ~20 us for it."""
    for i in range(len(rows)):
        g, r = rows[i] // GROUP_ROWS, rows[i] % GROUP_ROWS
        for b in range(nb):
            record, dst = (g * nb + b) * Q8_0_PACKED_BYTES, b * Q8_0_BLOCK_BYTES
            out[i, dst], out[i, dst + 1] = wp[record + 512 + 2 * r], wp[record + 513 + 2 * r]
            for v in range(8):
                for j in range(4):
                    out[i, dst + 2 + 4 * v + j] = wp[record + 64 * v + 4 * r + j]


def _every_fourth_bit(x: np.ndarray) -> np.ndarray:
    """Bits 0, 4, ..., 28 of each uint32, as bits 0..7 of a byte."""
    x = x & np.uint32(0x11111111)
    x = (x | (x >> 3)) & np.uint32(0x03030303)
    x = (x | (x >> 6)) & np.uint32(0x000F000F)
    return ((x | (x >> 12)) & np.uint32(0xFF)).astype(np.uint8)


def records(groups: int, nb: int, record_bytes: int) -> np.ndarray:
    """uint8 [groups, nb, record_bytes] for a packed matrix, its pages mapped up front: the kernel
    maps a populated anonymous mapping in 56 ms per 178 MB where first writes fault page by page
    in 215 ms (measured; no transparent huge pages here), and warm start counts every 0.1 s."""
    n_bytes = groups * nb * record_bytes
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate or n_bytes < (1 << 20):
        return np.empty((groups, nb, record_bytes), np.uint8)
    mapping = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(mapping, np.uint8).reshape(groups, nb, record_bytes)  # keeps the mapping alive


def _grouped(w: np.ndarray, block_bytes: int) -> np.ndarray:
    """uint8 [m, nb * block_bytes] -> [groups, 16, nb, block_bytes], padded with zero rows (a view
    when m is a multiple of 16)."""
    m, row_bytes = w.shape
    nb = row_bytes // block_bytes
    groups = -(-m // GROUP_ROWS)
    if m % GROUP_ROWS:
        padded = np.zeros((groups * GROUP_ROWS, row_bytes), np.uint8)
        padded[:m] = w
        w = padded
    return w.reshape(groups, GROUP_ROWS, nb, block_bytes)


def fill(out: np.ndarray, at: int, part: np.ndarray) -> int:
    """Copy `part` [g, b, ...] into bytes at.. of each (group, block) record of out uint8 [g, b,
    record bytes], in one pass; returns the end. Give `part` in its widest unit (the 4 code bytes
    of a lane as one uint32, not 4 bytes): numpy moves one element per step."""
    end = at + int(np.prod(part.shape[2:])) * part.itemsize
    out[:, :, at:end].view(part.dtype).reshape(part.shape)[...] = part
    return end


def _assemble(qs: np.ndarray, planes: np.ndarray | None, scales: np.ndarray) -> np.ndarray:
    """Per (group, block): the nibbles [g, 16, nb, 16] regrouped, the bit planes [g, 16, nb, 4]
    (or none) and the scales [g, 16, nb, 2], each rows-innermost."""
    groups, _, nb, _ = qs.shape
    out = records(groups, nb, 288 if planes is None else 352)
    at = fill(out, 0, qs.view(np.uint32).transpose(0, 2, 3, 1))  # [g, b, i, r]: row r's bytes 4i..4i+3
    if planes is not None:
        at = fill(out, at, planes.view(np.uint32)[..., 0].transpose(0, 2, 1))  # [g, b, r]
    fill(out, at, scales.view(np.uint16)[..., 0].transpose(0, 2, 1))  # [g, b, r]
    return out.reshape(-1)


@njit
def prefetch(wp, at, n_bytes):
    """Hint the lines of wp[at:at + n_bytes] into cache: each block step asks for the same block
    of the group AHEAD groups on. A group's bytes span pages, where the hardware prefetcher
    stops: without this a cold Q4_K matrix read at 17 GB/s on one thread (AVX2), with it 33,
    against 40 streaming."""
    for p in range(0, n_bytes, 64):
        S.prefetch(wp, at + p)


@njit
def prefetch_once(wp, at, n_bytes):
    """`prefetch` for bytes read once: the tiles of one token (`simd.prefetch_once`). Tiles of
    several tokens keep `prefetch`: a prompt's next tile reads the same group again."""
    for p in range(0, n_bytes, 64):
        S.prefetch_once(wp, at + p)


@njit
def _codes_q4_0(wp, at):
    """A packed block's 16 x 32 codes (stored, 0..15) as 8 vectors: vector c, lane r = row r's
    values 4c..4c+3."""
    v0, v1, v2, v3 = S.load_i8x64(wp, at), S.load_i8x64(wp, at + 64), S.load_i8x64(wp, at + 128), \
        S.load_i8x64(wp, at + 192)
    return (S.nibbles_i8x64(v0, 0), S.nibbles_i8x64(v1, 0), S.nibbles_i8x64(v2, 0), S.nibbles_i8x64(v3, 0),
            S.nibbles_i8x64(v0, 1), S.nibbles_i8x64(v1, 1), S.nibbles_i8x64(v2, 1), S.nibbles_i8x64(v3, 1))


@njit
def _codes_q5_0(wp, at):
    """As `_codes_q4_0`, each code with its fifth bit from the planes (stored, 0..31)."""
    c = _codes_q4_0(wp, at)
    p = S.load_i8x64(wp, at + PLANES_AT)
    return (S.or_i8x64(c[0], S.plane_bit_i8x64(p, 0)), S.or_i8x64(c[1], S.plane_bit_i8x64(p, 1)),
            S.or_i8x64(c[2], S.plane_bit_i8x64(p, 2)), S.or_i8x64(c[3], S.plane_bit_i8x64(p, 3)),
            S.or_i8x64(c[4], S.plane_bit_i8x64(p, 4)), S.or_i8x64(c[5], S.plane_bit_i8x64(p, 5)),
            S.or_i8x64(c[6], S.plane_bit_i8x64(p, 6)), S.or_i8x64(c[7], S.plane_bit_i8x64(p, 7)))


@njit
def _step(isa, c, dw, xq, xd, xs, i, acc):
    """acc + float(the 16 rows' block dots with activation block i) x (dw x dx), one rounding."""
    at = 32 * i
    x = S.splat_u32_i8x64
    dot = S.dot16x4_u8i8_acc(isa, S.splat_i32x16(xs[i]), c[0], x(xq, at), c[1], x(xq, at + 4),
                             c[2], x(xq, at + 8), c[3], x(xq, at + 12))
    dot = S.dot16x4_u8i8_acc(isa, dot, c[4], x(xq, at + 16), c[5], x(xq, at + 20),
                             c[6], x(xq, at + 24), c[7], x(xq, at + 28))
    return S.fma_f32x16(acc, dot, S.scale_f32x16(dw, xd[i]))


@njit
def _store(out, t, r0, m, acc, spill):
    """Rows r0..r0+15 of token t's output (fewer in a padded last group)."""
    if r0 + GROUP_ROWS <= m:
        S.store_f32x16(out, 4 * (t * m + r0), acc)
    else:
        S.store_f32x16(spill, 0, acc)
        for i in range(m - r0):  # (a slice assignment compiles numba's shape checks: 1.4 s)
            out[t * m + r0 + i] = spill[i]


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _tile_4(isa, codes, block_bytes, ahead, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    """16 rows x tokens t..t+3: each block's codes unpacked once for four tokens; each block
    prefetches the one `ahead` bytes on."""
    a0 = a1 = a2 = a3 = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * block_bytes
        prefetch(wp, at + ahead, block_bytes)
        c = codes(wp, at)
        dw = S.load_f16_f32x16(wp, at + block_bytes - 32)
        a0 = _step(isa, c, dw, xq, xd, xs, t * nb + b, a0)
        a1 = _step(isa, c, dw, xq, xd, xs, (t + 1) * nb + b, a1)
        a2 = _step(isa, c, dw, xq, xd, xs, (t + 2) * nb + b, a2)
        a3 = _step(isa, c, dw, xq, xd, xs, (t + 3) * nb + b, a3)
    _store(out, t, r0, m, a0, spill)
    _store(out, t + 1, r0, m, a1, spill)
    _store(out, t + 2, r0, m, a2, spill)
    _store(out, t + 3, r0, m, a3, spill)


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _tile_1(isa, codes, block_bytes, ahead, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    acc = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * block_bytes
        prefetch_once(wp, at + ahead, block_bytes)
        acc = _step(isa, codes(wp, at), S.load_f16_f32x16(wp, at + block_bytes - 32), xq, xd, xs, t * nb + b, acc)
    _store(out, t, r0, m, acc, spill)


@njit(inline="always")  # takes a function: inlined, so that it is a constant
def _tile_8(isa, codes, block_bytes, ahead, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    """`_tile_4` for tokens t..t+7 (AVX-512's 32 registers hold its sums: `walk_groups`)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * block_bytes
        prefetch(wp, at + ahead, block_bytes)
        c = codes(wp, at)
        dw = S.load_f16_f32x16(wp, at + block_bytes - 32)
        i = t * nb + b
        a0 = _step(isa, c, dw, xq, xd, xs, i, a0)
        a1 = _step(isa, c, dw, xq, xd, xs, i + nb, a1)
        a2 = _step(isa, c, dw, xq, xd, xs, i + 2 * nb, a2)
        a3 = _step(isa, c, dw, xq, xd, xs, i + 3 * nb, a3)
        a4 = _step(isa, c, dw, xq, xd, xs, i + 4 * nb, a4)
        a5 = _step(isa, c, dw, xq, xd, xs, i + 5 * nb, a5)
        a6 = _step(isa, c, dw, xq, xd, xs, i + 6 * nb, a6)
        a7 = _step(isa, c, dw, xq, xd, xs, i + 7 * nb, a7)
    for k, acc in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
        _store(out, t + k, r0, m, acc, spill)


@njit
def _block_starts(xq, nb, n_tok, offset):
    """int32 [n_tok * nb]: -offset x each activation block's sum, where its block dots start."""
    starts = np.empty(n_tok * nb, np.int32)
    for i in range(n_tok * nb):
        total = 0
        for j in range(32 * i, 32 * i + 32):
            total += xq[j]
        starts[i] = -offset * total
    return starts


@njit(inline="always")  # takes functions: inlined, so that they are constants
def walk_groups(tile_8, tile_4, tile_1, record_bytes, isa, wp, nb, m, n_tok, xq, xd, xs, out):
    """Every packed kernel's loop: row groups split into CHUNKS parallel shares, each group's
    tokens in tiles of eight (`tile_8`; None for none), then four, then one by one. A tile is
    called as tile(isa, wp, group's first byte, nb, xq, xd, xs, first token, out flat, first
    row, m, spill), and takes the same steps for a token as every other tile.

    Tiles of eight need AVX-512's 32 registers and pay where a block's codes cost as much as
    its dots: Q8_0 on VNNI takes them (batch-16 output matmul 8.3 -> 7.4-8.2 ms), Q5_0's
    prompts were no faster with them (`scripts/profile_decode.py --prefill 512`)."""
    n_groups = -(-m // GROUP_ROWS)
    n_chunks = min(CHUNKS, n_groups)
    flat_out = out.reshape(-1)
    for chunk in prange(n_chunks):
        spill = np.empty(GROUP_ROWS, np.float32)
        for g in range(chunk * n_groups // n_chunks, (chunk + 1) * n_groups // n_chunks):
            g_at = g * nb * record_bytes
            t = 0
            if tile_8 is not None:  # (a None argument: Numba prunes this branch)
                while t + 8 <= n_tok:
                    tile_8(isa, wp, g_at, nb, xq, xd, xs, t, flat_out, g * GROUP_ROWS, m, spill)
                    t += 8
            while t + 4 <= n_tok:
                tile_4(isa, wp, g_at, nb, xq, xd, xs, t, flat_out, g * GROUP_ROWS, m, spill)
                t += 4
            while t < n_tok:
                tile_1(isa, wp, g_at, nb, xq, xd, xs, t, flat_out, g * GROUP_ROWS, m, spill)
                t += 1


@njit(inline="always")
def _q4_0_tile_4(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _tile_4(isa, _codes_q4_0, Q4_0_PACKED_BYTES, AHEAD * nb * Q4_0_PACKED_BYTES, wp, g_at, nb, xq, xd, xs, t, out,
            r0, m, spill)


@njit(inline="always")
def _q4_0_tile_1(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _tile_1(isa, _codes_q4_0, Q4_0_PACKED_BYTES, AHEAD * nb * Q4_0_PACKED_BYTES, wp, g_at, nb, xq, xd, xs, t, out,
            r0, m, spill)


@njit(inline="always")
def _q5_0_tile_4(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _tile_4(isa, _codes_q5_0, Q5_0_PACKED_BYTES, AHEAD * nb * Q5_0_PACKED_BYTES, wp, g_at, nb, xq, xd, xs, t, out,
            r0, m, spill)


@njit(inline="always")
def _q5_0_tile_1(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _tile_1(isa, _codes_q5_0, Q5_0_PACKED_BYTES, Q5_0_AHEAD_BYTES, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill)


@njit(cache=True, nogil=True, parallel=True)
def repacked_q4_0(xq, xd, wp, nb, m, n_tok, out, isa):
    xs = _block_starts(xq, nb, n_tok, 8)
    walk_groups(None, _q4_0_tile_4, _q4_0_tile_1, Q4_0_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd, xs, out)


@njit(cache=True, nogil=True, parallel=True)
def repacked_q5_0(xq, xd, wp, nb, m, n_tok, out, isa):
    xs = _block_starts(xq, nb, n_tok, 16)
    walk_groups(None, _q5_0_tile_4, _q5_0_tile_1, Q5_0_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd, xs, out)

# -- Q8_0: signed codes (AVX2 and portable: `simd.dot16_q8_acc`; VNNI: `repacked_q8_0_vnni`) ---------


@njit
def _q8_codes(wp, at):
    return (S.load_i8x64(wp, at), S.load_i8x64(wp, at + 64), S.load_i8x64(wp, at + 128), S.load_i8x64(wp, at + 192),
            S.load_i8x64(wp, at + 256), S.load_i8x64(wp, at + 320), S.load_i8x64(wp, at + 384),
            S.load_i8x64(wp, at + 448))


@njit
def _q8_step(isa, c, dw, xq, xd, i, acc):
    """acc + float(the 16 rows' dots with activation block i) x (dw x dx)."""
    at = 32 * i
    x = S.splat_u32_i8x64
    dot = S.dot16_q8_acc(isa, S.zero_i32x16(), c[0], x(xq, at))
    dot = S.dot16_q8_acc(isa, dot, c[1], x(xq, at + 4))
    dot = S.dot16_q8_acc(isa, dot, c[2], x(xq, at + 8))
    dot = S.dot16_q8_acc(isa, dot, c[3], x(xq, at + 12))
    dot = S.dot16_q8_acc(isa, dot, c[4], x(xq, at + 16))
    dot = S.dot16_q8_acc(isa, dot, c[5], x(xq, at + 20))
    dot = S.dot16_q8_acc(isa, dot, c[6], x(xq, at + 24))
    dot = S.dot16_q8_acc(isa, dot, c[7], x(xq, at + 28))
    return S.fma_f32x16(acc, dot, S.scale_f32x16(dw, xd[i]))


@njit(inline="always")
def _q8_vector_4(isa, wp, at, v, xq, i0, i1, i2, i3, d0, d1, d2, d3):
    """Code vector v of a block (values 4v..4v+3 of 16 rows), loaded here, into four tokens' dots."""
    w, x, off = S.load_i8x64(wp, at + 64 * v), S.splat_u32_i8x64, 4 * v
    return (S.dot16_q8_acc(isa, d0, w, x(xq, 32 * i0 + off)), S.dot16_q8_acc(isa, d1, w, x(xq, 32 * i1 + off)),
            S.dot16_q8_acc(isa, d2, w, x(xq, 32 * i2 + off)), S.dot16_q8_acc(isa, d3, w, x(xq, 32 * i3 + off)))


@njit
def _q8_tile_4(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):  # xs: unused
    """Code vector by code vector, each loaded just before its four tokens use it: only one
    vector and its |w| are live, where loading a block's eight first held 16 of AVX2's 16
    registers and spilled (batch-16 output matmul on AVX2: 20.6 -> 15.4-16.2 ms, 2 threads)."""
    a0 = a1 = a2 = a3 = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * Q8_0_PACKED_BYTES
        prefetch(wp, at + Q8_0_AHEAD_BYTES, Q8_0_PACKED_BYTES)
        i0, i1, i2, i3 = t * nb + b, (t + 1) * nb + b, (t + 2) * nb + b, (t + 3) * nb + b
        d0 = d1 = d2 = d3 = S.zero_i32x16()
        for v in range(8):
            d0, d1, d2, d3 = _q8_vector_4(isa, wp, at, v, xq, i0, i1, i2, i3, d0, d1, d2, d3)
        dw = S.load_f16_f32x16(wp, at + 512)
        a0 = S.fma_f32x16(a0, d0, S.scale_f32x16(dw, xd[i0]))
        a1 = S.fma_f32x16(a1, d1, S.scale_f32x16(dw, xd[i1]))
        a2 = S.fma_f32x16(a2, d2, S.scale_f32x16(dw, xd[i2]))
        a3 = S.fma_f32x16(a3, d3, S.scale_f32x16(dw, xd[i3]))
    _store(out, t, r0, m, a0, spill)
    _store(out, t + 1, r0, m, a1, spill)
    _store(out, t + 2, r0, m, a2, spill)
    _store(out, t + 3, r0, m, a3, spill)


@njit
def _q8_tile_1(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):  # xs: unused
    acc = S.zero_f32x16()
    for b in range(nb):
        at = g_at + b * Q8_0_PACKED_BYTES
        prefetch_once(wp, at + Q8_0_AHEAD_BYTES, Q8_0_PACKED_BYTES)
        c = _q8_codes(wp, at)
        acc = _q8_step(isa, c, S.load_f16_f32x16(wp, at + 512), xq, xd, t * nb + b, acc)
    _store(out, t, r0, m, acc, spill)


@njit
def _q8_codes_unsigned(wp, at):
    """A block's 8 code vectors as code + 128 (`_codes_q4_0`'s shape, 0..255): dotted as unsigned,
    with the activations' sums taking the 128 back, as Q4_0 and Q5_0 take their 8 and 16 back."""
    c = _q8_codes(wp, at)
    f = S.flip_sign_i8x64
    return f(c[0]), f(c[1]), f(c[2]), f(c[3]), f(c[4]), f(c[5]), f(c[6]), f(c[7])


@njit(inline="always")
def _q8_vnni_tile_8(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _tile_8(isa, _q8_codes_unsigned, Q8_0_PACKED_BYTES, Q8_0_AHEAD_BYTES, wp, g_at, nb, xq, xd, xs, t, out, r0, m,
            spill)


@njit(inline="always")
def _q8_vnni_tile_4(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _tile_4(isa, _q8_codes_unsigned, Q8_0_PACKED_BYTES, Q8_0_AHEAD_BYTES, wp, g_at, nb, xq, xd, xs, t, out, r0, m,
            spill)


@njit(inline="always")
def _q8_vnni_tile_1(isa, wp, g_at, nb, xq, xd, xs, t, out, r0, m, spill):
    _tile_1(isa, _q8_codes_unsigned, Q8_0_PACKED_BYTES, Q8_0_AHEAD_BYTES, wp, g_at, nb, xq, xd, xs, t, out, r0, m,
            spill)


@njit(cache=True, nogil=True, parallel=True)
def repacked_q8_0_vnni(xq, xd, wp, nb, m, n_tok, out, isa):
    """`repacked_q8_0` on VNNI: xq the signed activation codes, and each weight code vector made
    unsigned by one xor (`_q8_codes_unsigned`). Unsigned activations (x + 128) would instead need
    8 more `vpdpbusd` per block for the weights' sums: a quarter more dots at four tokens, for
    the same integers and so the same bits."""
    xs = _block_starts(xq, nb, n_tok, 128)
    walk_groups(None, _q8_vnni_tile_4, _q8_vnni_tile_1, Q8_0_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd, xs, out)


@njit(cache=True, nogil=True, parallel=True)
def repacked_q8_0_vnni_wide(xq, xd, wp, nb, m, n_tok, out, isa):
    """`repacked_q8_0_vnni` in tiles of eight tokens (AVX-512); the same bits."""
    xs = _block_starts(xq, nb, n_tok, 128)
    walk_groups(_q8_vnni_tile_8, _q8_vnni_tile_4, _q8_vnni_tile_1, Q8_0_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd,
                xs, out)


@njit(cache=True, nogil=True, parallel=True)
def repacked_q8_0(xq, xd, wp, nb, m, n_tok, out, isa):
    """xq: the activation codes; AVX2 or portable `isa` (VNNI: `repacked_q8_0_vnni`)."""
    no_starts = np.empty(0, np.int32)
    walk_groups(None, _q8_tile_4, _q8_tile_1, Q8_0_PACKED_BYTES, isa, wp, nb, m, n_tok, xq, xd, no_starts, out)
