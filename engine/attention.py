"""Causal attention over the paged KV cache: a Numba kernel that reads K/V through the block table.

It computes what llama.cpp's CPU graph computes without flash attention, in the same order:
- queries rounded to float16 (ggml converts the f32 side of an F16 matmul to F16);
- scores q.k: in a batch of 2+ tokens ggml's mul_mat goes to llamafile's tinyBLAS (one 8-lane
  accumulator over the head dimension, then its hsum); for a single token it goes to
  ggml_vec_dot_f16 (4 x 8 lanes, ggml's reduction, leftovers added in double);
- softmax: scores * kq_scale, masked (causal; sliding-window layers keep the last `window`
  positions), max subtracted, ggml's AVX2 vector exp, sums of 8 in float then in double,
  multiplied by float(1 / sum);
- probabilities rounded to float16, times V: a prompt row in tinyBLAS's order (lanes run over KV
  cells); a decoded row key by key, in registers (ggml's 32 lanes in memory cost a third of a
  decode step's attention, and the fidelity bound is statistical: ../shared/reference/README.md).
Products of two float16 values are exact in float32, so only the order of additions matters.
Each row's order comes from its role (prompt or decoded), never from the batch around it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S
from llmx.quant.cpu.activations import round_to_f16
from llmx.quant.cpu.repacked import prefetch

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
    y0, y1 = (v[0] + v[16]) + (v[8] + v[24]), (v[1] + v[17]) + (v[9] + v[25])
    y2, y3 = (v[2] + v[18]) + (v[10] + v[26]), (v[3] + v[19]) + (v[11] + v[27])
    y4, y5 = (v[4] + v[20]) + (v[12] + v[28]), (v[5] + v[21]) + (v[13] + v[29])
    y6, y7 = (v[6] + v[22]) + (v[14] + v[30]), (v[7] + v[23]) + (v[15] + v[31])
    t0, t1, t2, t3 = y0 + y4, y1 + y5, y2 + y6, y3 + y7
    return (t0 + t1) + (t2 + t3)  # (no scratch array: this runs once per output value)


@njit(cache=True, nogil=True, inline="always")
def _tree_8(raw, at, stride):
    """sum8_tree over 8 rows (`stride` bytes apart, from byte `at`), 8 columns at a time."""
    add, ld = S.add_f32x8, S.load_f32x8
    q0, q1 = add(ld(raw, at), ld(raw, at + 4 * stride)), add(ld(raw, at + stride), ld(raw, at + 5 * stride))
    q2, q3 = add(ld(raw, at + 2 * stride), ld(raw, at + 6 * stride)), add(ld(raw, at + 3 * stride),
                                                                          ld(raw, at + 7 * stride))
    return add(add(q0, q2), add(q1, q3))


@njit(cache=True, nogil=True, inline="always")
def _ggml_y(raw, at, stride, m):
    """(v[m] + v[16 + m]) + (v[8 + m] + v[24 + m]) of sum32_ggml, 8 columns at a time."""
    add, ld = S.add_f32x8, S.load_f32x8
    return add(add(ld(raw, at + m * stride), ld(raw, at + (16 + m) * stride)),
               add(ld(raw, at + (8 + m) * stride), ld(raw, at + (24 + m) * stride)))


@njit(cache=True, nogil=True, inline="always")
def _tree_32(raw, at, stride):
    """sum32_ggml over 32 rows, 8 columns at a time."""
    add = S.add_f32x8
    t0 = add(_ggml_y(raw, at, stride, 0), _ggml_y(raw, at, stride, 4))
    t1 = add(_ggml_y(raw, at, stride, 1), _ggml_y(raw, at, stride, 5))
    t2 = add(_ggml_y(raw, at, stride, 2), _ggml_y(raw, at, stride, 6))
    t3 = add(_ggml_y(raw, at, stride, 3), _ggml_y(raw, at, stride, 7))
    return add(add(t0, t1), add(t2, t3))


@njit(cache=True, nogil=True)
def reduce_lanes(acc, out, t, h):
    """out[t, h, i] = sum8_tree(acc[:, i]) (acc [8, dv]), sum32_ggml(acc[:, i]) (acc [32, dv]) or
    acc[0, i] (acc [1, dv]), eight outputs per vector add: the same additions per output, rows read
    contiguously."""
    n_lanes, dv = acc.shape
    if n_lanes == 1:
        out[t, h] = acc[0]
        return
    raw, stride = acc.reshape(-1).view(np.uint8), 4 * dv
    out_raw = out.reshape(-1).view(np.uint8)
    out_at = 4 * (t * out.shape[1] + h) * dv
    dv8 = dv - dv % 8
    for i in range(0, dv8, 8):
        total = _tree_8(raw, 4 * i, stride) if n_lanes == 8 else _tree_32(raw, 4 * i, stride)
        S.store_f32x8(out_raw, out_at + 4 * i, total)
    for i in range(dv8, dv):
        out[t, h, i] = sum8_tree(acc[:, i]) if n_lanes == 8 else sum32_ggml(acc[:, i])


_EXP_CONSTANTS = (_SHIFT, _LOG2E, _LN2_HI, _LN2_LO, _C1, _C2, _C3, _C4, _C5)
KEYS_AHEAD = 8  # how far ahead a decoded row's keys are prefetched (`_decode_heads_4`)
PAD = 8  # scores arrays run this far past `last`: softmax reads and writes whole groups of 8


@njit(cache=True, nogil=True)
def softmax_f16(scores, first, last):
    """In place over scores[first..last]: probabilities, rounded to float16 as ggml feeds them to V.
    Groups of 8 from a multiple of 8 (ggml's row starts at cell 0; cells outside [first, last]
    are masked to exp = 0, and left 0), each summed in tinyBLAS/ggml's tree then added in double.
    `scores` must have PAD cells past `last`."""
    raw = scores.view(np.uint8)
    start = first - first % 8
    lowest = np.float32(-np.inf)
    tops = S.splat_f32x8(lowest)
    for at in range(start, last + 1, 8):
        tops = S.max_f32x8(tops, S.keep_lanes_f32x8(S.load_f32x8(raw, 4 * at), at, first, last, lowest))
    top = S.lane_f32x8(tops, 0)
    for i in range(1, 8):
        top = max(top, S.lane_f32x8(tops, i))
    shift = S.splat_f32x8(top)
    total = 0.0
    for at in range(start, last + 1, 8):
        e = S.ggml_expf_f32x8(S.sub_f32x8(S.load_f32x8(raw, 4 * at), shift), _EXP_CONSTANTS)
        e = S.keep_lanes_f32x8(e, at, first, last, np.float32(0))
        S.store_f32x8(raw, 4 * at, e)
        total += np.float64(S.hsum_f32x8(e))
    inverse = S.splat_f32x8(np.float32(1.0 / total))
    for at in range(start, last + 1, 8):  # (the masked lanes stay 0)
        S.store_f32x8(raw, 4 * at, S.round_f16_f32x8(S.mul_f32x8(S.load_f32x8(raw, 4 * at), inverse)))


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
def _key_step_4(p_raw, row_bytes, j, v, a0, a1, a2, a3):
    """a_g + p[g, j] * v for the four heads (probabilities: rows `row_bytes` apart in p_raw)."""
    at = 4 * j
    return (S.fmadd_f32x8(a0, S.splat_f32x8(S.load_f32(p_raw, at)), v),
            S.fmadd_f32x8(a1, S.splat_f32x8(S.load_f32(p_raw, at + row_bytes)), v),
            S.fmadd_f32x8(a2, S.splat_f32x8(S.load_f32(p_raw, at + 2 * row_bytes)), v),
            S.fmadd_f32x8(a3, S.splat_f32x8(S.load_f32(p_raw, at + 3 * row_bytes)), v))


@njit(cache=True, nogil=True, inline="always")
def _values_in_order_4(scores, v_pool, v_at, first, last, dv, out_raw, out_at):
    """out[g, i] = the sum over keys j = first..last, in that order, of p[g, j] * v_j[i] (each
    product exact, so one FMA per key: `_add_scaled_row`'s order with one lane), for the quad's
    four heads (rows of `scores`), into out_raw from byte out_at, heads 4 * dv bytes apart. Eight
    accumulators hold 16 outputs of the four heads while the keys go by: no sums in memory.
    v_at: each key's value row, in bytes."""
    p_raw, row_bytes, head_bytes = scores.reshape(-1).view(np.uint8), 4 * scores.shape[1], 4 * dv
    dv8 = dv - dv % 8
    for i in range(0, dv8, 16):
        pair = i + 16 <= dv8
        z = S.zero_f32x8()
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = z
        for j in range(first, last + 1):
            at = v_at[j] + 2 * i
            a0, a1, a2, a3 = _key_step_4(p_raw, row_bytes, j, S.load_f16x8(v_pool, at), a0, a1, a2, a3)
            if pair:
                b0, b1, b2, b3 = _key_step_4(p_raw, row_bytes, j, S.load_f16x8(v_pool, at + 16), b0, b1, b2, b3)
        at = out_at + 4 * i
        S.store_f32x8(out_raw, at, a0)
        S.store_f32x8(out_raw, at + head_bytes, a1)
        S.store_f32x8(out_raw, at + 2 * head_bytes, a2)
        S.store_f32x8(out_raw, at + 3 * head_bytes, a3)
        if pair:
            S.store_f32x8(out_raw, at + 32, b0)
            S.store_f32x8(out_raw, at + head_bytes + 32, b1)
            S.store_f32x8(out_raw, at + 2 * head_bytes + 32, b2)
            S.store_f32x8(out_raw, at + 3 * head_bytes + 32, b3)
    for i in range(dv8, dv):
        for g in range(4):
            total = np.float32(0)
            for j in range(first, last + 1):
                total += scores[g, j] * S.load_f16(v_pool, v_at[j] + 2 * i)
            S.store_f32(out_raw, out_at + g * head_bytes + 4 * i, total)


@njit(cache=True, nogil=True)
def _attend_heads_4(q_flat, k_pool, v_pool, table, block_size, n_head_kv, kv_head, t, h0, n_head, d, dv,
                    first, last, kq_scale, out):
    """Query heads h0..h0+3 of row t, which share kv_head, in the batched (tinyBLAS) order, with
    each K and V vector converted once: the same arithmetic as four `_attend_head` calls."""
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
        reduce_lanes(acc[g], out, t, h0 + g)


@njit(cache=True, nogil=True)
def _decode_heads_4(q_flat, k_pool, v_pool, table, block_size, n_head_kv, kv_head, t, h0, n_head, d, dv,
                    first, last, kq_scale, out):
    """A decoded row's query heads h0..h0+3, which share kv_head (d a multiple of 32): q.k in
    ggml_vec_dot_f16's order, the V product key by key (`_values_in_order_4`). While the scores
    are computed, the keys a few positions on and this key's values are prefetched: the cache is
    cold after the weights have streamed through."""
    scores = np.empty((4, last + 1 + PAD), np.float32)
    v_at = np.empty(last + 1, np.int64)
    q_at = 4 * (t * n_head + h0) * d
    for j in range(first, last + 1):
        ahead = min(j + KEYS_AHEAD, last)
        prefetch(k_pool, 2 * d * _cell(table, ahead, block_size, n_head_kv, kv_head), 2 * d)
        v_at[j] = 2 * dv * _cell(table, j, block_size, n_head_kv, kv_head)
        prefetch(v_pool, v_at[j], 2 * dv)
        k_at = 2 * d * _cell(table, j, block_size, n_head_kv, kv_head)
        s0, s1, s2, s3 = _dot_ggml_heads_4(q_flat, q_at, 4 * d, k_pool, k_at, d)
        scores[0, j], scores[1, j], scores[2, j], scores[3, j] = s0 * kq_scale, s1 * kq_scale, s2 * kq_scale, \
            s3 * kq_scale
    for g in range(4):
        softmax_f16(scores[g], first, last)
    _values_in_order_4(scores, v_pool, v_at, first, last, dv, out.reshape(-1).view(np.uint8),
                       4 * (t * n_head + h0) * dv)


@njit(cache=True, nogil=True, inline="always")
def _ggml_total(a0, a1, a2, a3):
    return np.float32(np.float64(S.hadd_sum_f32x8(S.add_f32x8(S.add_f32x8(a0, a2), S.add_f32x8(a1, a3)))))


@njit(cache=True, nogil=True, inline="always")
def _fma_32(a0, a1, a2, a3, q, at, k0, k1, k2, k3):
    """One step of ggml_vec_dot_f16's four chains: 32 query values from byte `at` times k0..k3."""
    return S.fmadd_f32x8(a0, S.load_f32x8(q, at), k0), S.fmadd_f32x8(a1, S.load_f32x8(q, at + 32), k1), \
        S.fmadd_f32x8(a2, S.load_f32x8(q, at + 64), k2), S.fmadd_f32x8(a3, S.load_f32x8(q, at + 96), k3)


@njit(cache=True, nogil=True, inline="always")
def _dot_ggml_heads_4(q, q_at, head_bytes, pool, k_at, d):
    """`dot_ggml` (d a multiple of 32) for four query heads against one key: each key vector is
    converted once; per head the same four chains and the same reduction."""
    z = S.zero_f32x8()
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = e0 = e1 = e2 = e3 = z
    for c in range(0, d, 32):
        k0, k1 = S.load_f16x8(pool, k_at + 2 * c), S.load_f16x8(pool, k_at + 2 * c + 16)
        k2, k3 = S.load_f16x8(pool, k_at + 2 * c + 32), S.load_f16x8(pool, k_at + 2 * c + 48)
        at = q_at + 4 * c
        a0, a1, a2, a3 = _fma_32(a0, a1, a2, a3, q, at, k0, k1, k2, k3)
        b0, b1, b2, b3 = _fma_32(b0, b1, b2, b3, q, at + head_bytes, k0, k1, k2, k3)
        c0, c1, c2, c3 = _fma_32(c0, c1, c2, c3, q, at + 2 * head_bytes, k0, k1, k2, k3)
        e0, e1, e2, e3 = _fma_32(e0, e1, e2, e3, q, at + 3 * head_bytes, k0, k1, k2, k3)
    return _ggml_total(a0, a1, a2, a3), _ggml_total(b0, b1, b2, b3), _ggml_total(c0, c1, c2, c3), \
        _ggml_total(e0, e1, e2, e3)


# -- AVX-512: the quad path with two heads per 512-bit register -----------------------------------
# The same arithmetic as `_attend_heads_4`, bit for bit: q.k keeps one 8-lane chain per (head, key)
# (two heads' chains side by side in a register, four keys at once: eight chains in flight); the
# V product keeps lane j % 8's sums for 16 output values of two heads in 16 registers instead of
# rows in memory, and reduces them with sum8_tree's adds, vector by vector.
#     q2     float32 [n, n_head / 2, d / 8, 2, 8]   queries, heads 2i and 2i + 1 interleaved by 8
#     cells  int64 [span]                            (cell of position j) x n_head_kv, for this row's
#                                                    sequence; past its last row, its last cell again


@njit(cache=True, nogil=True, inline="always")
def _dot_quad_4keys(q2, q_at, pair_bytes, pool, k0, k1, k2, k3, d):
    """q.k for 4 heads (two pairs at q_at, q_at + pair_bytes) x 4 keys: two vectors of 8 sums,
    [head 0 keys 0..3, head 1 keys 0..3] and the same for heads 2, 3."""
    z = S.zero_f32x16()
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = z  # a: heads 0, 1; b: heads 2, 3; digit: key
    for c in range(d // 8):
        qa, qb = S.load_f32x16(q2, q_at + 64 * c), S.load_f32x16(q2, q_at + pair_bytes + 64 * c)
        v0, v1 = S.load_twice_f16_f32x16(pool, k0 + 16 * c), S.load_twice_f16_f32x16(pool, k1 + 16 * c)
        v2, v3 = S.load_twice_f16_f32x16(pool, k2 + 16 * c), S.load_twice_f16_f32x16(pool, k3 + 16 * c)
        a0, a1, a2, a3 = S.fmadd_f32x16(a0, qa, v0), S.fmadd_f32x16(a1, qa, v1), S.fmadd_f32x16(a2, qa, v2), \
            S.fmadd_f32x16(a3, qa, v3)
        b0, b1, b2, b3 = S.fmadd_f32x16(b0, qb, v0), S.fmadd_f32x16(b1, qb, v1), S.fmadd_f32x16(b2, qb, v2), \
            S.fmadd_f32x16(b3, qb, v3)
    return S.hsum_halves_f32x8(a0, a1, a2, a3), S.hsum_halves_f32x8(b0, b1, b2, b3)


@njit(cache=True, nogil=True, inline="always")
def _dot_quad_1key(q2, q_at, pair_bytes, pool, k_at, d):
    a = b = S.zero_f32x16()
    for c in range(d // 8):
        v = S.load_twice_f16_f32x16(pool, k_at + 16 * c)
        a = S.fmadd_f32x16(a, S.load_f32x16(q2, q_at + 64 * c), v)
        b = S.fmadd_f32x16(b, S.load_f32x16(q2, q_at + pair_bytes + 64 * c), v)
    h, lo, hi = S.hsum_f32x8, S.low_f32x8, S.high_f32x8
    return h(lo(a)), h(hi(a)), h(lo(b)), h(hi(b))


@njit(cache=True, nogil=True)
def _quad_scores(q2, q_at, pair_bytes, k_pool, cells, kv_head, first, last, d, kq_scale, scores):
    """scores[g, j] = q_g . k_j * kq_scale for the quad's 4 heads and keys first..last."""
    row = scores.shape[1]
    raw = scores.reshape(-1).view(np.uint8)
    scale = S.splat_f32x8(kq_scale)
    j = first
    while j + 4 <= last + 1:
        k0, k1 = 2 * d * (cells[j] + kv_head), 2 * d * (cells[j + 1] + kv_head)
        k2, k3 = 2 * d * (cells[j + 2] + kv_head), 2 * d * (cells[j + 3] + kv_head)
        s01, s23 = _dot_quad_4keys(q2, q_at, pair_bytes, k_pool, k0, k1, k2, k3, d)
        s01, s23 = S.mul_f32x8(s01, scale), S.mul_f32x8(s23, scale)
        S.store_low4_f32x8(raw, 4 * j, s01)
        S.store_high4_f32x8(raw, 4 * (row + j), s01)
        S.store_low4_f32x8(raw, 4 * (2 * row + j), s23)
        S.store_high4_f32x8(raw, 4 * (3 * row + j), s23)
        j += 4
    while j <= last:
        s0, s1, s2, s3 = _dot_quad_1key(q2, q_at, pair_bytes, k_pool, 2 * d * (cells[j] + kv_head), d)
        scores[0, j], scores[1, j], scores[2, j], scores[3, j] = s0 * kq_scale, s1 * kq_scale, s2 * kq_scale, \
            s3 * kq_scale
        j += 1


@njit(cache=True, nogil=True, inline="always")
def _lane_step(p_raw, pa, pb, v_pool, v_raw, j, i, a, b):
    """Key j's 16 values from byte i of its row into lane sums a and b, weighted by the two heads'
    probabilities (bytes pa, pb of p_raw for key 0). Raw byte loads: no index checks in this loop."""
    v = S.load_f16_f32x16(v_pool, S.load_i64(v_raw, 8 * j) + i)
    pj_a, pj_b = S.splat_f32x16(S.load_f32(p_raw, pa + 4 * j)), S.splat_f32x16(S.load_f32(p_raw, pb + 4 * j))
    return S.fmadd_f32x16(a, pj_a, v), S.fmadd_f32x16(b, pj_b, v)


@njit(cache=True, nogil=True, inline="always")
def _sum8_tree_16(a0, a1, a2, a3, a4, a5, a6, a7):
    """`sum8_tree` over 8 lane sums, 16 output values at a time."""
    add = S.add_f32x16
    return add(add(add(a0, a4), add(a2, a6)), add(add(a1, a5), add(a3, a7)))


@njit(cache=True, nogil=True, inline="always")
def _quad_values_pair(p_raw, pa, pb, v_pool, v_raw, start, last, dv, out_raw, out_at, head_bytes):
    """Two heads (probabilities at bytes pa and pb of p_raw, for key 0): the sum over
    keys of p_j * v_j, lane j % 8 apart, then sum8_tree, into out_raw at out_at, out_at + head_bytes.
    Whole groups of 8 keys from `start`: the probabilities outside [first, last] are 0 there (see
    softmax_f16), and 0 * v (finite) leaves a sum unchanged (it is never -0). v_raw: int64 byte
    offsets of each key's value row."""
    for i in range(0, 2 * dv, 32):  # 16 values (bytes of float16) at a time
        z = S.zero_f32x16()
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
        for j in range(start, last + 1, 8):
            a0, b0 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j, i, a0, b0)
            a1, b1 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j + 1, i, a1, b1)
            a2, b2 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j + 2, i, a2, b2)
            a3, b3 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j + 3, i, a3, b3)
            a4, b4 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j + 4, i, a4, b4)
            a5, b5 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j + 5, i, a5, b5)
            a6, b6 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j + 6, i, a6, b6)
            a7, b7 = _lane_step(p_raw, pa, pb, v_pool, v_raw, j + 7, i, a7, b7)
        S.store_f32x16(out_raw, out_at + 2 * i, _sum8_tree_16(a0, a1, a2, a3, a4, a5, a6, a7))
        S.store_f32x16(out_raw, out_at + head_bytes + 2 * i, _sum8_tree_16(b0, b1, b2, b3, b4, b5, b6, b7))


