"""Causal attention over the paged KV cache: a Numba kernel that reads K/V through the block table.

It computes what llama.cpp's CPU graph computes without flash attention, in the same order:
- queries rounded to float16 (ggml converts the f32 side of an F16 matmul to F16);
- scores q.k: in a batch of 2+ tokens ggml's mul_mat goes to llamafile's tinyBLAS (one 8-lane
  accumulator over the head dimension, then its hsum); for a single token it goes to
  ggml_vec_dot_f16 (4 x 8 lanes, ggml's reduction, leftovers added in double);
- softmax: scores * kq_scale, masked (causal; sliding-window layers keep the last `window`
  positions), max subtracted, ggml's AVX2 vector exp, sums of 8 in float then in double,
  multiplied by float(1 / sum);
- probabilities rounded to float16, times V in the same two orders (lanes run over KV cells).
Products of two float16 values are exact in float32, so only the order of additions matters,
and that is what this file reproduces. On gemma-3 a last-bit change in one layer moves the
logits by ~0.1, so the order is worth keeping.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S

# ggml_v_expf (AVX2): exp(x) = 2^n * (1 + p(b)) with n = round(x / ln 2), b = x - n ln 2;
# `simd.ggml_expf_f32x8` computes it on 8 lanes from these constants.
_SHIFT = np.float32(float.fromhex("0x1.8p23"))
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))
_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))


@njit(cache=True, nogil=True, inline="always")
def dot_tiled(q, q_at, pool, k_at, d):
    """tinyBLAS: float32 q (bytes from q_at) . float16 k (bytes from k_at), one 8-lane accumulator."""
    acc = S.zero_f32x8()
    for c in range(d // 8):
        acc = S.fmadd_f32x8(acc, S.load_f32x8(q, q_at + 32 * c), S.load_f16x8(pool, k_at + 16 * c))
    return S.hsum_f32x8(acc)


@njit(cache=True, nogil=True, inline="always")
def dot_tiled_4(q, q_at, pool, k0, k1, k2, k3, d):
    """`dot_tiled` for four keys at once: the same order per key, but four independent FMA chains
    (one chain waits ~4 cycles per step; four keep the FMA units busy)."""
    a0, a1, a2, a3 = S.zero_f32x8(), S.zero_f32x8(), S.zero_f32x8(), S.zero_f32x8()
    for c in range(d // 8):
        qv = S.load_f32x8(q, q_at + 32 * c)
        a0 = S.fmadd_f32x8(a0, qv, S.load_f16x8(pool, k0 + 16 * c))
        a1 = S.fmadd_f32x8(a1, qv, S.load_f16x8(pool, k1 + 16 * c))
        a2 = S.fmadd_f32x8(a2, qv, S.load_f16x8(pool, k2 + 16 * c))
        a3 = S.fmadd_f32x8(a3, qv, S.load_f16x8(pool, k3 + 16 * c))
    return S.hsum_f32x8(a0), S.hsum_f32x8(a1), S.hsum_f32x8(a2), S.hsum_f32x8(a3)


@njit(cache=True, nogil=True, inline="always")
def _cell(table, j, block_size, n_head_kv, kv_head):
    return (table[j // block_size] * block_size + j % block_size) * n_head_kv + kv_head


@njit(cache=True, nogil=True, inline="always")
def _scores_4(q, q_at, k_pool, table, j, block_size, n_head_kv, kv_head, d, kq_scale, scores):
    """scores[j..j+3] = q . k_j * kq_scale in tinyBLAS's order."""
    k0 = 2 * d * _cell(table, j, block_size, n_head_kv, kv_head)
    k1 = 2 * d * _cell(table, j + 1, block_size, n_head_kv, kv_head)
    k2 = 2 * d * _cell(table, j + 2, block_size, n_head_kv, kv_head)
    k3 = 2 * d * _cell(table, j + 3, block_size, n_head_kv, kv_head)
    s0, s1, s2, s3 = dot_tiled_4(q, q_at, k_pool, k0, k1, k2, k3, d)
    scores[j], scores[j + 1], scores[j + 2], scores[j + 3] = s0 * kq_scale, s1 * kq_scale, s2 * kq_scale, s3 * kq_scale


