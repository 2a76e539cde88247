"""`llmx imatrix` and `llmx quantize --imatrix` on the tiny llama."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import MODELS_DIR, REFERENCE_DIR, needs_reference, run_llmx

from llmx.formats.gguf_file import GGUFFile
from llmx.formats.tokenizer import Tokenizer
from llmx.quant.formats import dequantize

pytestmark = needs_reference  # the tiny models and llama.cpp's outputs in ../shared

SOURCE = MODELS_DIR / "tiny-llama-f16.gguf"
TEXT = REFERENCE_DIR / "gpl-3.txt"
CTX, CHUNKS = 64, 2


@pytest.fixture(scope="module")
def imatrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    result = run_llmx("imatrix", str(SOURCE), "-f", str(TEXT), "-c", str(CTX), "--chunks", str(CHUNKS), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def entries(path) -> dict[str, tuple[np.ndarray, float]]:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return {name.removesuffix(".in_sum2"): (data.reshape(-1), float(tensors[name.replace("in_sum2", "counts")][0, 0]))
            for name, data in tensors.items() if name.endswith(".in_sum2")}


def test_imatrix_is_gguf_in_llama_cpp_layout(imatrix):
    reader = gguf.GGUFReader(imatrix)
    fields = {name: reader.fields[name].contents() for name in ("general.type", "imatrix.chunk_count",
                                                                "imatrix.chunk_size", "imatrix.datasets")}
    assert fields == {"general.type": "imatrix", "imatrix.chunk_count": CHUNKS, "imatrix.chunk_size": CTX,
                      "imatrix.datasets": ["gpl-3.txt"]}
    table = entries(imatrix)
    assert len(table) == 21 and "output.weight" not in table  # 3 layers x 7 matmuls, output skipped
    assert all(count == CHUNKS * CTX for _, count in table.values())


def test_matmuls_sharing_an_input_share_their_entry(imatrix):
    table = entries(imatrix)
    for layer in range(3):
        q, k, v = (table[f"blk.{layer}.attn_{n}.weight"][0] for n in "qkv")
        assert np.array_equal(q, k) and np.array_equal(q, v)
        assert np.array_equal(table[f"blk.{layer}.ffn_gate.weight"][0], table[f"blk.{layer}.ffn_up.weight"][0])


def test_first_layer_entry_equals_a_direct_computation(imatrix):
    """attn_q's input in layer 0 is the RMS-normed token embedding: recompute its sum of squares."""
    model = GGUFFile.open(SOURCE)
    tokens = Tokenizer.from_gguf(model).tokenize(TEXT.read_text(encoding="utf-8"), add_bos=False)
    bos = model.get("tokenizer.ggml.bos_token_id")
    ids = np.concatenate([[bos] + tokens[c * CTX + 1:(c + 1) * CTX] for c in range(CHUNKS)])
    x = model.tensors["token_embd.weight"].data[ids].astype(np.float64)
    eps = model.get("llama.attention.layer_norm_rms_epsilon")
    normed = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * model.tensors["blk.0.attn_norm.weight"].data
    expected = (normed * normed).sum(axis=0)
    np.testing.assert_allclose(entries(imatrix)["blk.0.attn_q.weight"][0], expected, rtol=1e-4)


@pytest.mark.parametrize("mix", ["Q2_K", "Q4_0", "Q4_K_M"])
def test_imatrix_lowers_the_weighted_error(imatrix, tmp_path, mix):
    plain, steered = tmp_path / "plain.gguf", tmp_path / "steered.gguf"
    assert run_llmx("quantize", str(SOURCE), str(plain), mix).returncode == 0
    result = run_llmx("quantize", str(SOURCE), str(steered), mix, "--imatrix", str(imatrix))
    assert result.returncode == 0, result.stderr
    base, a, b = GGUFFile.open(SOURCE), GGUFFile.open(plain), GGUFFile.open(steered)
    assert b.get("quantize.imatrix.entries_count") == 21 and b.get("quantize.imatrix.chunks_count") == CHUNKS
    importance = {name: sums / count for name, (sums, count) in entries(imatrix).items()}
    errors = np.zeros(2)
    for name, weights in importance.items():
        w = base.tensors[name].data.astype(np.float32)
        for i, f in enumerate((a, b)):
            t = f.tensors[name]
            errors[i] += (weights * (dequantize(np.asarray(t.data), t.qtype) - w) ** 2).sum()
    assert errors[1] < errors[0]


def test_an_imatrix_for_another_model_is_refused(imatrix, tmp_path):
    out = tmp_path / "o.gguf"
    other = MODELS_DIR / "tiny-gemma3-f16.gguf"  # same tensor names as tiny llama, some of other widths
    result = run_llmx("quantize", str(other), str(out), "Q4_K_M", "--imatrix", str(imatrix))
    assert result.returncode == 2 and b"another model" in result.stderr
    assert list(tmp_path.iterdir()) == []