@njit(cache=True, nogil=True)
def _attend_heads_4_wide(q2, k_pool, v_pool, cells, kv_head, t, h0, n_head, d, dv, first, last, kq_scale, out):
    """`_attend_heads_4` on AVX-512 (heads h0..h0+3 of row t; h0 even)."""
    scores = np.empty((4, last + 1 + PAD), np.float32)
    pair_bytes = 8 * d  # one head pair's queries: d / 8 steps of 2 x 8 float32
    q_at = (t * n_head + h0) // 2 * pair_bytes
    _quad_scores(q2, q_at, pair_bytes, k_pool, cells, kv_head, first, last, d, kq_scale, scores)
    for g in range(4):
        softmax_f16(scores[g], first, last)
    start = first - first % 8
    v_at = np.empty(last + 1 + PAD, np.int64)
    for j in range(start, last + 8):
        v_at[j] = 2 * dv * (cells[j] + kv_head)
    out_raw = out.reshape(-1).view(np.uint8)
    out_at = 4 * (t * n_head + h0) * dv
    p_raw, v_raw = scores.reshape(-1).view(np.uint8), v_at.view(np.uint8)
    row_bytes = 4 * (last + 1 + PAD)
    for g in range(0, 4, 2):
        _quad_values_pair(p_raw, g * row_bytes, (g + 1) * row_bytes, v_pool, v_raw, start, last, dv, out_raw,
                          out_at + 4 * g * dv, 4 * dv)


