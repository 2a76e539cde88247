"""`matmul(x, w, qtype)`: the one entry point the model uses for CPU matmuls, any weight type."""

from __future__ import annotations

import numba
import numpy as np

from llmx.quant.cpu import activations, kmatmul, kpacked, lanematmul, pairmatmul, repacked
from llmx.quant.cpu import matmul as kernels
from llmx.quant.cpu.simd import AVX2, CHUNK_ORDER, VNNI, has_avx512_pairs, host_isa
from llmx.quant.qtypes import QType

# weight type -> (activation quantizer, kernel)
_INTEGER = {
    QType.Q8_0: (activations.quantize_q8_0, kernels.matmul_q8_0),
    QType.Q4_0: (activations.quantize_q8_0, kernels.matmul_q4_0),
    QType.Q5_0: (activations.quantize_q8_0, kernels.matmul_q5_0),
    QType.IQ4_NL: (activations.quantize_q8_0, kernels.matmul_iq4_nl),
    QType.Q4_1: (activations.quantize_q8_1, kernels.matmul_q4_1),
    QType.Q5_1: (activations.quantize_q8_1, kernels.matmul_q5_1),
    QType.Q2_K: (activations.quantize_q8_k, kernels.matmul_q2_k),
    QType.Q3_K: (activations.quantize_q8_k, kernels.matmul_q3_k),
    QType.Q4_K: (activations.quantize_q8_k, kernels.matmul_q4_k),
    QType.Q5_K: (activations.quantize_q8_k, kernels.matmul_q5_k),
    QType.Q6_K: (activations.quantize_q8_k, kernels.matmul_q6_k),
}
# weight types whose kernels dot the stored unsigned codes, and the offset to take back
_CODE_OFFSET = {QType.Q4_0: 8, QType.Q5_0: 16}
# k-quant weight type -> kernel for several tokens (rows decoded once; see `kmatmul`)
_DECODE_ONCE = {
    QType.Q2_K: kmatmul.kmatmul_q2_k,
    QType.Q3_K: kmatmul.kmatmul_q3_k,
    QType.Q4_K: kmatmul.kmatmul_q4_k,
    QType.Q5_K: kmatmul.kmatmul_q5_k,
    QType.Q6_K: kmatmul.kmatmul_q6_k,
}
DECODE_ONCE_MIN_TOKENS = 2  # from two tokens on, decoding each row once beats decoding it per token
# ... and on AVX-512, two tokens per register (`kmatmul.pair_kmatmul_*`), from two pairs on
_DECODE_ONCE_PAIRED = {
    QType.Q2_K: kmatmul.pair_kmatmul_q2_k,
    QType.Q3_K: kmatmul.pair_kmatmul_q3_k,
    QType.Q4_K: kmatmul.pair_kmatmul_q4_k,
    QType.Q5_K: kmatmul.pair_kmatmul_q5_k,
    QType.Q6_K: kmatmul.pair_kmatmul_q6_k,
}
# weight type -> kernel for several tokens on AVX-512 (two tokens per register; see `pairmatmul`)
_PAIRED = {QType.Q8_0: pairmatmul.pairmatmul_q8_0, QType.Q4_0: pairmatmul.pairmatmul_q4_0,
           QType.Q5_0: pairmatmul.pairmatmul_q5_0}
PAIRED_MIN_TOKENS = 2  # Q8_0/Q4_0/Q5_0
# ... and 16 tokens per register (`lanematmul`) for each whole group of 16 tokens, in rows of at
# least 1024 values. On shorter rows (measured, 2 threads) it is 0-19% faster at 16 tokens but 0-16%
# slower at 33 (the lone 33rd token costs a whole pair pass) and mixed at 128: not yet worth it there.
TOKEN_LANES_MIN_K = 1024
_TOKEN_LANES = {QType.Q8_0: lanematmul.lanematmul_q8_0, QType.Q4_0: lanematmul.lanematmul_q4_0,
                QType.Q5_0: lanematmul.lanematmul_q5_0}
PAIRED_K_MIN_TOKENS = 4  # k-quants
# weight type -> (how ggml rounds the activations first, kernel)
_FLOAT = {
    QType.F32: (None, kernels.matmul_f32),
    QType.F16: (activations.round_to_f16, kernels.matmul_f16),
    QType.BF16: (activations.round_to_bf16, kernels.matmul_bf16),
}
SUPPORTED = frozenset(_INTEGER) | frozenset(_FLOAT)
_NO_SUMS = np.zeros((1, 1), np.float32)
_CHUNK_ORDER = np.array(CHUNK_ORDER)


def activation_quantizer(qtype: QType):
    """The function that quantizes the activations for a `qtype` weight (None: float weights).
    Weights with the same quantizer can share one `quantize_activations` result."""
    return _INTEGER[qtype][0] if qtype in _INTEGER else None


