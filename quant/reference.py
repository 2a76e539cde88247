"""Float64 emulation of the CPU matmul's arithmetic: the oracle for kernel tests and benchmarks.

Weights are dequantized exactly (numpy reference), activations are quantized exactly as the
kernels do (`quant.activations`), and the product is taken in float64. The kernels differ from
this only by float32 rounding of block sums, so agreement is expected within ~1e-5 relative.
"""

from __future__ import annotations

import numpy as np

from llmx.quant import activations
from llmx.quant.formats import FORMATS, dequantize
from llmx.quant.qtypes import QType

_QUANTIZE_ACTIVATIONS = {
    QType.Q8_0: activations.quantize_q8_0,
    QType.Q8_1: activations.quantize_q8_1,
    QType.Q8_K: activations.quantize_q8_k,
}


def quantized_activations(x: np.ndarray, qtype: QType) -> np.ndarray:
    """x as the kernels see it: quantized to the paired activation type, or rounded to F16/BF16."""
    x = np.asarray(x, np.float32)
    if qtype == QType.F32:
        return x.astype(np.float64)
    if qtype in (QType.F16, QType.BF16):
        from llmx.quant.formats import quantize

        return dequantize(quantize(x, qtype), qtype).astype(np.float64)
    codes, scales, *_ = _QUANTIZE_ACTIVATIONS[activations.ACTIVATION_TYPE[qtype]](x)
    return activations.dequantize_activations(codes, scales)


def matmul_reference(x: np.ndarray, w: np.ndarray, qtype: QType) -> np.ndarray:
    """float64 [n_tok, m]."""
    weights = dequantize(w, qtype).astype(np.float64)  # [m, k]
    if activations.ACTIVATION_TYPE.get(qtype) != QType.Q8_1:
        return quantized_activations(x, qtype) @ weights.T
    # Q4_1/Q5_1: sum d*u*dx*q over the block, plus min * s with Q8_1's float16-rounded s.
    codes, scales, sums = activations.quantize_q8_1(np.asarray(x, np.float32))
    mins = FORMATS[qtype].blocks(w)["m"].astype(np.float64).reshape(w.shape[0], -1)  # [m, nb]
    scaled = weights - np.repeat(mins, 32, axis=1)
    return activations.dequantize_activations(codes, scales) @ scaled.T + sums.astype(np.float64) @ mins.T


def repacked_q4_0_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32 [n_tok, m]: llama.cpp's repacked Q4_0 kernels (`ggml_gemm_q4_0_8x8_q8_0`) step by step.
    Per (token, row), over the blocks in order: acc = fma(float(integer block dot), float32(dw * dx), acc).
    The fma is taken in float64, where the product is exact, then rounded to float32: one float32
    rounding of the exact value unless the float64 sum itself rounds onto a float32 tie (rare)."""
    m = w.shape[0]
    blocks = FORMATS[QType.Q4_0].blocks(w).reshape(m, -1)  # [m, nb]
    qs = blocks["qs"].astype(np.int64)  # [m, nb, 16]: value j in the low nibble of byte j, j + 16 in the high
    codes_w = np.concatenate([qs & 0x0F, qs >> 4], axis=2) - 8  # [m, nb, 32]
    codes, scales = activations.quantize_q8_0(np.asarray(x, np.float32))
    codes_x = codes.reshape(len(x), -1, 32).astype(np.int64)  # [n_tok, nb, 32]
    acc = np.zeros((len(x), m), np.float32)
    for b in range(blocks.shape[1]):
        dots = (codes_x[:, b] @ codes_w[:, b].T).astype(np.float64)  # [n_tok, m], exact
        scale = (blocks["d"][:, b].astype(np.float32)[None, :] * scales[:, b, None]).astype(np.float64)
        acc = (dots * scale + acc).astype(np.float32)
    return acc