@njit(cache=True, nogil=True)
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
    reduce_lanes(acc, out, t, h)


@njit(cache=True, nogil=True, inline="always")
def _prompt_quad_tiled(q_flat, q2, cells, k_pool, v_pool, table, seq, block_size, n_head_kv, kv_head, t, h0, n_head,
                       d, dv, first, last, kq_scale, out):
    _attend_heads_4(q_flat, k_pool, v_pool, table, block_size, n_head_kv, kv_head, t, h0, n_head, d, dv, first, last,
                    kq_scale, out)


@njit(cache=True, nogil=True, inline="always")
def _prompt_quad_wide(q_flat, q2, cells, k_pool, v_pool, table, seq, block_size, n_head_kv, kv_head, t, h0, n_head,
                      d, dv, first, last, kq_scale, out):
    _attend_heads_4_wide(q2, k_pool, v_pool, cells[seq], kv_head, t, h0, n_head, d, dv, first, last, kq_scale, out)


@njit(cache=True, nogil=True, inline="always")
def _no_single_heads(q_flat, k_pool, v_pool, table, block_size, n_head_kv, kv_head, t, h, n_head, d, dv, first, last,
                     kq_scale, k_tiled, v_lanes, out):
    """A model whose heads the quads all cover has none to do one at a time."""


