"""llama.cpp's k-quant quantizers (ggml-quants.c), bit for bit.

Without an importance matrix: `quantize_row_q*_K_ref` and their scale searches
(`make_qkx2_quants` for scale and min, `make_q3_quants`, `make_qx_quants` for signed codes).
With one (`importance`, a weight per element): the `quantize_row_q*_K_impl` variants, which weight
errors by `importance * sqrt(sigma2 + x^2)` and search the super-block scales too
(`make_qkx3_quants`, `make_qp_quants`).

ggml computes all of this in float32, one operation at a time (ggml-base is built without
fused multiply-add), and the searches compare errors, so the same codes come out only when every
product and sum is rounded to float32 in the same order. Hence the explicit `F32(...)`s: in Numba,
int * float32 would be computed in float64.
Each `quantize_*` takes float32 [n_blocks, 256] and returns the fields of its format.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llmx.quant.cpu.simd import round_f16

QK_K = 256
F32 = np.float32
_ZERO, _ONE = F32(0.0), F32(1.0)
_EPS = F32(1e-15)  # GROUP_MAX_EPS
_TENTH = F32(0.1)
_NO_WEIGHTS = np.zeros((0, QK_K), np.float32)
_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_JIT, inline="always")
def nearest_int(v):
    return int(np.rint(v))  # ggml adds 1.5 * 2^23 in float32: round half to even


@njit(**_JIT, inline="always")
def clamp(v, lo, hi):
    return max(lo, min(hi, v))


@njit(**_JIT)
def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, L, scratch):
    """Codes 0..nmax in L for x ~ scale * L - min; returns (scale, min). Also make_qkx3_quants.
    `scratch` is float32 [4, n]. Each pass computes the per-element values in one loop (which
    vectorizes) and sums them in another, in ggml's order, so the float32 results are its own."""
    n = x.size
    shifted, codes, best_codes, terms = scratch[0, :n], scratch[1, :n], scratch[2, :n], scratch[3, :n]
    lo, hi = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        lo = min(lo, x[i])
        hi = max(hi, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = min(lo, _ZERO)
    if hi == lo:
        L[:n] = 0
        return _ZERO, -lo
    top = F32(nmax)
    for i in range(n):
        shifted[i] = x[i] - lo
    iscale = top / (hi - lo)
    scale = _ONE / iscale
    for i in range(n):
        best_codes[i] = min(max(np.rint(iscale * shifted[i]), _ZERO), top)
        diff = scale * best_codes[i] + lo - x[i]
        terms[i] = w[i] * (abs(diff) if use_mad else diff * diff)
    best = _ZERO
    for i in range(n):
        best += terms[i]
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + top) / (hi - lo)
        for i in range(n):
            codes[i] = min(max(np.rint(iscale * shifted[i]), _ZERO), top)
            terms[i] = w[i] * codes[i]
        sum_l = sum_l2 = sum_xl = _ZERO
        for i in range(n):
            sum_l += terms[i]
            sum_l2 += terms[i] * codes[i]
            sum_xl += terms[i] * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            for i in range(n):
                diff = this_scale * codes[i] + this_min - x[i]
                terms[i] = w[i] * (abs(diff) if use_mad else diff * diff)
            err = _ZERO
            for i in range(n):
                err += terms[i]
            if err < best:
                best_codes[:] = codes
                best, scale, lo = err, this_scale, this_min
                for i in range(n):  # ggml's later steps measure from the new min
                    shifted[i] = x[i] - lo
    for i in range(n):
        L[i] = int(best_codes[i])
    return scale, -lo


@njit(**_JIT)
def _signed_max(x):
    """The element of largest magnitude (the first of ties), and that magnitude."""
    top = amax = _ZERO
    for i in range(x.size):
        if abs(x[i]) > amax:
            amax, top = abs(x[i]), x[i]
    return top, amax


