"""llama.cpp's k-quant quantizers (ggml-quants.c `quantize_row_q*_K_ref`) with their scale searches:
`make_qkx2_quants` (scale and min), `make_q3_quants` (signed, iterative), `make_qx_quants` (signed).

The searches are sequential per sub-block, so they are scalar loops compiled by Numba rather than
numpy. With `weights` (an importance matrix, one weight per element), the default error weights
are replaced by `importance * sqrt(sigma2 + x^2)`, as llama.cpp's imatrix quantizers weight them.
Each `quantize_*` takes float32 [n_blocks, 256] and returns the fields of its format.
"""

from __future__ import annotations

import numpy as np
from numba import njit

QK_K = 256
_NO_WEIGHTS = np.zeros((0, QK_K), np.float32)


@njit(cache=True, nogil=True, error_model="numpy")
def _nearest_int(v):
    return int(np.rint(v))  # round half to even, like ggml's nearest_int


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, L):
    """Codes 0..nmax in L for x ~ scale * L - min; returns (scale, min)."""
    n = x.size
    lo = min(x.min(), 0.0)
    hi = x.max()
    if hi == lo:
        L[:] = 0
        return 0.0, -lo
    sum_w = w.sum()
    sum_x = (w * x).sum()
    iscale = nmax / (hi - lo)
    scale = 1.0 / iscale
    best = 0.0
    for i in range(n):
        L[i] = max(0, min(nmax, _nearest_int(iscale * (x[i] - lo))))
        diff = scale * L[i] + lo - x[i]
        best += w[i] * (abs(diff) if use_mad else diff * diff)
    aux = np.empty(n, np.int32)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - lo)
        sum_l = sum_l2 = sum_xl = 0.0
        for i in range(n):
            aux[i] = max(0, min(nmax, _nearest_int(iscale * (x[i] - lo))))
            sum_l += w[i] * aux[i]
            sum_l2 += w[i] * aux[i] * aux[i]
            sum_xl += w[i] * aux[i] * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det <= 0:
            continue
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        if this_min > 0:
            this_min = 0.0
            this_scale = sum_xl / sum_l2
        err = 0.0
        for i in range(n):
            diff = this_scale * aux[i] + this_min - x[i]
            err += w[i] * (abs(diff) if use_mad else diff * diff)
        if err < best:
            L[:] = aux
            best, scale, lo = err, this_scale, this_min
    return scale, -lo


@njit(cache=True, nogil=True, error_model="numpy")
def make_q3_quants(x, nmax, L):
    """Signed codes -nmax..nmax-1 in L for x ~ scale * L, refined to cut x^2-weighted error."""
    n = x.size
    imax = np.argmax(np.abs(x))
    if x[imax] == 0:
        L[:] = 0
        return 0.0
    iscale = -nmax / x[imax]
    sumlx = suml2 = 0.0
    for i in range(n):
        L[i] = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
        w = x[i] * x[i]
        sumlx += w * x[i] * L[i]
        suml2 += w * L[i] * L[i]
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * L[i]
            if slx <= 0:
                continue
            sl2 = suml2 - w * L[i] * L[i]
            new_l = max(-nmax, min(nmax - 1, _nearest_int(x[i] * sl2 / slx)))
            if new_l != L[i]:
                slx += w * x[i] * new_l
                sl2 += w * new_l * new_l
                if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                    L[i] = new_l
                    sumlx, suml2 = slx, sl2
                    changed += 1
        if changed == 0:
            break
    return sumlx / suml2


@njit(cache=True, nogil=True, error_model="numpy")
def make_qx_quants(x, nmax, w, L):
    """Signed codes -nmax..nmax-1 in L for x ~ scale * L; scans 18 scales around nmax/max."""
    n = x.size
    imax = np.argmax(np.abs(x))
    if abs(x[imax]) < 1e-30:
        L[:] = 0
        return 0.0
    best = -1.0
    best_scale = best_iscale = 0.0
    for k in range(19):
        step = 0 if k == 0 else k - 10 if k <= 9 else k - 9  # 0 first, then -9..-1, 1..9
        iscale = -(nmax + 0.1 * step) / x[imax]
        sumlx = suml2 = 0.0
        for i in range(n):
            q = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
            sumlx += w[i] * x[i] * q
            suml2 += w[i] * q * q
        if k == 0 or (suml2 > 0 and sumlx * sumlx > best * suml2):
            best_scale = sumlx / suml2 if suml2 > 0 else 0.0
            best = best_scale * sumlx
            best_iscale = iscale
    for i in range(n):
        L[i] = max(-nmax, min(nmax - 1, _nearest_int(best_iscale * x[i])))
    return best_scale


@njit(cache=True, nogil=True, error_model="numpy")
def _error_weights(x, importance, sigma2, default):
    if importance.size == 0:
        return default
    return (importance * np.sqrt(sigma2 + x * x)).astype(np.float32)