def quantize_activations(x: np.ndarray, qtype: QType) -> tuple:
    """What `matmul` computes from x first for a `qtype` weight; pass it back as `quantized`."""
    return _INTEGER[qtype][0](np.ascontiguousarray(x, dtype=np.float32))


def pack(w: np.ndarray, qtype: QType) -> np.ndarray | None:
    """The layout a weight matrix is multiplied in when the model loads it, or None for a weight
    that stays as stored. Q4_0 with a multiple of 8 rows is what llama.cpp's CPU backend repacks,
    and takes its float order (`repacked`); Q8_0, Q5_0 (bit planes for the fifth bits), Q4_K and
    Q6_K (`kpacked`) take such layouts too, any row count, for the speed (1.1-3x the row-by-row
    kernels). Which weights the model packs (the embedding table only as a tied Q8_0 output):
    `transformer.will_pack`. Pass the result to `matmul` as `packed`."""
    w = np.ascontiguousarray(w).view(np.uint8)
    if not packable(qtype, len(w)):
        return None
    return repacked.pack_q4_0(w) if qtype == QType.Q4_0 else _PACKERS[qtype](w)


def packable(qtype: QType, rows: int) -> bool:
    """Whether `pack` packs a `qtype` matrix of `rows` rows."""
    return (qtype == QType.Q4_0 and rows % repacked.LLAMA_CPP_ROW_MULTIPLE == 0) or qtype in _PACKERS


# weight type -> its packer (see `pack`); then -> the kernel that multiplies the packed layout
_PACKERS = {QType.Q8_0: repacked.pack_q8_0, QType.Q5_0: repacked.pack_q5_0, QType.Q4_K: kpacked.pack_q4_k,
            QType.Q6_K: kpacked.pack_q6_k}
_PACKED_KERNELS = {QType.Q4_0: repacked.repacked_q4_0, QType.Q5_0: repacked.repacked_q5_0}
PACKED_K_KERNELS = {QType.Q4_K: kpacked.packed_q4_k, QType.Q6_K: kpacked.packed_q6_k}


