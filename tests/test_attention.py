"""The attention kernel: ggml's summation orders, its exp, and attention through a block table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

from llmx.engine.attention import _EXP_CONSTANTS, attend_paged, dot_ggml, dot_tiled
from llmx.quant.cpu import simd as S

rng = np.random.default_rng(7)


def f16_exact(shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


def tree8(lanes):
    q = [np.float32(lanes[i] + lanes[i + 4]) for i in range(4)]
    return np.float32(np.float32(q[0] + q[2]) + np.float32(q[1] + q[3]))


def tinyblas_order(a, b):
    """llamafile tinyBLAS (AVX2): lane i % 8 accumulates in float32, then its hsum."""
    lanes = np.zeros(8, np.float32)
    for i in range(len(a)):
        lanes[i % 8] = np.float32(lanes[i % 8] + np.float32(a[i] * b[i]))
    return tree8(lanes)


def vec_dot_f16_order(a, b):
    """ggml_vec_dot_f16 (AVX2): lane i % 32 over whole steps of 32, ggml's reduction, rest in double."""
    whole = len(a) - len(a) % 32
    acc = np.zeros(32, np.float32)
    for i in range(whole):
        acc[i % 32] = np.float32(acc[i % 32] + np.float32(a[i] * b[i]))
    y = [np.float32(np.float32(acc[m] + acc[16 + m]) + np.float32(acc[8 + m] + acc[24 + m])) for m in range(8)]
    t = [np.float32(y[i] + y[i + 4]) for i in range(4)]
    total = float(np.float32(np.float32(t[0] + t[1]) + np.float32(t[2] + t[3])))
    for i in range(whole, len(a)):
        total += float(np.float32(a[i] * b[i]))
    return np.float32(total)


@pytest.mark.parametrize("d", [256, 80])
def test_dot_products_add_in_ggml_order(d):
    orders_differ = False
    for _ in range(30):
        q, k = f16_exact(d), f16_exact(d)
        k_bytes = k.astype(np.float16).view(np.uint8)
        if d % 8 == 0:
            assert dot_tiled(q, 0, k_bytes, 0, d) == tinyblas_order(q, k)
        ours = dot_ggml(q, 0, k_bytes, 0, d)
        assert ours == vec_dot_f16_order(q, k)
        orders_differ |= ours != tinyblas_order(q, k)
    assert orders_differ  # the two orders are distinguishable, so the equalities above mean something


@njit
def exp_8_lanes(x, out):
    raw_in, raw_out = x.view(np.uint8), out.view(np.uint8)
    for i in range(0, len(x), 8):
        S.store_f32x8(raw_out, 4 * i, S.ggml_expf_f32x8(S.load_f32x8(raw_in, 4 * i), _EXP_CONSTANTS))