@njit(**_JIT)
def _signed_sums(x, w, nmax, iscale):
    """(sum w x q, sum w q^2) for codes q = round(iscale * x) clamped to -nmax..nmax-1; w = x^2
    when empty (rmse_type 1)."""
    sumlx = suml2 = _ZERO
    for i in range(x.size):
        q = F32(clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1))
        wi = w[i] if w.size else x[i] * x[i]
        sumlx += wi * x[i] * q
        suml2 += wi * q * q
    return sumlx, suml2


@njit(**_JIT)
def _store_signed_codes(x, nmax, iscale, L):
    for i in range(x.size):
        L[i] = nmax + clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)


@njit(**_JIT)
def make_qx_quants(x, nmax, w, L):
    """Signed codes (stored + nmax) for x ~ scale * code, scanning 19 scales; rmse_type 1:
    error weights `w`, or x^2 when `w` is empty. Returns the scale."""
    top, amax = _signed_max(x)
    if amax < _EPS:
        L[:x.size] = 0
        return _ZERO
    iscale = F32(-nmax) / top
    _store_signed_codes(x, nmax, iscale, L)
    sumlx, suml2 = _signed_sums(x, w, nmax, iscale)
    scale = sumlx / suml2 if suml2 != 0 else _ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + _TENTH * F32(step)) / top
        sumlx, suml2 = _signed_sums(x, w, nmax, iscale)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            _store_signed_codes(x, nmax, iscale, L)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def make_q3_quants(x, nmax, L):
    """Signed codes (stored + nmax), refined one at a time to cut the x^2-weighted error."""
    n = x.size
    top, amax = _signed_max(x)
    if amax < _EPS:
        L[:n] = 0
        return _ZERO
    iscale = F32(-nmax) / top
    sumlx = suml2 = _ZERO
    for i in range(n):
        L[i] = clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1)
        w = x[i] * x[i]
        sumlx += w * x[i] * F32(L[i])
        suml2 += w * F32(L[i]) * F32(L[i])
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * F32(L[i])
            if slx > 0:
                sl2 = suml2 - w * F32(L[i]) * F32(L[i])
                new_l = clamp(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                if new_l != L[i]:
                    slx += w * x[i] * F32(new_l)
                    sl2 += w * F32(new_l) * F32(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx, suml2 = slx, sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else _ZERO


@njit(**_JIT)
def make_qp_quants(x, nmax, L, w):
    """Non-negative codes 0..nmax for positive x (the sub-block scales) under weights w."""
    n = x.size
    top = _ZERO
    for i in range(n):
        top = max(top, x[i])
    if top < _EPS:
        L[:n] = 0
        return _ZERO
    iscale = F32(nmax) / top
    for i in range(n):
        L[i] = nearest_int(iscale * x[i])
    scale = _ONE / iscale
    best = _ZERO
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (_TENTH * F32(step) + F32(nmax)) / top
        scale_step = _ONE / iscale_step
        err = _ZERO
        for i in range(n):
            diff = x[i] - scale_step * F32(min(nmax, nearest_int(iscale_step * x[i])))
            err += w[i] * diff * diff
        if err < best:
            best, iscale = err, iscale_step
    sumlx = suml2 = _ZERO
    for i in range(n):
        L[i] = min(nmax, nearest_int(iscale * x[i]))
        sumlx += w[i] * x[i] * F32(L[i])
        suml2 += w[i] * F32(L[i]) * F32(L[i])
    for _ in range(5):
        changed = 0
        for i in range(n):
            slx = sumlx - w[i] * x[i] * F32(L[i])
            sl2 = suml2 - w[i] * F32(L[i]) * F32(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w[i] * x[i] * F32(new_l)
                    sl2 += w[i] * F32(new_l) * F32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx, suml2 = slx, sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _ZERO


# -- Q2_K, Q4_K, Q5_K: unsigned codes with a scale and a min per sub-block -----------------------


@njit(**_JIT)
def _sub_block_weights(xs, importance, sigma2, rms_plus_abs, out):
    """Error weights of one sub-block: importance * sqrt(sigma2 + x^2); without importance,
    |x| (Q2_K) or the sub-block's rms + |x| (Q4_K, Q5_K)."""
    n = xs.size
    if importance.size:
        for i in range(n):
            out[i] = importance[i] * np.sqrt(sigma2 + xs[i] * xs[i])
    elif rms_plus_abs:
        sum_x2 = _ZERO
        for i in range(n):
            sum_x2 += xs[i] * xs[i]
        av_x = np.sqrt(sum_x2 / F32(n))
        for i in range(n):
            out[i] = av_x + abs(xs[i])
    else:
        for i in range(n):
            out[i] = abs(xs[i])


@njit(**_JIT)
def _scale_min_block(xb, imp, sub, nmax, scale_max, rmin, rdelta, nstep, use_mad, sigma_factor, d_out, sc, mn, q,
                     scratch):
    """One 256-value block of Q2_K/Q4_K/Q5_K: writes d_out[0:2] (d, dmin, float16-exact), the
    sub-block scale and min codes, and the element codes. `scratch` is reused across blocks."""
    n_sub = QK_K // sub
    scales, mins, w, sw, aux, codes, ls, lm = scratch
    sw[:] = 0
    sigma2 = _ZERO
    if imp.size:
        sum_x2 = _ZERO
        for i in range(QK_K):
            sum_x2 += xb[i] * xb[i]
        sigma2 = sigma_factor * sum_x2 / F32(QK_K)
    for j in range(n_sub):
        xs = xb[j * sub:(j + 1) * sub]
        _sub_block_weights(xs, imp[j * sub:(j + 1) * sub] if imp.size else imp, sigma2, sub == 32, w)
        for i in range(sub):
            sw[j] += w[i]
        if imp.size:  # make_qkx3_quants' search
            scales[j], mins[j] = make_qkx2_quants(xs, w, nmax, F32(-0.9), F32(0.05), 36, False,
                                                  codes[j * sub:(j + 1) * sub], aux)
        else:
            scales[j], mins[j] = make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad,
                                                  codes[j * sub:(j + 1) * sub], aux)
    if imp.size:
        d = round_f16(make_qp_quants(scales, scale_max, ls, sw))
        dmin = round_f16(make_qp_quants(mins, scale_max, lm, sw))
    else:
        d, dmin = _super_scale(scales, scale_max, ls), _super_scale(mins, scale_max, lm)
    for j in range(n_sub):
        sc[j], mn[j] = min(scale_max, ls[j]), min(scale_max, lm[j])
        dl = d * F32(sc[j])
        if dl == 0:
            continue  # the codes of the search stay
        ml = dmin * F32(mn[j])
        for i in range(j * sub, (j + 1) * sub):
            codes[i] = clamp(nearest_int((xb[i] + ml) / dl), 0, nmax)
    q[:] = codes
    d_out[0], d_out[1] = d, dmin


@njit(**_JIT)
def _super_scale(values, top, codes):
    """The ref quantizers' block scale: codes = round(values * top / max), d = max / top (float16)."""
    vmax = _ZERO
    for v in values:
        vmax = max(vmax, v)
    inv = F32(top) / vmax if vmax > 0 else _ZERO
    for j in range(values.size):
        codes[j] = nearest_int(inv * values[j])
    return round_f16(vmax / F32(top)) if vmax > 0 else _ZERO


@njit(**_JIT)
def _quantize_scale_min(x, importance, sub, nmax, scale_max, rmin, rdelta, nstep, use_mad, sigma_factor):
    n_blocks = x.shape[0]
    d = np.zeros((n_blocks, 2), np.float32)
    sc = np.zeros((n_blocks, QK_K // sub), np.uint8)
    mn = np.zeros((n_blocks, QK_K // sub), np.uint8)
    q = np.zeros((n_blocks, QK_K), np.uint8)
    n_sub = QK_K // sub
    scratch = (np.empty(n_sub, np.float32), np.empty(n_sub, np.float32), np.empty(sub, np.float32),
               np.zeros(n_sub, np.float32), np.empty((4, sub), np.float32), np.empty(QK_K, np.int32),
               np.zeros(n_sub, np.int32), np.zeros(n_sub, np.int32))
    for b in range(n_blocks):
        imp = importance[b] if importance.size else importance.reshape(-1)[:0]
        _scale_min_block(x[b], imp, sub, nmax, scale_max, rmin, rdelta, nstep, use_mad, sigma_factor,
                         d[b], sc[b], mn[b], q[b], scratch)
    return d, sc, mn, q


def _split_scale_min(fields):
    d, sc, mn, q = fields
    return d[:, 0].astype(np.float16), d[:, 1].astype(np.float16), sc, mn, q


def quantize_q2_k(x, importance=None):
    return _split_scale_min(_quantize_scale_min(x, _weights(importance), 16, 3, 15, F32(-0.5), _TENTH, 15, True,
                                                _ONE))


def quantize_q4_k(x, importance=None):
    return _split_scale_min(_quantize_scale_min(x, _weights(importance), 32, 15, 63, F32(-1.0), _TENTH, 20, False,
                                                F32(2.0)))


def quantize_q5_k(x, importance=None):
    return _split_scale_min(_quantize_scale_min(x, _weights(importance), 32, 31, 63, F32(-0.5), _TENTH, 15, False,
                                                F32(2.0)))


# -- Q3_K, Q6_K: signed codes with a signed scale per 16 values ----------------------------------


@njit(**_JIT)
def _q3_k_block(xb, imp, d_out, sc, q):
    scales = np.empty(16, np.float32)
    sw = np.zeros(16, np.float32)
    w = np.empty(16, np.float32)
    codes = np.empty(QK_K, np.int32)
    if imp.size:
        sum_x2 = _ZERO
        for i in range(QK_K):
            sum_x2 += xb[i] * xb[i]
        sigma2 = F32(2.0) * sum_x2 / F32(QK_K)
        for j in range(16):
            for i in range(16):
                v = xb[16 * j + i]
                w[i] = imp[16 * j + i] * np.sqrt(sigma2 + v * v)
                sw[j] += w[i]
            scales[j] = make_qx_quants(xb[16 * j:16 * j + 16], 4, w, codes[16 * j:16 * j + 16])
        levels = np.empty(16, np.int32)
        d = round_f16(make_qx_quants(scales, 32, sw, levels))
        for j in range(16):
            sc[j] = levels[j] - 32
    else:
        top = amax = _ZERO
        for j in range(16):
            scales[j] = make_q3_quants(xb[16 * j:16 * j + 16], 4, codes[16 * j:16 * j + 16])
            if abs(scales[j]) > amax:
                amax, top = abs(scales[j]), scales[j]
        d = _ZERO
        sc[:] = -32  # stored 0: what a block of zeros holds
        if top != 0:
            iscale = F32(-32.0) / top
            for j in range(16):
                sc[j] = clamp(nearest_int(iscale * scales[j]), -32, 31)
            d = round_f16(_ONE / iscale)
    _signed_codes(xb, d, sc, 4, codes, q)
    d_out[0] = d


@njit(**_JIT)
def _signed_codes(xb, d, sc, nmax, codes, q):
    """Final codes -nmax..nmax-1 against the stored scales (search codes where a scale is 0)."""
    for j in range(16):
        dl = d * F32(sc[j])
        if dl != 0:
            for i in range(16 * j, 16 * j + 16):
                codes[i] = clamp(nearest_int(xb[i] / dl), -nmax, nmax - 1) + nmax
    for i in range(QK_K):
        q[i] = codes[i] - nmax


@njit(**_JIT)
def _q6_k_block(xb, imp, d_out, sc, q):
    scales = np.empty(16, np.float32)
    codes = np.empty(QK_K, np.int32)
    top = amax = _ZERO
    for j in range(16):
        w = imp[16 * j:16 * j + 16] if imp.size else imp
        scales[j] = make_qx_quants(xb[16 * j:16 * j + 16], 32, w, codes[16 * j:16 * j + 16])
        if abs(scales[j]) > amax:
            amax, top = abs(scales[j]), scales[j]
    if amax < _EPS:
        d_out[0] = _ZERO
        sc[:] = 0
        q[:] = -32  # an all-zero block
        return
    iscale = F32(-128.0) / top
    d = round_f16(_ONE / iscale)
    for j in range(16):
        sc[j] = min(127, nearest_int(iscale * scales[j]))
    _signed_codes(xb, d, sc, 32, codes, q)
    d_out[0] = d


@njit(**_JIT)
def _quantize_signed(x, importance, six):
    n_blocks = x.shape[0]
    d = np.zeros((n_blocks, 1), np.float32)
    sc = np.zeros((n_blocks, 16), np.int8)
    q = np.zeros((n_blocks, QK_K), np.int8)
    for b in range(n_blocks):
        imp = importance[b] if importance.size else importance.reshape(-1)[:0]
        if six:
            _q6_k_block(x[b], imp, d[b], sc[b], q[b])
        else:
            _q3_k_block(x[b], imp, d[b], sc[b], q[b])
    return d, sc, q


def _split_signed(fields):
    d, sc, q = fields
    return d[:, 0].astype(np.float16), sc, q


def quantize_q3_k(x, importance=None):
    """d (float16 [n]), sub-block scales -32..31, codes -4..3."""
    return _split_signed(_quantize_signed(np.ascontiguousarray(x, np.float32), _weights(importance), False))


def quantize_q6_k(x, importance=None):
    """d (float16 [n]), sub-block scales -128..127, codes -32..31."""
    return _split_signed(_quantize_signed(np.ascontiguousarray(x, np.float32), _weights(importance), True))


def _weights(importance):
    if importance is None:
        return _NO_WEIGHTS
    return np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, QK_K)


# -- Q4_0, Q4_1, Q5_0, Q5_1 with an importance matrix (llama.cpp's quantize_row_q*_impl) -------


@njit(**_JIT)
def row_sigma2(rows):
    """float32 [n_rows, n] -> per row sum(x^2) / n, summed in order as ggml does."""
    out = np.empty(rows.shape[0], np.float32)
    for r in range(rows.shape[0]):
        total = _ZERO
        for v in rows[r]:
            total += v * v
        out[r] = total / F32(rows.shape[1])
    return out


@njit(**_JIT)
def quantize_32_weighted(x, importance, sigma2, nmax, with_min):
    """Blocks of 32 under weights importance * sqrt(sigma2 + x^2): signed codes stored + nmax by
    make_qx_quants (Q4_0, Q5_0), or codes 0..nmax with a min by make_qkx3_quants (Q4_1, Q5_1).
    Returns (d, m, codes) with m the block minimum (0 for the signed types)."""
    n = x.shape[0]
    d = np.empty(n, np.float32)
    m = np.zeros(n, np.float32)
    codes = np.empty((n, 32), np.uint8)
    w = np.empty(32, np.float32)
    L = np.empty(32, np.int32)
    aux = np.empty((4, 32), np.float32)
    for b in range(n):
        for j in range(32):
            w[j] = importance[b, j] * np.sqrt(sigma2[b] + x[b, j] * x[b, j])
        if with_min:
            d[b], the_min = make_qkx2_quants(x[b], w, nmax, F32(-0.9), F32(0.05), 36, False, L, aux)
            m[b] = -the_min
        else:
            d[b] = make_qx_quants(x[b], nmax, w, L)
        for j in range(32):
            codes[b, j] = L[j]
    return d, m, codes