@njit(cache=True, nogil=True, inline="always")
def dot_ggml(q, q_at, pool, k_at, d):
    """ggml_vec_dot_f16: 4 accumulators of 8 lanes over steps of 32, reduced, leftovers in double."""
    a0, a1, a2, a3 = S.zero_f32x8(), S.zero_f32x8(), S.zero_f32x8(), S.zero_f32x8()
    whole = d - d % 32
    for c in range(0, whole, 32):
        a0 = S.fmadd_f32x8(a0, S.load_f32x8(q, q_at + 4 * c), S.load_f16x8(pool, k_at + 2 * c))
        a1 = S.fmadd_f32x8(a1, S.load_f32x8(q, q_at + 4 * c + 32), S.load_f16x8(pool, k_at + 2 * c + 16))
        a2 = S.fmadd_f32x8(a2, S.load_f32x8(q, q_at + 4 * c + 64), S.load_f16x8(pool, k_at + 2 * c + 32))
        a3 = S.fmadd_f32x8(a3, S.load_f32x8(q, q_at + 4 * c + 96), S.load_f16x8(pool, k_at + 2 * c + 48))
    total = np.float64(S.hadd_sum_f32x8(S.add_f32x8(S.add_f32x8(a0, a2), S.add_f32x8(a1, a3))))
    for i in range(whole, d):
        total += np.float64(S.load_f32(q, q_at + 4 * i) * S.load_f16(pool, k_at + 2 * i))
    return np.float32(total)


@njit(cache=True, nogil=True, inline="always")
def _add_scaled_row(row, p, pool, v_at, dv):
    """row (float32 [dv]) += p * v (float16 bytes from v_at), 8 lanes at a time. Products of two
    float16 values are exact, so the FMA rounds as the separate product and sum would."""
    raw = row.view(np.uint8)
    dv8 = dv - dv % 8
    scale = S.splat_f32x8(p)
    for i in range(0, dv8, 8):
        S.store_f32x8(raw, 4 * i, S.fmadd_f32x8(S.load_f32x8(raw, 4 * i), scale, S.load_f16x8(pool, v_at + 2 * i)))
    for i in range(dv8, dv):
        row[i] += p * S.load_f16(pool, v_at + 2 * i)


@njit(cache=True, nogil=True, inline="always")
def sum8_tree(v):
    """(v0+v4 + v2+v6) + (v1+v5 + v3+v7): the hsum order of tinyBLAS and of ggml's softmax."""
    q0, q1, q2, q3 = v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]
    return (q0 + q2) + (q1 + q3)


@njit(cache=True, nogil=True, inline="always")
def sum32_ggml(v):
    """ggml_vec_dot_f16's reduction of 4 x 8 lanes (lane l of accumulator a is v[8a + l])."""
    y = np.empty(8, np.float32)
    for m in range(8):
        y[m] = (v[m] + v[16 + m]) + (v[8 + m] + v[24 + m])
    t0, t1, t2, t3 = y[0] + y[4], y[1] + y[5], y[2] + y[6], y[3] + y[7]
    return (t0 + t1) + (t2 + t3)


_EXP_CONSTANTS = (_SHIFT, _LOG2E, _LN2_HI, _LN2_LO, _C1, _C2, _C3, _C4, _C5)
PAD = 8  # scores arrays run this far past `last`: softmax reads and writes whole groups of 8


@njit(cache=True, nogil=True, inline="always")
def softmax_f16(scores, first, last):
    """In place over scores[first..last]: probabilities, rounded to float16 as ggml feeds them to V.
    Groups of 8 from a multiple of 8 (ggml's row starts at cell 0; cells outside [first, last]
    are masked to exp = 0), each summed in tinyBLAS/ggml's tree then added in double. `scores`
    must have PAD cells past `last`."""
    top = scores[first]
    for j in range(first + 1, last + 1):
        top = max(top, scores[j])
    raw = scores.view(np.uint8)
    shift = S.splat_f32x8(top)
    total = 0.0
    for start in range(first - first % 8, last + 1, 8):
        e = S.ggml_expf_f32x8(S.sub_f32x8(S.load_f32x8(raw, 4 * start), shift), _EXP_CONSTANTS)
        e = S.keep_lanes_f32x8(e, start, first, last)
        S.store_f32x8(raw, 4 * start, e)
        total += np.float64(S.hsum_f32x8(e))
    inverse = np.float32(1.0 / total)
    for j in range(first, last + 1):
        scores[j] = S.round_f16(scores[j] * inverse)