def exp_of(values):
    x = np.asarray(values, np.float32)
    out = np.empty(-(-len(x) // 8) * 8, np.float32)
    exp_8_lanes(np.concatenate([x, np.zeros(len(out) - len(x), np.float32)]), out)
    return out[:len(x)]


@njit
def one_lane_exp(x):
    """ggml_v_expf for one x <= 0, transcribed from ggml-cpu's AVX2 code."""
    shift, log2e, ln2_hi, ln2_lo, c1, c2, c3, c4, c5 = _EXP_CONSTANTS
    z = S.fma_f32(x, log2e, shift)
    n = z - shift
    if n < -126:  # ggml gives a denormal here; float16 rounding of the probability makes it 0
        return np.float32(0.0)
    b = S.fma_f32(-n, ln2_lo, S.fma_f32(-n, ln2_hi, x))
    u = b * b
    j = S.fma_f32(S.fma_f32(S.fma_f32(c5, b, c4), u, S.fma_f32(c3, b, c2)), u, c1 * b)
    k = np.float32(math.ldexp(1.0, int(n)))  # 2^n, as ggml builds it from z's bits
    return S.fma_f32(j, k, k)


def test_eight_lane_exp_equals_the_one_lane_transcription_bit_for_bit():
    x = np.concatenate([-np.geomspace(1e-7, 120, 8000), [0.0, -87.3, -87.4, -88.0, -1e-30, -200.0, -0.0, -1e4]])
    x = x.astype(np.float32)
    one_by_one = np.array([one_lane_exp(v) for v in x], np.float32)
    assert np.array_equal(exp_of(x).view(np.uint32), one_by_one.view(np.uint32))


def test_vector_exp_is_within_two_ulp():
    x = np.concatenate([-np.geomspace(1e-6, 87, 4000), [0.0]]).astype(np.float32)
    ours = exp_of(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    assert exp_of([0.0])[0] == 1.0
    assert np.max(np.abs(ours - exact) / exact) <= 2 * 2.0**-23
    assert exp_of([-200.0])[0] == 0.0


def reference_attention(q, k, v, positions, window, group, scale):
    """float64 attention over contiguous K/V [n_kv, n_head_kv, d]."""
    n, n_head, _ = q.shape
    out = np.zeros((n, n_head, v.shape[2]))
    for t, pos in enumerate(positions):
        first = max(0, pos - window + 1) if window else 0
        for h in range(n_head):
            s = k[first:pos + 1, h // group].astype(np.float64) @ q[t, h].astype(np.float16).astype(np.float64)
            p = np.exp(s * scale - (s * scale).max())
            out[t, h] = (p / p.sum()) @ v[first:pos + 1, h // group]
    return out


def paged(k, v, block_size, order):
    """Lay contiguous K/V [n_kv, heads, d] into a pool whose blocks are in `order`."""
    n_blocks = len(order)
    pool_k = np.zeros((n_blocks, block_size, *k.shape[1:]), np.float16)
    pool_v = np.zeros((n_blocks, block_size, *v.shape[1:]), np.float16)
    for logical, physical in enumerate(order):
        rows = slice(logical * block_size, (logical + 1) * block_size)
        chunk = k[rows]
        pool_k[physical, :len(chunk)] = chunk
        pool_v[physical, :len(chunk)] = v[rows]
    return pool_k, pool_v, np.asarray(order, np.int32)


@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("window", [None, 11])
def test_attention_through_a_block_table_matches_float64(tiled, window):
    n_kv, n_head, n_head_kv, d, dv, block_size = 45, 4, 2, 64, 32, 8
    k, v = f16_exact((n_kv, n_head_kv, d)), f16_exact((n_kv, n_head_kv, dv))
    q = rng.standard_normal((5, n_head, d)).astype(np.float32)
    positions = np.array([0, 7, 20, 38, 44])
    order = rng.permutation(6).tolist()
    pool_k, pool_v, table = paged(k, v, block_size, order)
    scale = 1 / np.sqrt(d)
    rows = np.zeros(len(positions), np.int64)
    ours = attend_paged(q, pool_k, pool_v, table[None], rows, positions, window, n_head // n_head_kv, scale, tiled)
    expected = reference_attention(q, k, v, positions, window, n_head // n_head_kv, scale)
    # probabilities are rounded to float16 (as in llama.cpp): relative error ~2^-11
    np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=0)
    # the block layout is invisible: a contiguous table gives the same bits
    pool_k, pool_v, table = paged(k, v, block_size, list(range(6)))
    same = attend_paged(q, pool_k, pool_v, table[None], rows, positions, window, n_head // n_head_kv, scale, tiled)
    assert np.array_equal(ours, same)


def test_several_sequences_in_one_call_equal_each_alone():
    """Rows of two sequences (interleaved tables in one pool) attend only to their own cells."""
    n_head, n_head_kv, d, block_size = 2, 1, 32, 4
    k, v = f16_exact((24, n_head_kv, d)), f16_exact((24, n_head_kv, d))
    pool_k, pool_v, _ = paged(k, v, block_size, list(range(6)))  # cells 0..23
    tables = np.array([[0, 2, 4], [1, 3, 5]], np.int32)  # sequence a: blocks 0, 2, 4; b: 1, 3, 5
    q = rng.standard_normal((5, n_head, d)).astype(np.float32)
    positions, row_seq = np.array([3, 9, 11, 0, 10]), np.array([0, 0, 0, 1, 1])
    together = attend_paged(q, pool_k, pool_v, tables, row_seq, positions, None, 2, 0.2, True)
    for r in range(5):
        alone = attend_paged(q[r:r + 1], pool_k, pool_v, tables[row_seq[r]][None], np.zeros(1, np.int64),
                             positions[r:r + 1], None, 2, 0.2, True)
        assert np.array_equal(together[r], alone[0])
    # and the second sequence never sees the first one's cells
    cells_b = (tables[1][:, None] * block_size + np.arange(block_size)).reshape(-1)[:11]
    expected = reference_attention(q[4:5], k[cells_b], v[cells_b], [10], None, 2, 0.2)
    np.testing.assert_allclose(together[4:5], expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("group", [4, 6])
@pytest.mark.parametrize("window", [None, 11])
def test_heads_sharing_a_kv_head_four_at_a_time_equal_each_head_alone(group, window, tiled):
    """Heads of one KV group go four at a time (each K/V vector converted once), in either float
    order; the leftover heads of a group of 6 go one at a time. Every head must get the bits it
    gets alone."""
    n_kv, n_head_kv, d, block_size = 37, 2, 64, 8
    n_head = group * n_head_kv
    k, v = f16_exact((n_kv, n_head_kv, d)), f16_exact((n_kv, n_head_kv, d))
    q = rng.standard_normal((6, n_head, d)).astype(np.float32)
    positions = np.array([0, 3, 9, 20, 30, 36])
    pool_k, pool_v, table = paged(k, v, block_size, rng.permutation(5).tolist())
    rows = np.zeros(len(positions), np.int64)
    together = attend_paged(q, pool_k, pool_v, table[None], rows, positions, window, group, 0.125, tiled)
    for h in range(n_head):
        kv = h // group
        alone = attend_paged(q[:, h:h + 1], np.ascontiguousarray(pool_k[:, :, kv:kv + 1]),
                             np.ascontiguousarray(pool_v[:, :, kv:kv + 1]), table[None], rows, positions, window, 1,
                             0.125, tiled)
        assert np.array_equal(together[:, h], alone[:, 0]), h
    expected = reference_attention(q, k, v, positions, window, group, 0.125)
    np.testing.assert_allclose(together, expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("wide", [True, False])
def test_each_row_keeps_its_own_float_order_whatever_runs_beside_it(wide):
    """Rows carry their own order (prompt rows tinyBLAS's; decoded rows ggml_vec_dot_f16's q.k and
    the V product key by key): a row's bits are the same alone as in any batch, and the same on
    the 256-bit (AVX2) path as on the wide one."""
    n_kv, n_head_kv, group, d, block_size = 40, 1, 4, 64, 8
    k, v = f16_exact((n_kv, n_head_kv, d)), f16_exact((n_kv, n_head_kv, d))
    q = rng.standard_normal((7, group, d)).astype(np.float32)
    positions = np.array([2, 5, 9, 17, 26, 33, 39])
    tiled = np.array([True, False, True, True, False, False, True])
    pool_k, pool_v, table = paged(k, v, block_size, rng.permutation(5).tolist())
    rows = np.zeros(len(positions), np.int64)
    together = attend_paged(q, pool_k, pool_v, table[None], rows, positions, None, group, 0.125, tiled, wide=wide)
    for r in range(len(positions)):
        alone = attend_paged(q[r:r + 1], pool_k, pool_v, table[None], rows[:1], positions[r:r + 1], None, group,
                             0.125, bool(tiled[r]))
        assert np.array_equal(together[r], alone[0]), r
    assert not np.array_equal(together[tiled], attend_paged(q, pool_k, pool_v, table[None], rows, positions, None,
                                                            group, 0.125, False)[tiled])  # the orders differ
