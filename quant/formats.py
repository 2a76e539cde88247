"""Block formats: one class per GGML type, its byte layout a numpy structured dtype (the sum of
its fields), with a numpy reference `dequantize` and `quantize` beside it.

These are the oracles for the Numba kernels (DESIGN principle 6); they are written for clarity,
vectorized over blocks, and bit-exact with `gguf.quants` (itself bit-exact with ggml).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from llmx.quant import iquants, kquants, legacy
from llmx.quant.qtypes import QType, block_size, type_size

QK_K = 256

# 4-bit codes sit low nibble first: byte j holds element j (low) and element j + 16 (high).
_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)


class BlockFormat:
    """A quantized block format. Subclasses set `qtype` and `layout` and implement the two
    block-level conversions; rows of any shape are handled here."""

    qtype: ClassVar[QType]
    layout: ClassVar[np.dtype]

    @classmethod
    def block_size(cls) -> int:
        return block_size(cls.qtype)

    @classmethod
    def blocks(cls, raw: np.ndarray) -> np.ndarray:
        """uint8 [..., row_bytes] -> structured [n_blocks] view of the fields."""
        return np.ascontiguousarray(raw).view(np.uint8).reshape(-1).view(cls.layout)

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """uint8 [..., row_bytes] -> float32 [..., row_elements]."""
        raw = np.ascontiguousarray(raw).view(np.uint8)
        values = cls.dequantize_blocks(cls.blocks(raw))  # [n_blocks, block_size]
        return values.reshape(*raw.shape[:-1], -1)

    @classmethod
    def quantize(cls, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """float32 [..., row_elements] -> uint8 [..., row_bytes]. `importance` ([row_elements],
        one weight per column) steers formats whose quantizers search (the k-quants)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = cls.block_size()
        if x.shape[-1] % n:
            raise ValueError(f"{cls.qtype.name} rows must be a multiple of {n} values, not {x.shape[-1]}")
        blocks = x.reshape(-1, n)
        weights = None
        if importance is not None:
            columns = np.asarray(importance, dtype=np.float32).reshape(-1, n)  # [blocks per row, n]
            weights = np.tile(columns, (blocks.shape[0] // columns.shape[0], 1))
        packed = cls.quantize_blocks(blocks, None) if weights is None else cls.quantize_weighted(x, blocks, weights)
        return packed.view(np.uint8).reshape(*x.shape[:-1], -1)

    @classmethod
    def quantize_weighted(cls, x: np.ndarray, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """With per-element importance `weights` ([n_blocks, block_size]); x the rows the blocks came from."""
        return cls.quantize_blocks(blocks, weights)

    @classmethod
    def dequantize_blocks(cls, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _f32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> uint8 [n, 32]: low nibbles are elements 0..15, high ones 16..31."""
    return ((qs[:, None, :] >> _NIBBLE_SHIFTS) & 0x0F).reshape(qs.shape[0], -1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 32] (values < 16) -> uint8 [n, 16]."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """uint32 [n] -> uint8 [n, 32]: bit j of qh becomes 0x10 for element j (Q5_0/Q5_1)."""
    bits = (qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return (bits.astype(np.uint8) << 4)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 32] 5-bit codes -> uint32 [n] of their fifth bits."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    return (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _absmax_signed(x: np.ndarray) -> np.ndarray:
    """Per block, the value of largest magnitude with its sign (first one on ties, as ggml)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy's rint rounds them to even)."""
    return (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.float32)


# -- plain float types --------------------------------------------------------


class F32(BlockFormat):
    qtype = QType.F32
    layout = np.dtype([("v", "<f4")])

    @classmethod
    def dequantize_blocks(cls, b):
        return b["v"].reshape(-1, 1).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, x, weights):
        return x.reshape(-1).astype("<f4").view(cls.layout)


class F16(BlockFormat):
    qtype = QType.F16
    layout = np.dtype([("v", "<f2")])

    @classmethod
    def dequantize_blocks(cls, b):
        return _f32(b["v"]).reshape(-1, 1)

    @classmethod
    def quantize_blocks(cls, x, weights):
        return _f16(x.reshape(-1)).view(cls.layout)


class BF16(BlockFormat):
    qtype = QType.BF16
    layout = np.dtype([("v", "<u2")])

    @classmethod
    def dequantize_blocks(cls, b):
        return (b["v"].astype(np.uint32) << 16).view(np.float32).reshape(-1, 1)

    @classmethod
    def quantize_blocks(cls, x, weights):
        bits = x.reshape(-1).view(np.uint32)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        quiet_nan = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
        bits = np.where(is_nan, quiet_nan, bits).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        return rounded.astype("<u2").view(cls.layout)


# -- 32-element block types -----------------------------------------------------


class Q8_0(BlockFormat):
    qtype = QType.Q8_0
    layout = np.dtype([("d", "<f2"), ("qs", "i1", 32)])

    @classmethod
    def dequantize_blocks(cls, b):
        return _f32(b["d"])[:, None] * _f32(b["qs"])

    @classmethod
    def quantize_blocks(cls, x, weights):
        d, q = legacy.quantize_q8_0(np.ascontiguousarray(x, np.float32))
        out = np.empty(len(x), cls.layout)
        out["qs"], out["d"] = q, _f16(d)
        return out


class _Legacy32(BlockFormat):
    """Q4_0, Q4_1, Q5_0, Q5_1: 32 codes, a float16 scale `d`, for the _1 types a float16 minimum
    `m`, for the 5-bit types the fifth bits in `qh`. Signed types store code + nmax; the _1 types
    codes 0..nmax. Quantized as llama.cpp's quantize_row_q*_ref, or with an importance matrix as
    its quantize_row_q*_impl."""

    nmax: ClassVar[int]
    has_min: ClassVar[bool] = False

    @classmethod
    def pack(cls, d, m, q):
        out = np.empty(len(d), cls.layout)
        out["d"], out["qs"] = _f16(d), _pack_nibbles(q)
        if cls.has_min:
            out["m"] = _f16(m)
        if "qh" in cls.layout.names:
            out["qh"] = _pack_high_bits(q)
        return out

    @classmethod
    def quantize_blocks(cls, x, weights):
        if not cls.has_min:
            d, q = legacy.quantize_signed_offset(np.ascontiguousarray(x, np.float32), cls.nmax)
            return cls.pack(d, None, q)
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = (hi - lo) / np.float32(cls.nmax)
        q = np.trunc((x - lo[:, None]) * _safe_inverse(d)[:, None] + np.float32(0.5))
        return cls.pack(d, lo, q.astype(np.uint8).clip(0, cls.nmax))

    @classmethod
    def quantize_weighted(cls, x, blocks, weights):
        # the error weights use the whole row's mean square
        sigma2 = np.repeat(kquants.row_sigma2(x.reshape(-1, x.shape[-1])), x.shape[-1] // 32)
        return cls.pack(*kquants.quantize_32_weighted(blocks, weights, sigma2, cls.nmax, cls.has_min))


class Q4_0(_Legacy32):
    qtype = QType.Q4_0
    layout = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
    nmax = 8

    @classmethod
    def dequantize_blocks(cls, b):
        q = _unpack_nibbles(b["qs"]).astype(np.int8) - np.int8(8)
        return _f32(b["d"])[:, None] * _f32(q)


class Q4_1(_Legacy32):
    qtype = QType.Q4_1
    layout = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
    nmax, has_min = 15, True

    @classmethod
    def dequantize_blocks(cls, b):
        return _f32(b["d"])[:, None] * _f32(_unpack_nibbles(b["qs"])) + _f32(b["m"])[:, None]


class Q5_0(_Legacy32):
    qtype = QType.Q5_0
    layout = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    nmax = 16

    @classmethod
    def dequantize_blocks(cls, b):
        q = (_unpack_nibbles(b["qs"]) | _high_bits(b["qh"])).astype(np.int8) - np.int8(16)
        return _f32(b["d"])[:, None] * _f32(q)


class Q5_1(_Legacy32):
    qtype = QType.Q5_1
    layout = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    nmax, has_min = 31, True

    @classmethod
    def dequantize_blocks(cls, b):
        q = _unpack_nibbles(b["qs"]) | _high_bits(b["qh"])
        return _f32(b["d"])[:, None] * _f32(q) + _f32(b["m"])[:, None]


class IQ4_NL(BlockFormat):
    """32 codes indexing a non-linear table of 16 int8 values, times a float16 scale."""

    qtype = QType.IQ4_NL
    layout = np.dtype([("d", "<f2"), ("qs", "u1", 16)])

    @classmethod
    def dequantize_blocks(cls, b):
        return _f32(b["d"])[:, None] * iquants.VALUES[_unpack_nibbles(b["qs"])]

    @classmethod
    def quantize_blocks(cls, x, weights):
        w = np.zeros((0, 32), np.float32) if weights is None else np.ascontiguousarray(weights, np.float32)
        scales, codes = iquants.quantize_iq4_nl_blocks(np.ascontiguousarray(x, np.float32), w)
        out = np.empty(len(x), cls.layout)
        out["d"], out["qs"] = _f16(scales), _pack_nibbles(codes)
        return out


class Q8_1(BlockFormat):
    """Activations for Q4_1/Q5_1 dot products: Q8_0 plus `s` = d * sum(qs)."""

    qtype = QType.Q8_1
    layout = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])

    @classmethod
    def dequantize_blocks(cls, b):
        return _f32(b["d"])[:, None] * _f32(b["qs"])

    @classmethod
    def quantize_blocks(cls, x, weights):
        d = np.abs(x).max(axis=1) / np.float32(127)
        q = round_away(x * _safe_inverse(d)[:, None])
        out = np.empty(len(x), cls.layout)
        out["d"], out["qs"] = _f16(d), q
        out["s"] = _f16(d * q.sum(axis=1, dtype=np.float32))
        return out


# -- 256-element super-block types (k-quants) -----------------------------------


def unpack_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit (scale, min) pairs -> uint8 [n, 8] scales and mins."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of `unpack_k_scales` for 6-bit values."""
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def unpack_q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes -> int8 [n, 16] signed 6-bit scales."""
    low = ((scales[:, None, :8] >> _NIBBLE_SHIFTS) & 0x0F).reshape(-1, 16)
    high = ((scales[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3).reshape(-1, 16)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def pack_q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """int [n, 16] in -32..31 -> Q3_K's 12 bytes."""
    u = (sc + 32).astype(np.uint8)
    out = np.zeros((len(sc), 12), np.uint8)
    out[:, :8] = (u[:, :8] & 0x0F) | ((u[:, 8:] & 0x0F) << 4)
    high = (u >> 4).reshape(-1, 4, 4)  # [n, shift group j, byte i]: scale 4j + i
    for j in range(4):
        out[:, 8:12] |= high[:, j, :] << (2 * j)
    return out


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 64] -> uint8 [n, 256]: 2-bit codes, 32 bytes x 4 shifts per 128 elements."""
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 code bytes -> uint8 [n, 8, 32]: 32 bytes hold sub-block 2c in their low
    nibbles and 2c + 1 in their high nibbles."""
    return ((qs.reshape(-1, 4, 1, 32) >> _NIBBLE_SHIFTS.reshape(1, 1, 2, 1)) & 0x0F).reshape(-1, 8, 32)


def _pack_k_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 256] codes below 16 -> Q4_K/Q5_K's 128 code bytes."""
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_two_bit_planes(q: np.ndarray) -> np.ndarray:
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _bit_planes(qh: np.ndarray, n_planes: int) -> np.ndarray:
    """uint8 [n, 32] -> uint8 [n, 32 * n_planes]: bit p of byte j is element 32p + j."""
    shifts = np.arange(n_planes, dtype=np.uint8).reshape(1, n_planes, 1)
    return ((qh[:, None, :] >> shifts) & 1).reshape(len(qh), -1)