@njit(cache=True, nogil=True, inline="always")
def _dot_heads_4(q, q_at, head_bytes, pool, k_at, d):
    """tinyBLAS's q.k for four query heads (bytes from q_at, head_bytes apart) against one key:
    each key vector is converted once, and the four FMA chains run side by side."""
    a0, a1, a2, a3 = S.zero_f32x8(), S.zero_f32x8(), S.zero_f32x8(), S.zero_f32x8()
    for c in range(d // 8):
        kv = S.load_f16x8(pool, k_at + 16 * c)
        a0 = S.fmadd_f32x8(a0, S.load_f32x8(q, q_at + 32 * c), kv)
        a1 = S.fmadd_f32x8(a1, S.load_f32x8(q, q_at + head_bytes + 32 * c), kv)
        a2 = S.fmadd_f32x8(a2, S.load_f32x8(q, q_at + 2 * head_bytes + 32 * c), kv)
        a3 = S.fmadd_f32x8(a3, S.load_f32x8(q, q_at + 3 * head_bytes + 32 * c), kv)
    return S.hsum_f32x8(a0), S.hsum_f32x8(a1), S.hsum_f32x8(a2), S.hsum_f32x8(a3)


@njit(cache=True, nogil=True, inline="always")
def _add_scaled_rows_4(r0, r1, r2, r3, p0, p1, p2, p3, pool, v_at, dv):
    """`_add_scaled_row` for four heads' rows and probabilities: each value vector converted once."""
    b0, b1, b2, b3 = r0.view(np.uint8), r1.view(np.uint8), r2.view(np.uint8), r3.view(np.uint8)
    s0, s1, s2, s3 = S.splat_f32x8(p0), S.splat_f32x8(p1), S.splat_f32x8(p2), S.splat_f32x8(p3)
    dv8 = dv - dv % 8
    for i in range(0, dv8, 8):
        vv = S.load_f16x8(pool, v_at + 2 * i)
        S.store_f32x8(b0, 4 * i, S.fmadd_f32x8(S.load_f32x8(b0, 4 * i), s0, vv))
        S.store_f32x8(b1, 4 * i, S.fmadd_f32x8(S.load_f32x8(b1, 4 * i), s1, vv))
        S.store_f32x8(b2, 4 * i, S.fmadd_f32x8(S.load_f32x8(b2, 4 * i), s2, vv))
        S.store_f32x8(b3, 4 * i, S.fmadd_f32x8(S.load_f32x8(b3, 4 * i), s3, vv))
    for i in range(dv8, dv):
        v = S.load_f16(pool, v_at + 2 * i)
        r0[i] += p0 * v
        r1[i] += p1 * v
        r2[i] += p2 * v
        r3[i] += p3 * v


@njit(cache=True, nogil=True, inline="always")
def _attend_heads_4(q_flat, k_pool, v_pool, table, block_size, n_head_kv, kv_head, t, h0, n_head, d, dv,
                    first, last, kq_scale, out):
    """Query heads h0..h0+3 of row t, which share kv_head, in the batched (tinyBLAS) order: the
    same arithmetic as four `_attend_head` calls, with each K and V vector converted once."""
    scores = np.empty((4, last + 1 + PAD), np.float32)
    q_at = 4 * (t * n_head + h0) * d
    for j in range(first, last + 1):
        k_at = 2 * d * _cell(table, j, block_size, n_head_kv, kv_head)
        s0, s1, s2, s3 = _dot_heads_4(q_flat, q_at, 4 * d, k_pool, k_at, d)
        scores[0, j], scores[1, j], scores[2, j], scores[3, j] = s0 * kq_scale, s1 * kq_scale, s2 * kq_scale, \
            s3 * kq_scale
    for g in range(4):
        softmax_f16(scores[g], first, last)
    acc = np.zeros((4, 8, dv), np.float32)  # [head, lane j % 8, dv]
    for j in range(first, last + 1):
        p0, p1, p2, p3 = scores[0, j], scores[1, j], scores[2, j], scores[3, j]
        if p0 == 0 and p1 == 0 and p2 == 0 and p3 == 0:
            continue  # (a zero probability adds +-0 to a sum that is never -0: no change)
        v_at = 2 * dv * _cell(table, j, block_size, n_head_kv, kv_head)
        lane = j % 8
        _add_scaled_rows_4(acc[0, lane], acc[1, lane], acc[2, lane], acc[3, lane], p0, p1, p2, p3, v_pool, v_at, dv)
    for g in range(4):
        for i in range(dv):
            out[t, h0 + g, i] = sum8_tree(acc[g, :, i])


@njit(cache=True, nogil=True, inline="always")
def _attend_head(q_flat, k_pool, v_pool, table, block_size, n_head_kv, kv_head, t, h, n_head, d, dv,
                 first, last, kq_scale, k_tiled, v_lanes, out):
    """Query head h of row t."""
    scores = np.empty(last + 1 + PAD, np.float32)
    q_at = 4 * (t * n_head + h) * d
    quads_end = first + (last + 1 - first) // 4 * 4 if k_tiled else first
    for j in range(first, quads_end, 4):
        _scores_4(q_flat, q_at, k_pool, table, j, block_size, n_head_kv, kv_head, d, kq_scale, scores)
    for j in range(quads_end, last + 1):
        cell = _cell(table, j, block_size, n_head_kv, kv_head)
        s = dot_tiled(q_flat, q_at, k_pool, 2 * cell * d, d) if k_tiled else dot_ggml(
            q_flat, q_at, k_pool, 2 * cell * d, d)
        scores[j] = s * kq_scale
    softmax_f16(scores, first, last)
    # V product: lane j % v_lanes of every output dimension accumulates p_j * v_j (exact products).
    acc = np.zeros((v_lanes, dv), np.float32)
    for j in range(first, last + 1):
        p = scores[j]
        if p == 0:
            continue
        cell = _cell(table, j, block_size, n_head_kv, kv_head)
        _add_scaled_row(acc[j % v_lanes], p, v_pool, 2 * cell * dv, dv)
    for i in range(dv):
        out[t, h, i] = sum8_tree(acc[:, i]) if v_lanes == 8 else sum32_ggml(acc[:, i])


@njit(cache=True, nogil=True, parallel=True)
def attend_kernel(q, k_pool, v_pool, tables, row_seq, block_size, positions, window, group, kq_scale, tiled, out):
    """q float32 [n, n_head, d] (float16-exact values); k_pool/v_pool one layer's cache as bytes of
    float16 [n_blocks, block_size, n_head_kv, d or dv]; tables int32 [n_seqs, blocks] the block ids
    of each sequence, row_seq int64 [n] the sequence of each query row; positions int64 [n];
    out float32 [n, n_head, dv]. `tiled`: the batch has 2+ tokens."""
    n, n_head, d = q.shape
    dv = out.shape[2]
    n_head_kv = n_head // group
    q_flat = q.reshape(-1)
    k_tiled = tiled and d % 8 == 0
    v_lanes = 8 if tiled and dv % 4 == 0 else 32  # tinyBLAS needs rows % 4 == 0
    # Batched, with heads sharing a KV head four at a time: one item per row and four heads.
    quads = group // 4 if k_tiled and v_lanes == 8 else 0
    per_row = n_head_kv * quads + (n_head - 4 * n_head_kv * quads)
    for item in prange(n * per_row):
        t, rest = item // per_row, item % per_row
        table = tables[row_seq[t]]
        last = positions[t]
        first = max(0, last - window + 1) if window > 0 else 0
        if rest < n_head_kv * quads:  # quad rest % quads of KV head rest // quads
            h0 = (rest // quads) * group + 4 * (rest % quads)
            _attend_heads_4(q_flat, k_pool, v_pool, table, block_size, n_head_kv, h0 // group, t, h0, n_head, d, dv,
                            first, last, kq_scale, out)
        else:  # the heads no quad covers, one at a time
            h = _uncovered_head(rest - n_head_kv * quads, group, quads)
            _attend_head(q_flat, k_pool, v_pool, table, block_size, n_head_kv, h // group, t, h, n_head, d, dv,
                         first, last, kq_scale, k_tiled, v_lanes, out)


@njit(cache=True, nogil=True, inline="always")
def _uncovered_head(i, group, quads):
    """The i-th head (in order) that is not in one of its KV group's first `quads` quads."""
    left = group - 4 * quads  # heads per KV group left over
    return (i // left) * group + 4 * quads + i % left


def attend_paged(q: np.ndarray, keys: np.ndarray, values: np.ndarray, tables: np.ndarray, row_seq: np.ndarray,
                 positions: np.ndarray, window: int | None, group: int, kq_scale: float, tiled: bool) -> np.ndarray:
    """q float32 [n, n_head, d] -> [n, n_head, dv], the query rows of one or more sequences.
    keys/values: one layer's float16 pool [n_blocks, block_size, n_head_kv, d]; `tables` int32
    [n_seqs, blocks] each sequence's block ids; `row_seq` the sequence of each row; `positions`
    the rows' positions (their K/V already written). `kq_scale` multiplies the scores; `tiled`
    says the whole batch has 2+ tokens (which ggml kernel llama.cpp would use)."""
    q16 = np.ascontiguousarray(q, dtype=np.float32).astype(np.float16).astype(np.float32)
    out = np.empty((q.shape[0], q.shape[1], values.shape[-1]), np.float32)
    attend_kernel(q16, keys.reshape(-1).view(np.uint8), values.reshape(-1).view(np.uint8),
                  np.ascontiguousarray(tables, dtype=np.int32), np.asarray(row_seq, dtype=np.int64), keys.shape[1],
                  positions.astype(np.int64), window or 0, group, np.float32(kq_scale), tiled, out)
    return out
