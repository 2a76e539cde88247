"""The transformer's elementwise steps as Numba kernels: RMSNorm, rope and the GELU gate.

Each gives the same bits as the numpy expression it replaces (tests/test_elementwise.py holds
those expressions): numpy's pairwise float64 sum for the mean square, ggml's float16 GELU table
built once with numpy, rope's separately rounded products. Decode runs them ~100 times per token,
where numpy's per-call overhead cost a tenth of the step; a prompt's many rows are split over
threads (PARALLEL_ROWS and up), which a single token's would only pay for.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd as S


@njit(cache=True, nogil=True)
def _block_sum(x, lo, n):
    """numpy's pairwise_sum of float64(x[i])^2 for i in lo..lo+n-1, n <= 128: lane i of 8 sums
    elements i, i + 8, ... in order (one vector add per 8), combined as a tree, then the rest in order."""
    if n < 8:
        total = 0.0
        for i in range(lo, lo + n):
            total += np.float64(x[i]) * np.float64(x[i])
        return total
    lanes = S.zero_f64x8()
    raw = x.view(np.uint8)
    whole = n - n % 8
    for i in range(lo, lo + whole, 8):
        lanes = S.add_f64x8(lanes, S.squares_f64x8(raw, 4 * i))
    r = S.lane_f64x8
    total = ((r(lanes, 0) + r(lanes, 1)) + (r(lanes, 2) + r(lanes, 3))) + \
        ((r(lanes, 4) + r(lanes, 5)) + (r(lanes, 6) + r(lanes, 7)))
    for i in range(lo + whole, lo + n):
        total += np.float64(x[i]) * np.float64(x[i])
    return total


@njit(cache=True, nogil=True)
def pairwise_sum(a, lo, n, frames, left):
    """numpy's pairwise summation of the float64 squares of float32 a[lo:lo + n]: halves (cut at a
    multiple of 8) summed separately down to blocks of 128, so the mean square equals np.mean's to
    the last bit.
    Numba cannot cache a recursive function, so the recursion runs on an explicit stack, scratch
    the caller allocates once for many rows: frames int64 [3, 64] (start, size, stage), left
    float64 [64] (a frame's left half's sum)."""
    if n <= 128:
        return _block_sum(a, lo, n)
    starts, sizes, stage = frames[0], frames[1], frames[2]
    top, starts[0], sizes[0], stage[0] = 0, lo, n, 0
    result = 0.0
    while True:
        start, size = starts[top], sizes[top]
        half = size // 2 - (size // 2) % 8
        if stage[top] == 0:  # sum the left half
            stage[top] = 1
            if half > 128:
                top += 1
                starts[top], sizes[top], stage[top] = start, half, 0
                continue
            result = _block_sum(a, start, half)
        if stage[top] == 1:  # `result` is the left half's sum; now the right half
            left[top], stage[top] = result, 2
            if size - half > 128:
                top += 1
                starts[top], sizes[top], stage[top] = start + half, size - half, 0
                continue
            result = _block_sum(a, start + half, size - half)
        result = left[top] + result  # both halves done
        if top == 0:
            return result
        top -= 1


PARALLEL_ROWS = 16


@njit(cache=True, nogil=True)
def _rms_norm_row(x, weight, eps, out, r, frames, left):
    """out[r] = x[r] * float32(1 / sqrt(mean(x[r]^2) + eps)) * weight."""
    n = x.shape[1]
    scale = np.float32(1.0 / np.sqrt(pairwise_sum(x[r], 0, n, frames, left) / n + eps))
    for i in range(n):
        out[r, i] = (x[r, i] * scale) * weight[i]


@njit(cache=True, nogil=True)
def _rms_norm_rows(x, weight, eps, out):
    frames, left = np.empty((3, 64), np.int64), np.empty(64, np.float64)
    for r in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, r, frames, left)


@njit(cache=True, nogil=True, parallel=True)
def _rms_norm_rows_parallel(x, weight, eps, out):
    rows = x.shape[0]
    chunks = min(rows, 64)
    for c in prange(chunks):  # each chunk of rows allocates its scratch once
        frames, left = np.empty((3, 64), np.int64), np.empty(64, np.float64)
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            _rms_norm_row(x, weight, eps, out, r, frames, left)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis of float32 x (any leading shape)."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    kernel = _rms_norm_rows_parallel if len(rows) >= PARALLEL_ROWS else _rms_norm_rows
    kernel(rows, np.ascontiguousarray(weight, dtype=np.float32), float(eps), out)
    return out.reshape(x.shape)


@njit(cache=True, nogil=True)
def _add_norm_row(x, y, pre, norm, eps, total, normed, r, frames, left):
    """total[r] = x[r] + y[r] (y[r] RMS-normed with `pre` first, unless `pre` is empty); normed[r]
    = total[r] RMS-normed with `norm` (unless empty). The same bits as `rms_norm` and numpy's +."""
    if pre.size:
        _rms_norm_row(y, pre, eps, total, r, frames, left)
        for i in range(x.shape[1]):
            total[r, i] = x[r, i] + total[r, i]
    else:
        for i in range(x.shape[1]):
            total[r, i] = x[r, i] + y[r, i]
    if norm.size:
        _rms_norm_row(total, norm, eps, normed, r, frames, left)


