"""`llmx quantize` against llama.cpp's own quantized tiny models, and its safety rules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import MODELS_DIR, REFERENCE_DIR, needs_reference, run_llmx

from llmx.engine.archs import config_from_gguf
from llmx.engine.kv_cache import KVCache
from llmx.engine.transformer import Transformer
from llmx.formats.gguf_file import GGUFFile
from llmx.quant.qtypes import QType

pytestmark = needs_reference  # the tiny models and llama.cpp's outputs in ../shared
SOURCE = MODELS_DIR / "tiny-llama-f16.gguf"
MIXES = [("llama", m) for m in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")]
MIXES += [(arch, m) for arch in ("qwen2", "qwen3", "gemma3") for m in ("q8_0", "q4_k_m")]


@pytest.fixture(scope="module")
def tiny_logits():
    return np.load(REFERENCE_DIR / "tiny_logits.npz")


@pytest.mark.parametrize(("arch", "mix"), MIXES)
def test_quantized_tiny_models_match_llama_cpp(arch, mix, tmp_path, reference, tiny_logits):
    """Same tensor order, types, metadata and bytes as llama.cpp's quantizer wrote (k-quants
    included: their float32 searches are reproduced operation by operation)."""
    out = tmp_path / f"{mix}.gguf"
    result = run_llmx("quantize", str(MODELS_DIR / f"tiny-{arch}-f16.gguf"), str(out),
                      mix.upper() if mix.endswith("0") else mix)
    assert result.returncode == 0, result.stderr
    ours, theirs = GGUFFile.open(out), GGUFFile.open(MODELS_DIR / f"tiny-{arch}-{mix}.gguf")
    assert list(ours.tensors) == list(theirs.tensors)
    assert {k: str(v) for k, v in ours.metadata.items()} == {k: str(v) for k, v in theirs.metadata.items()}
    for name, expected in theirs.tensors.items():
        got = ours.tensors[name]
        assert got.qtype == expected.qtype, name
        assert np.array_equal(np.asarray(got.data), np.asarray(expected.data)), name
    # the result runs, within the engine issue's tolerance of llama.cpp's logits for its own file
    config = config_from_gguf(ours)
    ids = np.array(reference["tiny"][f"tiny-{arch}-{mix}"]["ids"])
    cache = KVCache(config, len(ids))
    logits = Transformer.from_gguf(ours, config).forward(ids, cache.new_sequence(), cache)
    expected = tiny_logits[f"tiny-{arch}-{mix}"]
    err = np.abs(logits - expected) / expected.std()
    assert err.max() <= 0.25 and err.mean() <= 0.04
    assert (logits.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.85


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "plan.gguf"
    result = run_llmx("quantize", str(SOURCE), str(out), "Q4_K_M", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 31 and lines[-1].startswith("total: 3.88 MiB -> ")
    assert any("blk.2.attn_v.weight" in line and "F16 -> Q6_K" in line for line in lines)
    assert not out.exists()


def test_plain_progress_lines_when_not_a_terminal(tmp_path):
    result = run_llmx("quantize", str(SOURCE), str(tmp_path / "o.gguf"), "q8_0")
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 30 and lines[-1].startswith("[  30/30] blk.2.ffn_up.weight F16 -> Q8_0")


def test_refusals_are_one_line_usage_errors(tmp_path):
    cases = [
        (str(SOURCE), str(SOURCE), "q4_0"),  # OUT == IN
        (str(SOURCE), str(tmp_path / "o.gguf"), "q9_9"),  # unknown type
        (str(MODELS_DIR / "tiny-llama-q4_0.gguf"), str(tmp_path / "o.gguf"), "q8_0"),  # already quantized
        (str(SOURCE), str(tmp_path / "missing-dir" / "o.gguf"), "q8_0"),
    ]
    for args in cases:
        result = run_llmx("quantize", *args)
        assert result.returncode == 2, args
        assert len(result.stderr.decode().strip().splitlines()) == 1, args
    assert list(tmp_path.iterdir()) == []


def test_requantize_when_allowed(tmp_path):
    out = tmp_path / "re.gguf"
    result = run_llmx("quantize", str(MODELS_DIR / "tiny-llama-q8_0.gguf"), str(out), "q4_0", "--allow-requantize")
    assert result.returncode == 0, result.stderr
    assert b"quality drops" in result.stderr
    assert GGUFFile.open(out).tensors["blk.0.attn_q.weight"].qtype == QType.Q4_0


@pytest.mark.slow
def test_sigint_leaves_no_output(gemma_path, tmp_path):
    out = tmp_path / "out.gguf"
    # to F16: the second tensor, the 168M-value token embedding, takes seconds to convert and write
    proc = subprocess.Popen([sys.executable, "-m", "llmx.cli.main", "quantize", str(gemma_path), str(out), "F16",
                             "--allow-requantize", "-t", "1"], stderr=subprocess.PIPE, env=os.environ.copy())
    assert b"quality drops" in proc.stderr.readline()
    first = proc.stderr.readline()  # the first tensor is written: the output file is under way
    assert first.startswith(b"[   1/236] output_norm.weight"), first
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert b"interrupted" in rest and b"Traceback" not in rest
    assert list(tmp_path.iterdir()) == []