def _pack_bit_planes(bits: np.ndarray) -> np.ndarray:
    planes = bits.reshape(len(bits), -1, 32).astype(np.uint8)
    shifts = np.arange(planes.shape[1], dtype=np.uint8).reshape(1, -1, 1)
    return (planes << shifts).sum(axis=1, dtype=np.uint8)


class Q2_K(BlockFormat):
    qtype = QType.Q2_K
    layout = np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")])

    @classmethod
    def dequantize_blocks(cls, b):
        n = len(b)
        dl = (_f32(b["d"])[:, None] * _f32(b["scales"] & 0x0F))[:, :, None]  # [n, 16, 1]
        ml = (_f32(b["dmin"])[:, None] * _f32(b["scales"] >> 4))[:, :, None]
        q = _f32(_two_bit_planes(b["qs"])).reshape(n, 16, 16)
        return (dl * q - ml).reshape(n, QK_K)

    @classmethod
    def quantize_blocks(cls, x, weights):
        d, dmin, sc, mn, q = kquants.quantize_q2_k(x, weights)
        out = np.empty(len(x), cls.layout)
        out["scales"] = sc | (mn << 4)
        out["qs"] = _pack_two_bit_planes(q)
        out["d"], out["dmin"] = d, dmin
        return out


class Q3_K(BlockFormat):
    qtype = QType.Q3_K
    layout = np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")])

    @classmethod
    def dequantize_blocks(cls, b):
        n = len(b)
        dl = (_f32(b["d"])[:, None] * _f32(unpack_q3_k_scales(b["scales"])))[:, :, None]
        low = _two_bit_planes(b["qs"]).astype(np.int8)
        # a clear hmask bit subtracts 4
        high = (_bit_planes(b["hmask"], 8) ^ 1).astype(np.int8) << 2
        q = _f32(low - high).reshape(n, 16, 16)
        return (dl * q).reshape(n, QK_K)

    @classmethod
    def quantize_blocks(cls, x, weights):
        d, sc, q = kquants.quantize_q3_k(x, weights)  # q in -4..3
        out = np.empty(len(x), cls.layout)
        u = (q + 4).astype(np.uint8)
        out["hmask"] = _pack_bit_planes(u >> 2)
        out["qs"] = _pack_two_bit_planes(u & 3)
        out["scales"] = pack_q3_k_scales(sc)
        out["d"] = d
        return out