@njit(cache=True, nogil=True)
def add_norm_rows(x, y, pre, norm, eps, total, normed):
    frames, left = np.empty((3, 64), np.int64), np.empty(64, np.float64)
    for r in range(x.shape[0]):
        _add_norm_row(x, y, pre, norm, eps, total, normed, r, frames, left)


@njit(cache=True, nogil=True, parallel=True)
def _add_norm_rows_parallel(x, y, pre, norm, eps, total, normed):
    rows = x.shape[0]
    chunks = min(rows, 64)
    for c in prange(chunks):
        frames, left = np.empty((3, 64), np.int64), np.empty(64, np.float64)
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            _add_norm_row(x, y, pre, norm, eps, total, normed, r, frames, left)


NO_WEIGHT = np.empty(0, np.float32)  # a norm not applied (the kernels test its size)


def add_rms_norm(x: np.ndarray, y: np.ndarray, norm: np.ndarray | None, pre_norm: np.ndarray | None,
                 eps: float) -> tuple[np.ndarray, np.ndarray | None]:
    """x + y (y RMS-normed with `pre_norm` first, when given) and that sum RMS-normed with `norm`
    (None: not wanted), float32 [n, k] each, in one kernel call: `x + rms_norm(y, pre_norm, eps)`,
    then `rms_norm(total, norm, eps)`, bit for bit."""
    x, y = np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32)
    total = np.empty_like(x)
    normed = np.empty_like(x) if norm is not None else NO_WEIGHT.reshape(0, 1)
    kernel = _add_norm_rows_parallel if len(x) >= PARALLEL_ROWS else add_norm_rows
    kernel(x, y, NO_WEIGHT if pre_norm is None else pre_norm, NO_WEIGHT if norm is None else norm, float(eps), total,
           normed)
    return total, normed if norm is not None else None


@njit(cache=True, nogil=True)
def _norm_rope_row(x, norm, cos, sin, scale, normed, out, t, neox, eps, frames, left):
    """Row t of x [n, heads, dim]: each head RMS-normed with `norm` (unless empty) into normed
    (the same shape), rotated into out, then times `scale` (unless 1)."""
    heads = x.shape[1]
    source = x
    if norm.size:
        flat_x, flat_normed = x.reshape(-1, x.shape[2]), normed.reshape(-1, x.shape[2])
        for h in range(heads):
            _rms_norm_row(flat_x, norm, eps, flat_normed, t * heads + h, frames, left)
        source = normed
    _rope_row(source, cos, sin, out, t, neox)
    if scale != 1:
        for h in range(heads):
            for i in range(x.shape[2]):
                out[t, h, i] = out[t, h, i] * scale


@njit(cache=True, nogil=True)
def norm_rope_rows(q, k, q_norm, k_norm, cos, sin, q_scale, scratch_q, scratch_k, q_out, k_out, neox, eps, lo, hi):
    frames, left = np.empty((3, 64), np.int64), np.empty(64, np.float64)
    for t in range(lo, hi):
        _norm_rope_row(q, q_norm, cos, sin, q_scale, scratch_q, q_out, t, neox, eps, frames, left)
        _norm_rope_row(k, k_norm, cos, sin, np.float32(1), scratch_k, k_out, t, neox, eps, frames, left)


