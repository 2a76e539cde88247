"""The Numba RMSNorm and GELU give the same bits as the numpy expressions that define them."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from llmx.engine.elementwise import add_rms_norm, apply_rope, gelu_tanh_f16, norm_rope, rms_norm


def numpy_rms_norm(x, weight, eps):
    mean_sq = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(mean_sq + eps)).astype(np.float32)) * weight


def numpy_gelu_tanh_f16(x):
    h = x.astype(np.float16).astype(np.float32)
    inner = np.float32(math.sqrt(2 / math.pi)) * (h + np.float32(0.044715) * h * h * h)
    table = (np.float32(0.5) * h * (np.float32(1) + np.tanh(inner))).astype(np.float16).astype(np.float32)
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, table))


def numpy_rope(x, cos, sin, layout):
    half = cos.shape[1]
    rot = x[..., : 2 * half]
    a, b = (rot[..., 0::2], rot[..., 1::2]) if layout == "normal" else (rot[..., :half], rot[..., half:])
    c, s = cos[:, None, :], sin[:, None, :]
    ra, rb = a * c - b * s, a * s + b * c
    out = x.copy()
    if layout == "normal":
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = ra, rb
    else:
        out[..., :half], out[..., half : 2 * half] = ra, rb
    return out


@pytest.mark.parametrize("layout", ["normal", "neox"])
@pytest.mark.parametrize("n", [1, 3, 40])  # 40 rows: split over threads
@pytest.mark.parametrize("rotated", [64, 48])  # 48 of 64 dims: the rest pass through
def test_rope_same_bits_as_numpy(layout, n, rotated):
    rng = np.random.default_rng(n + rotated)
    x = (rng.standard_normal((n, 3, 64)) * 5).astype(np.float32)
    theta = rng.uniform(0, 100, (n, rotated // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    assert np.array_equal(apply_rope(x, cos, sin, layout), numpy_rope(x, cos, sin, layout))


@pytest.mark.parametrize("shape", [(1, 640), (7, 4, 256), (33, 2048), (5, 100), (3, 7), (2, 5000), (1, 16384)])
def test_rms_norm_same_bits_as_numpy(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 50)).astype(np.float32)
    weight = rng.standard_normal(shape[-1]).astype(np.float32)
    for eps in (1e-6, 1e-5):
        assert np.array_equal(rms_norm(x, weight, eps), numpy_rms_norm(x, weight, eps))


@pytest.mark.parametrize("n", [1, 3, 40])  # 40 rows: split over threads
@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("post", [False, True])
def test_fused_residual_add_and_norms_same_bits_as_numpy(n, pre, post):
    rng = np.random.default_rng(n * 4 + 2 * pre + post)
    x, y = ((rng.standard_normal((n, 640)) * 3).astype(np.float32) for _ in range(2))
    pre_w, post_w = (rng.standard_normal(640).astype(np.float32) for _ in range(2))
    total, normed = add_rms_norm(x, y, post_w if post else None, pre_w if pre else None, 1e-6)
    expected = x + (numpy_rms_norm(y, pre_w, 1e-6) if pre else y)
    assert np.array_equal(total, expected)
    if post:
        assert np.array_equal(normed, numpy_rms_norm(expected, post_w, 1e-6))
    else:
        assert normed is None


@pytest.mark.parametrize("n", [1, 3, 40])
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("layout", ["normal", "neox"])
def test_fused_head_norms_rope_and_query_scale_same_bits_as_numpy(n, normed, layout):
    rng = np.random.default_rng(n * 4 + normed)
    q, k = (rng.standard_normal((n, 4, 64)) * 5).astype(np.float32), (rng.standard_normal((n, 1, 64)) * 5).astype(
        np.float32)
    q_w, k_w = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    theta = rng.uniform(0, 100, (n, 24))  # 48 of 64 dims rotated
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    scale = np.float32(0.0625)
    for q_scale in (None, scale):
        got_q, got_k = norm_rope(q, k, q_w if normed else None, k_w if normed else None, cos, sin, q_scale, layout,
                                 1e-6)
        want_q = numpy_rope(numpy_rms_norm(q, q_w, 1e-6) if normed else q, cos, sin, layout)
        want_k = numpy_rope(numpy_rms_norm(k, k_w, 1e-6) if normed else k, cos, sin, layout)
        assert np.array_equal(got_q, want_q if q_scale is None else want_q * q_scale)
        assert np.array_equal(got_k, want_k)


def test_gelu_same_bits_as_numpy():
    rng = np.random.default_rng(1)
    special = [-10.0, 10.0, -9.99, 9.99, 0.0, -0.0, 65504, -1e6, np.nan, np.inf, -np.inf, 1e-8]
    # the specials at both ends: in the 16-lane part and in the one-by-one rest
    x = np.concatenate([special, rng.standard_normal(100_004) * 4, special[:8]])  # 100024 = 16 k + 8
    x = x.astype(np.float32).reshape(-1, 8)
    with np.errstate(all="ignore"):
        same = functools.partial(np.array_equal, equal_nan=True)
        assert same(gelu_tanh_f16(x), numpy_gelu_tanh_f16(x))  # many rows: split over threads
        assert same(gelu_tanh_f16(x[:3]), numpy_gelu_tanh_f16(x[:3]))
        up = rng.standard_normal(x.shape).astype(np.float32)  # the gate times the up projection
        assert same(gelu_tanh_f16(x, up), numpy_gelu_tanh_f16(x) * up)
        assert same(gelu_tanh_f16(x[:3], up[:3]), numpy_gelu_tanh_f16(x[:3]) * up[:3])