class Q4_K(BlockFormat):
    qtype = QType.Q4_K
    layout = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])

    @classmethod
    def dequantize_blocks(cls, b):
        n = len(b)
        sc, mn = unpack_k_scales(b["scales"])
        dl = (_f32(b["d"])[:, None] * _f32(sc))[:, :, None]  # [n, 8, 1]
        ml = (_f32(b["dmin"])[:, None] * _f32(mn))[:, :, None]
        return (dl * _f32(_k_nibbles(b["qs"])) - ml).reshape(n, QK_K)

    @classmethod
    def quantize_blocks(cls, x, weights):
        d, dmin, sc, mn, q = kquants.quantize_q4_k(x, weights)
        out = np.empty(len(x), cls.layout)
        out["d"], out["dmin"], out["scales"] = d, dmin, pack_k_scales(sc, mn)
        out["qs"] = _pack_k_nibbles(q)
        return out


class Q5_K(BlockFormat):
    qtype = QType.Q5_K
    layout = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                       ("qs", "u1", 128)])

    @classmethod
    def dequantize_blocks(cls, b):
        n = len(b)
        sc, mn = unpack_k_scales(b["scales"])
        dl = (_f32(b["d"])[:, None] * _f32(sc))[:, :, None]
        ml = (_f32(b["dmin"])[:, None] * _f32(mn))[:, :, None]
        high = _bit_planes(b["qh"], 8).reshape(n, 8, 32) << 4
        return (dl * _f32(_k_nibbles(b["qs"]) | high) - ml).reshape(n, QK_K)

    @classmethod
    def quantize_blocks(cls, x, weights):
        d, dmin, sc, mn, q = kquants.quantize_q5_k(x, weights)
        out = np.empty(len(x), cls.layout)
        out["d"], out["dmin"], out["scales"] = d, dmin, pack_k_scales(sc, mn)
        q = q.astype(np.uint8)
        out["qh"] = _pack_bit_planes(q >> 4)
        out["qs"] = _pack_k_nibbles(q & 0x0F)
        return out