@njit(cache=True, nogil=True, parallel=True)
def _norm_rope_rows_parallel(q, k, q_norm, k_norm, cos, sin, q_scale, scratch_q, scratch_k, q_out, k_out, neox, eps):
    rows = q.shape[0]
    chunks = min(rows, 64)
    for c in prange(chunks):
        norm_rope_rows(q, k, q_norm, k_norm, cos, sin, q_scale, scratch_q, scratch_k, q_out, k_out, neox, eps,
                        c * rows // chunks, (c + 1) * rows // chunks)


def norm_rope(q: np.ndarray, k: np.ndarray, q_norm: np.ndarray | None, k_norm: np.ndarray | None, cos: np.ndarray,
              sin: np.ndarray, q_scale: np.float32 | None, layout: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Queries [n, n_head, dim] and keys [n, n_head_kv, dim]: each head RMS-normed (when its norm
    is given), then `apply_rope`, then the queries times `q_scale` (when given), in one kernel call;
    the same bits as those steps one by one."""
    q, k = np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(k, dtype=np.float32)
    q_out, k_out = np.empty_like(q), np.empty_like(k)
    scratch_q = np.empty_like(q) if q_norm is not None else q
    scratch_k = np.empty_like(k) if k_norm is not None else k
    args = (q, k, NO_WEIGHT if q_norm is None else q_norm, NO_WEIGHT if k_norm is None else k_norm,
            np.ascontiguousarray(cos, dtype=np.float32), np.ascontiguousarray(sin, dtype=np.float32),
            np.float32(1 if q_scale is None else q_scale), scratch_q, scratch_k, q_out, k_out, layout != "normal",
            float(eps))
    if len(q) >= PARALLEL_ROWS:
        _norm_rope_rows_parallel(*args)
    else:
        norm_rope_rows(*args, 0, len(q))
    return q_out, k_out


@njit(cache=True, nogil=True)
def _rope_row(x, cos, sin, out, t, neox):
    """Row t of x [n, heads, head_dim]: the first 2 * half dims rotated, the rest copied."""
    half = cos.shape[1]
    for h in range(x.shape[1]):
        for i in range(half):
            ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
            a, b, c, s = x[t, h, ia], x[t, h, ib], cos[t, i], sin[t, i]
            out[t, h, ia] = a * c - b * s  # (products rounded separately, as numpy's)
            out[t, h, ib] = a * s + b * c
        for i in range(2 * half, x.shape[2]):
            out[t, h, i] = x[t, h, i]


@njit(cache=True, nogil=True)
def _rope_rows(x, cos, sin, out, neox):
    for t in range(x.shape[0]):
        _rope_row(x, cos, sin, out, t, neox)


@njit(cache=True, nogil=True, parallel=True)
def _rope_rows_parallel(x, cos, sin, out, neox):
    for t in prange(x.shape[0]):
        _rope_row(x, cos, sin, out, t, neox)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
    """x float32 [n, heads, head_dim]; cos, sin float32 [n, half]: rotates the first 2 * half dims
    (pairs (x_2i, x_2i+1) for the "normal" layout, (x_i, x_i+half) for "neox"), keeps the rest."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    kernel = _rope_rows_parallel if len(x) >= PARALLEL_ROWS else _rope_rows
    kernel(x, np.ascontiguousarray(cos, dtype=np.float32), np.ascontiguousarray(sin, dtype=np.float32), out,
           layout != "normal")
    return out


@functools.cache
def gelu_table() -> np.ndarray:
    """float32 [65536]: GELU-tanh of every float16 value, rounded to float16 (ggml_table_gelu_f16)."""
    h = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        inner = np.float32(math.sqrt(2 / math.pi)) * (h + np.float32(0.044715) * h * h * h)
        return (np.float32(0.5) * h * (np.float32(1) + np.tanh(inner))).astype(np.float16).astype(np.float32)


@njit(cache=True, nogil=True)
def _gelu_span(x, table, out, lo, hi, times):
    """out[i] = gelu(x[i]) * times[i] for i in lo..hi-1 (times: empty for no product): 16 lanes at
    a time (one table gather), the rest one by one."""
    raw, raw_out, raw_times = x.view(np.uint8), out.view(np.uint8), times.view(np.uint8)
    whole = lo + (hi - lo) // 16 * 16
    for i in range(lo, whole, 16):
        g = S.gelu_table_f32x16(table, S.load_f32x16(raw, 4 * i))
        S.store_f32x16(raw_out, 4 * i, S.mul_f32x16(g, S.load_f32x16(raw_times, 4 * i)) if times.size else g)
    for i in range(whole, hi):
        v = x[i]
        g = 0.0 if v <= -10 else v if v >= 10 else table[S.f16_bits(v)]
        out[i] = g * times[i] if times.size else g


@njit(cache=True, nogil=True)
def gelu_rows(x, table, out, times):
    _gelu_span(x, table, out, 0, x.size, times)


@njit(cache=True, nogil=True, parallel=True)
def _gelu_parallel(x, table, out, times, span):
    for c in prange((x.size + span - 1) // span):
        _gelu_span(x, table, out, c * span, min(x.size, (c + 1) * span), times)


def gelu_tanh_f16(x: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
    """GELU as ggml's CPU backend: the float16 table at the input rounded to float16, and the
    identity / zero beyond +-10; then times `times` (elementwise, float32), if given."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    other = np.empty(0, np.float32) if times is None else np.ascontiguousarray(times, dtype=np.float32).reshape(-1)
    out = np.empty_like(flat)
    if x.ndim > 1 and len(x) >= PARALLEL_ROWS:
        _gelu_parallel(flat, gelu_table(), out, other, 16384)
    else:
        gelu_rows(flat, gelu_table(), out, other)
    return out.reshape(x.shape)
