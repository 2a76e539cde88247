"""How llama.cpp's CPU backend quantizes activations before a quantized matmul (numpy reference).

The pairing (ggml's `vec_dot_type`): Q4_0/Q5_0/Q8_0 weights take Q8_0 activations, Q4_1/Q5_1
take Q8_1, the k-quants take Q8_K. On x86 the Q8_0/Q8_1 activation quantizers are the SIMD ones,
which differ from the reference weight quantizer: the inverse scale is 127/amax (not 1/d) and
rounding is to nearest even (not away from zero). Q8_K uses its reference quantizer.

Every function returns plain arrays, per token row:
codes int8 [n, k]; scales float32 [n, k / block] (already rounded through float16 where ggml
stores a float16); and `sums`: Q8_1's s = d * sum(codes) rounded to float16 [n, k / 32], Q8_K's
sums of each 16 codes int32 [n, k / 16].
"""

from __future__ import annotations

import numpy as np

from llmx.quant.qtypes import QType

# Weight type -> activation type, as ggml's type_traits_cpu vec_dot_type.
ACTIVATION_TYPE = {
    QType.Q8_0: QType.Q8_0, QType.Q4_0: QType.Q8_0, QType.Q5_0: QType.Q8_0, QType.IQ4_NL: QType.Q8_0,
    QType.Q4_1: QType.Q8_1, QType.Q5_1: QType.Q8_1,
    QType.Q2_K: QType.Q8_K, QType.Q3_K: QType.Q8_K, QType.Q4_K: QType.Q8_K,
    QType.Q5_K: QType.Q8_K, QType.Q6_K: QType.Q8_K,
}


def _q8_blocks(x: np.ndarray):
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=2)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.rint(blocks * inv[:, :, None]).astype(np.int8)
    return codes, d.astype(np.float32)


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, d = _q8_blocks(np.asarray(x, np.float32))
    return codes.reshape(x.shape), d.astype(np.float16).astype(np.float32)


def quantize_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes, d = _q8_blocks(np.asarray(x, np.float32))
    sums = (d * codes.sum(axis=2, dtype=np.int32).astype(np.float32)).astype(np.float16).astype(np.float32)
    return codes.reshape(x.shape), d.astype(np.float16).astype(np.float32), sums


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = np.asarray(x, np.float32).reshape(x.shape[0], -1, 256)
    maxv = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(maxv != 0, np.float32(-127) / maxv, np.float32(0)).astype(np.float32)
        d = np.where(maxv != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    codes = np.minimum(127, np.rint(blocks * iscale[:, :, None])).astype(np.int8)
    sums = codes.reshape(x.shape[0], -1, 16).sum(axis=2, dtype=np.int32)
    return codes.reshape(x.shape), d, sums


def dequantize_activations(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes * scale per block, float64 (for exact emulation of the integer dot products)."""
    n, k = codes.shape
    block = k // scales.shape[1]
    return (codes.reshape(n, -1, block).astype(np.float64) * scales[:, :, None]).reshape(n, k)