class Q6_K(BlockFormat):
    qtype = QType.Q6_K
    layout = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])

    @classmethod
    def dequantize_blocks(cls, b):
        n = len(b)
        dl = (_f32(b["d"])[:, None] * _f32(b["scales"]))[:, :, None]  # [n, 16, 1]
        return (dl * _f32(q6_k_codes(b) - 32).reshape(n, 16, 16)).reshape(n, QK_K)

    @classmethod
    def quantize_blocks(cls, x, weights):
        d, sc, q = kquants.quantize_q6_k(x, weights)  # q in -32..31
        out = np.empty(len(x), cls.layout)
        u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, half, quarter, 32]
        out["ql"] = np.concatenate([u[:, :, 0] & 0x0F | (u[:, :, 2] & 0x0F) << 4,
                                    u[:, :, 1] & 0x0F | (u[:, :, 3] & 0x0F) << 4], axis=2).reshape(-1, 128)
        high = u >> 4
        high = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
        out["qh"] = high.reshape(-1, 64)
        out["scales"], out["d"] = sc, d
        return out


def q6_k_codes(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks -> int16 [n, 256] unsigned 6-bit codes (0..63)."""
    n = len(b)
    ql = b["ql"].reshape(n, 2, 64)  # per 128-element half
    qh = b["qh"].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    first, second = ql[:, :, :32], ql[:, :, 32:]
    low = np.stack([first & 0x0F, second & 0x0F, first >> 4, second >> 4], axis=2)
    return (low | ((qh & 3) << 4)).reshape(n, QK_K).astype(np.int16)


class Q8_K(BlockFormat):
    """Activations for k-quant dot products: float scale, int8 codes, sums of each 16."""

    qtype = QType.Q8_K
    layout = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])

    @classmethod
    def dequantize_blocks(cls, b):
        return b["d"][:, None] * _f32(b["qs"])

    @classmethod
    def quantize_blocks(cls, x, weights):
        # ggml: the signed value of largest magnitude maps to -127, rounding to nearest even.
        maxv = _absmax_signed(x)
        with np.errstate(divide="ignore"):
            iscale = np.where(maxv == 0, np.float32(0), np.float32(-127) / maxv).astype(np.float32)
        q = np.minimum(127, np.rint(x * iscale[:, None])).astype(np.int8)
        out = np.empty(len(x), cls.layout)
        out["qs"] = q
        out["bsums"] = q.reshape(-1, 16, 16).sum(axis=2, dtype=np.int16)
        out["d"] = _safe_inverse(iscale)
        return out


FORMATS: dict[QType, type[BlockFormat]] = {
    cls.qtype: cls
    for cls in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)
}

# The layout is the byte format, so it must add up to ggml's block size. Q8_1 is exempt: it only
# exists in memory as an activation format, and gguf-py still lists its old 40-byte float layout.
for _cls in FORMATS.values():
    assert _cls.qtype == QType.Q8_1 or _cls.layout.itemsize == type_size(_cls.qtype), _cls.__name__


def dequantize(raw: np.ndarray, qtype: QType) -> np.ndarray:
    return FORMATS[qtype].dequantize(raw)


def quantize(x: np.ndarray, qtype: QType, importance: np.ndarray | None = None) -> np.ndarray:
    return FORMATS[qtype].quantize(x, importance)