@njit(cache=True, nogil=True, error_model="numpy")
def _sub_block_scale_mins(x, importance, sub, nmax, rmin, rdelta, nstep, use_mad):
    """Per sub-block (scale, min) found by make_qkx2_quants: float32 [n_blocks, 256 / sub] each."""
    n_blocks, n_sub = x.shape[0], QK_K // sub
    scales = np.zeros((n_blocks, n_sub), np.float32)
    mins = np.zeros((n_blocks, n_sub), np.float32)
    codes = np.zeros(sub, np.int32)
    for b in range(n_blocks):
        xb = x[b]
        sigma2 = 2.0 * (xb * xb).sum() / QK_K
        for j in range(n_sub):
            xs = xb[j * sub:(j + 1) * sub]
            if sub == 16:  # Q2_K weights errors by |x|
                default = np.abs(xs)
            else:  # Q4_K/Q5_K by the sub-block's rms plus |x|
                default = (np.float32(np.sqrt((xs * xs).sum() / sub)) + np.abs(xs)).astype(np.float32)
            imp = importance[b, j * sub:(j + 1) * sub] if importance.size else np.empty(0, np.float32)
            w = _error_weights(xs, imp, sigma2, default)
            scales[b, j], mins[b, j] = make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad, codes)
    return scales, mins


@njit(cache=True, nogil=True, error_model="numpy")
def _codes_with_min(x, dl, ml, nmax):
    """codes = round((x + ml) / dl) clamped to 0..nmax; dl, ml per sub-block [n_blocks, n_sub]."""
    n_blocks, n_sub = dl.shape
    sub = QK_K // n_sub
    q = np.zeros((n_blocks, QK_K), np.uint8)
    for b in range(n_blocks):
        for j in range(n_sub):
            if dl[b, j] == 0:
                continue
            for i in range(j * sub, (j + 1) * sub):
                q[b, i] = max(0, min(nmax, _nearest_int((x[b, i] + ml[b, j]) / dl[b, j])))
    return q


def _quantize_scale_min(x, importance, sub, nmax, rmin, rdelta, nstep, use_mad, scale_bits):
    """Q2_K/Q4_K/Q5_K: returns d, dmin (float16 [n]), scale and min codes, and element codes."""
    scales, mins = _sub_block_scale_mins(x, _weights(importance), sub, nmax, rmin, rdelta, nstep, use_mad)
    top = np.float32((1 << scale_bits) - 1)
    d, sc = _scale_codes(scales, top)
    dmin, mn = _scale_codes(mins, top)
    dl = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    ml = dmin.astype(np.float32)[:, None] * mn.astype(np.float32)
    return d, dmin, sc, mn, _codes_with_min(x, dl, ml, int(nmax))


def _scale_codes(values, top):
    """Positive per-sub-block values -> (float16 block scale, uint8 codes 0..top)."""
    vmax = values.max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(vmax > 0, top / vmax, np.float32(0)).astype(np.float32)
    codes = np.minimum(top, np.rint(inv[:, None] * values)).astype(np.uint8)
    return (vmax / top).astype(np.float16), codes


def quantize_q2_k(x, importance=None):
    return _quantize_scale_min(x, importance, 16, 3, -0.5, 0.1, 15, True, 4)


def quantize_q4_k(x, importance=None):
    return _quantize_scale_min(x, importance, 32, 15, -1.0, 0.1, 20, False, 6)


def quantize_q5_k(x, importance=None):
    return _quantize_scale_min(x, importance, 32, 31, -0.5, 0.1, 15, False, 6)


@njit(cache=True, nogil=True, error_model="numpy")
def _signed_sub_block_scales(x, importance, nmax, q3):
    """Q3_K/Q6_K: a signed scale per 16 elements, float32 [n_blocks, 16]."""
    n_blocks = x.shape[0]
    scales = np.zeros((n_blocks, 16), np.float32)
    codes = np.zeros(16, np.int32)
    for b in range(n_blocks):
        xb = x[b]
        sigma2 = 2.0 * (xb * xb).sum() / QK_K
        for j in range(16):
            xs = xb[j * 16:(j + 1) * 16]
            if importance.size:
                w = _error_weights(xs, importance[b, j * 16:(j + 1) * 16], sigma2, xs)
                scales[b, j] = make_qx_quants(xs, nmax, w, codes)
            elif q3:
                scales[b, j] = make_q3_quants(xs, nmax, codes)
            else:
                scales[b, j] = make_qx_quants(xs, nmax, xs * xs, codes)
    return scales


@njit(cache=True, nogil=True, error_model="numpy")
def _signed_codes(x, dl, nmax):
    n_blocks = dl.shape[0]
    q = np.zeros((n_blocks, QK_K), np.int8)
    for b in range(n_blocks):
        for j in range(16):
            if dl[b, j] == 0:
                continue
            for i in range(j * 16, (j + 1) * 16):
                q[b, i] = max(-nmax, min(nmax - 1, _nearest_int(x[b, i] / dl[b, j])))
    return q


def _quantize_signed(x, importance, nmax, scale_levels, q3):
    """Q3_K/Q6_K: returns d (float16 [n]), int8 sub-block scales, int8 codes -nmax..nmax-1."""
    scales = _signed_sub_block_scales(x, _weights(importance), nmax, q3)
    vmax = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)[:, 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax != 0, np.float32(-scale_levels) / vmax, np.float32(0)).astype(np.float32)
        d = np.where(vmax != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float16)
    sc = np.clip(np.rint(iscale[:, None] * scales), -scale_levels, scale_levels - 1).astype(np.int8)
    dl = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    return d, sc, _signed_codes(x, dl, nmax)


def quantize_q3_k(x, importance=None):
    return _quantize_signed(x, importance, 4, 32, True)


def quantize_q6_k(x, importance=None):
    return _quantize_signed(x, importance, 32, 128, False)


def _weights(importance):
    if importance is None:
        return _NO_WEIGHTS
    return np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, QK_K)