@njit(cache=True, nogil=True, inline="always")  # takes functions: inlined, so that they are constants
def _attend_rows(prompt_quad, single_head, q, k_pool, v_pool, tables, row_seq, block_size, positions, window, group,
                 kq_scale, row_tiled, q2, cells, out):
    """Every attention kernel's loop (see `attend_kernel`): `prompt_quad` takes a tiled row's
    quads of heads, `single_head` the heads no quad covers."""
    n, n_head, d = q.shape
    dv = out.shape[2]
    n_head_kv = n_head // group
    q_flat = round_to_f16(q.reshape(n, n_head * d)).reshape(-1)
    # A tiled row whose heads share a KV head four at a time takes one item per four heads; the
    # items a row does not need are empty, so every row has n_head items.
    quads = group // 4 if d % 8 == 0 and dv % 4 == 0 else 0
    quads_ggml = group // 4 if d % 32 == 0 else 0
    for item in prange(n * n_head):
        # Rows in the order 0, n-1, 1, n-2, ...: a causal prompt's row t costs ~t, and threads take
        # contiguous ranges of items, so each range gets early and late rows alike.
        r, rest = item // n_head, item % n_head
        t = r // 2 if r % 2 == 0 else n - 1 - r // 2
        tiled = row_tiled[t] != 0
        k_tiled = tiled and d % 8 == 0
        v_lanes = 8 if tiled and dv % 4 == 0 else 1  # tinyBLAS needs rows % 4 == 0
        row_quads = quads if tiled else quads_ggml
        if rest >= n_head_kv * row_quads + (n_head - 4 * n_head_kv * row_quads):
            continue
        seq = row_seq[t]
        table = tables[seq]
        last = positions[t]
        first = max(0, last - window + 1) if window > 0 else 0
        if rest < n_head_kv * row_quads:  # quad rest % quads of KV head rest // quads
            h0 = (rest // row_quads) * group + 4 * (rest % row_quads)
            if tiled:
                prompt_quad(q_flat, q2, cells, k_pool, v_pool, table, seq, block_size, n_head_kv, h0 // group, t, h0,
                            n_head, d, dv, first, last, kq_scale, out)
            else:
                _decode_heads_4(q_flat, k_pool, v_pool, table, block_size, n_head_kv, h0 // group, t, h0, n_head, d,
                                dv, first, last, kq_scale, out)
        else:  # the heads no quad covers, one at a time
            h = _uncovered_head(rest - n_head_kv * row_quads, group, row_quads)
            single_head(q_flat, k_pool, v_pool, table, block_size, n_head_kv, h // group, t, h, n_head, d, dv,
                        first, last, kq_scale, k_tiled, v_lanes, out)


# attend_kernel's variants, each compiled the first time a model needs it: a first run compiles
# only its model's (gemma on AVX-512: wide quads, no single heads), 5 s less than all of them.
@njit(cache=True, nogil=True, parallel=True)
def attend_tiled(q, k_pool, v_pool, tables, row_seq, block_size, positions, window, group, kq_scale, row_tiled, q2,
                 cells, out):
    _attend_rows(_prompt_quad_tiled, _no_single_heads, q, k_pool, v_pool, tables, row_seq, block_size, positions,
                 window, group, kq_scale, row_tiled, q2, cells, out)


@njit(cache=True, nogil=True, parallel=True)
def attend_wide(q, k_pool, v_pool, tables, row_seq, block_size, positions, window, group, kq_scale, row_tiled, q2,
                cells, out):
    _attend_rows(_prompt_quad_wide, _no_single_heads, q, k_pool, v_pool, tables, row_seq, block_size, positions,
                 window, group, kq_scale, row_tiled, q2, cells, out)


@njit(cache=True, nogil=True, parallel=True)
def attend_tiled_single(q, k_pool, v_pool, tables, row_seq, block_size, positions, window, group, kq_scale, row_tiled,
                        q2, cells, out):
    _attend_rows(_prompt_quad_tiled, _attend_head, q, k_pool, v_pool, tables, row_seq, block_size, positions,
                 window, group, kq_scale, row_tiled, q2, cells, out)


@njit(cache=True, nogil=True, parallel=True)
def attend_wide_single(q, k_pool, v_pool, tables, row_seq, block_size, positions, window, group, kq_scale, row_tiled,
                       q2, cells, out):
    _attend_rows(_prompt_quad_wide, _attend_head, q, k_pool, v_pool, tables, row_seq, block_size, positions,
                 window, group, kq_scale, row_tiled, q2, cells, out)


def attend_kernel(wide: bool, single_heads: bool):
    """The kernel for q float32 [n, n_head, d] (rounded to float16 there); k_pool/v_pool one
    layer's cache as bytes of float16 [n_blocks, block_size, n_head_kv, d or dv]; tables int32
    [n_seqs, blocks] the block ids of each sequence, row_seq int64 [n] the sequence of each query
    row; positions int64 [n]; out float32 [n, n_head, dv]. `row_tiled` uint8 [n]: the row takes
    tinyBLAS's order (else ggml_vec_dot_f16's). `wide`: tiled rows' quads of heads take the
    AVX-512 path (q2 and cells, see `_attend_heads_4_wide`); `single_heads`: some heads are in no
    quad (a KV group not a multiple of 4, or odd head sizes)."""
    return ((attend_tiled, attend_tiled_single), (attend_wide, attend_wide_single))[wide][single_heads]


@njit(cache=True, nogil=True, inline="always")
def _uncovered_head(i, group, quads):
    """The i-th head (in order) that is not in one of its KV group's first `quads` quads."""
    left = group - 4 * quads  # heads per KV group left over
    return (i // left) * group + 4 * quads + i % left


def attend_paged(q: np.ndarray, keys: np.ndarray, values: np.ndarray, tables: np.ndarray, row_seq: np.ndarray,
                 positions: np.ndarray, window: int | None, group: int, kq_scale: float,
                 tiled: bool | np.ndarray, wide: bool = True) -> np.ndarray:
    """q float32 [n, n_head, d] -> [n, n_head, dv], the query rows of one or more sequences.
    keys/values: one layer's float16 pool [n_blocks, block_size, n_head_kv, d]; `tables` int32
    [n_seqs, blocks] each sequence's block ids; `row_seq` the sequence of each row; `positions`
    the rows' positions (their K/V already written). `kq_scale` multiplies the scores; `tiled`
    (one bool, or one per row) picks the ggml kernel whose float order a row follows: tinyBLAS's
    (llama.cpp's for prompts) or ggml_vec_dot_f16's (for one decoded token)."""
    n, n_head, d = q.shape
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty((n, n_head, values.shape[-1]), np.float32)
    tables, row_seq, positions = np.ascontiguousarray(tables, dtype=np.int32), np.asarray(row_seq, np.int64), \
        np.asarray(positions, np.int64)
    row_tiled = np.full(n, tiled, np.uint8) if np.ndim(tiled) == 0 else np.asarray(tiled, np.uint8)
    dv = values.shape[-1]
    wide = wide_quads(wide, group, d, dv)
    if wide and row_tiled.any():
        q2 = _head_pairs(round_to_f16(q.reshape(n, n_head * d)).reshape(n, n_head, d))
        cells = _cells(tables, row_seq, positions, keys.shape[1], keys.shape[2])
    else:
        q2, cells = NO_PAIRS, NO_CELLS
    kernel = attend_kernel(wide, has_single_heads(group, d, dv))
    kernel(q, keys.reshape(-1).view(np.uint8), values.reshape(-1).view(np.uint8), tables, row_seq, keys.shape[1],
           positions, window or 0, group, np.float32(kq_scale), row_tiled, q2, cells, out)
    return out


def wide_quads(allowed: bool, group: int, d: int, dv: int) -> bool:
    """`attend_kernel`'s `wide`: whether tiled rows' quads of heads take the AVX-512 path, where
    the caller allows it, the shapes fit it and this CPU has it."""
    return allowed and group % 4 == 0 and d % 8 == 0 and dv % 16 == 0 and S.has_avx512_pairs()


NO_PAIRS, NO_CELLS = np.empty(0, np.float32), np.empty((0, 0), np.int64)  # (the quads' AVX-512 path not taken)


def has_single_heads(group: int, d: int, dv: int) -> bool:
    """Whether some heads are in no quad, for tiled or decoded rows (`_attend_rows`' quads)."""
    tiled_covered = group % 4 == 0 and d % 8 == 0 and dv % 4 == 0
    decoded_covered = group % 4 == 0 and d % 32 == 0
    return not (tiled_covered and decoded_covered)


def _cells(tables: np.ndarray, row_seq: np.ndarray, positions: np.ndarray, block_size: int, n_head_kv: int):
    """int64 [n_seqs, span]: (cell of position j of sequence s) x n_head_kv, so the kernel reads no
    block table. Past a sequence's last row in this batch (whole groups of 8 read up to 7 further,
    with probability 0), its last cell again: written, so finite."""
    last = np.zeros(len(tables), np.int64)
    np.maximum.at(last, row_seq, positions)
    span = np.minimum(np.arange(int(positions.max()) + 1 + PAD)[None, :], last[:, None])  # [n_seqs, span]
    blocks = np.take_along_axis(tables, span // block_size, axis=1).astype(np.int64)
    return (blocks * block_size + span % block_size) * n_head_kv


@njit(cache=True, nogil=True, parallel=True)
def _head_pairs(q):
    """float32 [n, n_head, d] -> [n, n_head / 2, d / 8, 2, 8] flat: heads 2i, 2i + 1 interleaved by 8."""
    n, n_head, d = q.shape
    out = np.empty(n * n_head * d, np.float32)
    for t in prange(n):
        for h in range(n_head):
            base = (t * n_head + h - h % 2) * d + 8 * (h % 2)
            for c in range(d // 8):
                for i in range(8):
                    out[base + 16 * c + i] = q[t, h, 8 * c + i]
    return out