def matmul(x: np.ndarray, w: np.ndarray, qtype: QType, threads: int | None = None, isa=None,
           quantized: tuple | None = None, packed: np.ndarray | None = None) -> np.ndarray:
    """x float32 [n_tok, k] times W (uint8 [m, row_bytes] in `qtype`'s layout) transposed -> [n_tok, m].

    `threads` sets Numba's thread count for this call; `isa` is `simd.VNNI`, `simd.AVX2` or `simd.PORTABLE`
    (default: the best this CPU has); `quantized`: `quantize_activations(x, t)` for a type t with this
    one's `activation_quantizer`, to quantize x once for several weights; `packed`: `pack(w, qtype)`.
    """
    if packed is not None:
        return matmul_packed(x, packed, qtype, len(w), threads, isa, quantized)
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w).view(np.uint8)
    m, row_bytes = w.shape
    out = np.empty((x.shape[0], m), np.float32)
    if threads is not None:
        numba.set_num_threads(threads)
    if qtype in _FLOAT:
        rounding, kernel = _FLOAT[qtype]
        kernel(x if rounding is None else rounding(x), w.reshape(-1), row_bytes, m, out)
        return out
    if qtype not in _INTEGER:
        raise ValueError(f"no CPU matmul for {QType(qtype).name}")
    quantize, kernel = _INTEGER[qtype]
    codes, scales, *sums = quantize(x) if quantized is None else quantized
    isa = host_isa() if isa is None else isa
    if qtype in _DECODE_ONCE and x.shape[0] >= DECODE_ONCE_MIN_TOKENS:
        n_tok, k = codes.shape
        sums16 = sums[0].astype(np.int16).reshape(-1)
        if n_tok >= PAIRED_K_MIN_TOKENS and isa is VNNI and has_avx512_pairs():
            _paired_k(qtype, codes, scales, sums16, w, out)
            return out
        ordered = codes.reshape(n_tok, k // 32, 32)[:, :, _CHUNK_ORDER].astype(np.int16)  # [n_tok, k / 32, 32]
        _DECODE_ONCE[qtype](ordered.reshape(-1), scales, sums16, w.reshape(-1), row_bytes, m, out, isa)
        return out
    if qtype in _PAIRED and x.shape[0] >= PAIRED_MIN_TOKENS and isa is VNNI and has_avx512_pairs():
        _paired(qtype, codes, scales, w, out)
        return out
    if qtype in _CODE_OFFSET:  # -offset x the activations' sums per 4 values: int32 [n_tok, nb * 8]
        n_tok, k = codes.shape
        sums = [codes.reshape(n_tok, k // 4, 4).sum(axis=2, dtype=np.int32) * np.int32(-_CODE_OFFSET[qtype])]
    if qtype == QType.Q8_0 and np.asarray(isa).dtype == VNNI.dtype:  # activations as x + 128, see the kernel
        codes, kernel = codes.view(np.uint8) ^ np.uint8(0x80), kernels.matmul_q8_0_unsigned
    kernel(codes.reshape(-1), scales, sums[0] if sums else _NO_SUMS, w.reshape(-1), row_bytes, m, out, isa)
    return out


def _paired(qtype: QType, codes: np.ndarray, scales: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """The AVX-512 kernels for Q8_0/Q4_0/Q5_0 (activations as x + 128): whole groups of 16 tokens in
    `lanematmul`'s layout, the rest in `pairmatmul`'s. Both give each output the same bits."""
    n_tok, k = codes.shape
    m, row_bytes = w.shape
    scales = scales.reshape(n_tok, k // 32)
    grouped = n_tok - n_tok % lanematmul.TOKENS if k >= TOKEN_LANES_MIN_K else 0
    if grouped:
        xt, xd = lanematmul.token_lanes(codes[:grouped], scales[:grouped])
        _TOKEN_LANES[qtype](xt, xd, w.reshape(-1), row_bytes, m, grouped, out[:grouped].reshape(-1))
    if grouped < n_tok:
        _pairs(qtype, codes[grouped:], scales[grouped:], w, out[grouped:])


def _pairs(qtype: QType, codes: np.ndarray, scales: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    n_tok, k = codes.shape
    # each scale 8 times, as the kernel multiplies it: a load there, not a shuffle on a busy port
    xd = pairmatmul.pair_layout(np.repeat(scales.reshape(n_tok, k // 32, 1), 8, axis=2))
    m, row_bytes = w.shape
    _PAIRED[qtype](pairmatmul.q8_0_pairs(codes), xd, w.reshape(-1), row_bytes, m, n_tok, out)


def _paired_k(qtype: QType, codes: np.ndarray, scales: np.ndarray, sums16: np.ndarray, w: np.ndarray,
              out: np.ndarray) -> None:
    """The AVX-512 kernel for k-quants: Q8_K activations (int16, CHUNK_ORDER), their scales and sums
    per 16 values, each in `kmatmul`'s pair layout."""
    n_tok = codes.shape[0]
    xdp = pairmatmul.pair_layout(scales.reshape(*scales.shape, 1))
    sums16p = pairmatmul.pair_layout(sums16.reshape(n_tok, -1, 16))
    m, row_bytes = w.shape
    _DECODE_ONCE_PAIRED[qtype](pairmatmul.q8_k_pairs(codes), xdp, scales, sums16p, w.reshape(-1), row_bytes, m, out)


def matmul_packed(x: np.ndarray, packed: np.ndarray, qtype: QType, m: int, threads: int | None = None, isa=None,
                  quantized: tuple | None = None) -> np.ndarray:
    """`matmul` of x float32 [n_tok, k] with the m rows that `pack` made `packed` of -> [n_tok, m]."""
    if threads is not None:
        numba.set_num_threads(threads)
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes, scales, *sums = quantize_activations(x, qtype) if quantized is None else quantized
    n_tok, k = codes.shape
    out = np.empty((n_tok, m), np.float32)
    isa = host_isa() if isa is None else isa
    if qtype in PACKED_K_KERNELS:  # Q8_K activations: one scale per 256 values, sums per 16
        packed_k_kernel(qtype, isa)(codes.reshape(-1), scales.reshape(-1), sums[0].reshape(-1), packed, k // 256,
                                     m, n_tok, out, isa)
    else:
        packed_kernel(qtype, isa)(codes.reshape(-1), scales.reshape(-1), packed, k // 32, m, n_tok, out, isa)
    return out


def packed_k_kernel(qtype: QType, isa):
    """Q4_K/Q6_K's packed kernel for `isa`: on AVX2 Q4_K sums a sub-block's byte products as int16
    and scales them in one `vpmaddwd` (`kpacked.packed_q4_k_words`: 1.13-1.27x, the same bits)."""
    if qtype == QType.Q4_K and np.asarray(isa).dtype == AVX2.dtype:
        return kpacked.packed_q4_k_words
    return PACKED_K_KERNELS[qtype]


def packed_kernel(qtype: QType, isa):
    """Q8_0/Q4_0/Q5_0's packed kernel for `isa`: on VNNI Q8_0 dots its weights as unsigned
    (`repacked_q8_0_vnni`), in tiles of eight tokens with AVX-512's 32 registers."""
    if qtype != QType.Q8_0:
        return _PACKED_KERNELS[qtype]
    if np.asarray(isa).dtype != VNNI.dtype:
        return repacked.repacked_q8_0
    return repacked.repacked_q8_0_vnni_wide if has_avx512_pairs() else repacked.repacked_q8_0_vnni
