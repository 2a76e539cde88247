"""Block formats: dequantize bit-exact with gguf-py, quantize bit-exact or as good as llama.cpp."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import MODELS_DIR, TINY_MODELS, needs_reference
from gguf import quants as gguf_quants

from llmx.formats.gguf_file import GGUFFile
from llmx.quant.cpu.dequantize import dequantize as numba_dequantize
from llmx.quant.formats import FORMATS, dequantize, quantize
from llmx.quant.qtypes import QType, block_size, type_size

pytestmark = needs_reference  # the tiny models and llama.cpp's outputs in ../shared

WEIGHT_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
                QType.IQ4_NL, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]
SIMPLE_QUANTIZERS = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.BF16]
K_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]


def gguf_dequantize(raw: np.ndarray, qtype: QType) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_dequantize_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(9, type_size(qtype) * (512 // block_size(qtype))), dtype=np.uint8)
    expected = gguf_dequantize(raw, qtype)
    with np.errstate(all="ignore"):
        assert same_bits(dequantize(raw, qtype), expected)
    assert same_bits(numba_dequantize(raw, qtype), expected)


def quantized_tensors(path):
    gguf_file = GGUFFile.open(path)
    return [t for t in gguf_file.tensors.values() if t.qtype in WEIGHT_TYPES]


def assert_tensors_dequantize_like_gguf_py(path):
    tensors = quantized_tensors(path)
    assert tensors
    for t in tensors:
        expected = gguf_dequantize(t.data, t.qtype)
        assert same_bits(dequantize(t.data, t.qtype), expected), t.name
        assert same_bits(numba_dequantize(t.data, t.qtype), expected), t.name


@pytest.mark.parametrize("path", TINY_MODELS, ids=lambda p: p.name)
def test_reference_model_tensors_bit_exact(path):
    assert_tensors_dequantize_like_gguf_py(path)


@pytest.mark.slow
def test_default_model_tensors_bit_exact(gemma_path):
    assert_tensors_dequantize_like_gguf_py(gemma_path)


@pytest.mark.parametrize("qtype", SIMPLE_QUANTIZERS, ids=lambda q: q.name)
def test_quantize_bit_exact_with_gguf_py(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((13, 512)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, :40] *= 1000
    x[2, 7] = -x[2, :32].max() * 3  # a negative extreme
    expected = gguf_quants.quantize(x, gguf.GGMLQuantizationType(qtype))
    assert np.array_equal(quantize(x, qtype), expected.view(np.uint8))


def test_f16_quantize_round_trips():
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(dequantize(quantize(x, QType.F16), QType.F16), x.astype(np.float16).astype(np.float32))


def test_layouts_add_up_to_ggml_block_sizes():
    for qtype, cls in FORMATS.items():
        if qtype != QType.Q8_1:  # only ever in memory; see formats.py
            assert cls.layout.itemsize == type_size(qtype)


def llama_cpp_k_quant_cases():
    base = MODELS_DIR / "tiny-llama-f16.gguf"
    for stem in ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"):
        yield pytest.param(base, MODELS_DIR / f"tiny-llama-{stem}.gguf", id=stem)


@pytest.mark.parametrize(("base_path", "quant_path"), list(llama_cpp_k_quant_cases()))
def test_k_quants_bit_identical_to_llama_cpp(base_path, quant_path):
    """llama.cpp's float32 scale searches, reproduced operation by operation, give its bytes."""
    base, theirs = GGUFFile.open(base_path), GGUFFile.open(quant_path)
    checked = 0
    for name, t in theirs.tensors.items():
        if t.qtype not in K_TYPES:
            continue
        weights = base.tensors[name].data.astype(np.float32)
        assert np.array_equal(quantize(weights, t.qtype), np.asarray(t.data)), (name, t.qtype.name)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("qtype", [*K_TYPES, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.IQ4_NL],
                         ids=lambda q: q.name)
def test_importance_weights_steer_quantizers(qtype):
    # Columns marked important must come out more accurate than without the weights.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    importance = np.ones(256, np.float32)
    importance[:32] = 1000.0
    plain = dequantize(quantize(x, qtype), qtype)
    steered = dequantize(quantize(x, qtype, importance=importance), qtype)
    err_plain = np.mean((plain - x)[:, :32] ** 2)
    err_steered = np.mean((steered - x)[:, :32] ** 2)
    assert err_steered < err_plain


def test_iq4_nl_codes_are_nearest_table_entries():
    """Each code is the table value nearest x / d for the block's stored scale (ties aside)."""
    from llmx.quant.iquants import VALUES

    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 640)).astype(np.float32)
    blocks = FORMATS[QType.IQ4_NL].blocks(quantize(x, QType.IQ4_NL))
    d = blocks["d"].astype(np.float32)
    codes = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1)  # [n_blocks, 32]
    scaled = x.reshape(-1, 32) / d[:, None]
    nearest = np.abs(scaled[:, :, None] - VALUES[None, None, :]).argmin(axis=2)
    assert (codes == nearest).mean() > 0.99
    rmse = np.sqrt(np.mean((dequantize(quantize(x, QType.IQ4_NL), QType.IQ4_NL) - x) ** 2))
    assert rmse < 0.1
