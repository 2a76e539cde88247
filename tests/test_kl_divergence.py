"""`llmx perplexity --kl-divergence-base / --kl-divergence` on the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS_DIR, REFERENCE_DIR, needs_reference, run_llmx

from llmx.engine.model import Model

pytestmark = needs_reference  # the tiny models and llama.cpp's outputs in ../shared

TEXT = str(REFERENCE_DIR / "gpl-3.txt")
CTX, CHUNKS = 64, 3


def model_file(stem: str) -> str:
    return str(MODELS_DIR / f"tiny-llama-{stem}.gguf")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kld") / "f16.kld"
    result = run_llmx("perplexity", model_file("f16"), "-f", TEXT, "-c", str(CTX), "--chunks", str(CHUNKS),
                      "--kl-divergence-base", str(path))
    assert result.returncode == 0, result.stderr
    return path


def summary(stem: str, base_file) -> dict[str, float]:
    result = run_llmx("perplexity", model_file(stem), "--kl-divergence-base", str(base_file), "--kl-divergence")
    assert result.returncode == 0, result.stderr
    values = {}
    for line in result.stdout.decode().splitlines():
        if ":" in line and not line.startswith("="):
            name, value = line.split(":", 1)
            values[name.strip()] = float(value.split()[0].rstrip("%"))
    return values


def test_a_model_against_itself_is_zero(base_file):
    stats = summary("f16", base_file)
    assert stats["Mean    KLD"] == 0.0 and stats["Maximum KLD"] == 0.0
    assert stats["Same top p"] == 100.0 and stats["Mean PPL(Q)/PPL(base)"] == 1.0


def test_mean_kld_matches_a_direct_computation(base_file):
    """Recompute KLD(f16 || q4_0) from both models' logits over llama-perplexity's chunks."""
    base, quant = Model(model_file("f16")), Model(model_file("q4_0"))
    tokens = base.tokenize(Path(TEXT).read_text(encoding="utf-8"), add_bos=False)
    klds = []
    for c in range(CHUNKS):
        ids = [base.tokenizer.vocab.bos_id] + tokens[c * CTX + 1 : (c + 1) * CTX]
        p_log, q_log = (np.log(softmax(m.logits(ids)[CTX // 2 : CTX - 1])) for m in (base, quant))
        klds.extend((np.exp(p_log) * (p_log - q_log)).sum(axis=1))
    stats = summary("q4_0", base_file)
    assert stats["Mean    KLD"] == pytest.approx(np.mean(klds), rel=0.01, abs=1e-5)
    assert stats["Mean    KLD"] > 0.001


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_coarser_quantization_diverges_more(base_file):
    assert summary("q8_0", base_file)["Mean    KLD"] < summary("q2_k", base_file)["Mean    KLD"]


def test_kl_errors_are_one_line(tmp_path, base_file):
    no_base = run_llmx("perplexity", model_file("f16"), "--kl-divergence")
    assert no_base.returncode == 2 and b"--kl-divergence-base" in no_base.stderr
    junk = tmp_path / "junk.kld"
    junk.write_bytes(b"not a base file at all")
    bad = run_llmx("perplexity", model_file("f16"), "--kl-divergence-base", str(junk), "--kl-divergence")
    assert bad.returncode == 1 and len(bad.stderr.decode().strip().splitlines()) == 1
    cut = tmp_path / "cut.kld"
    cut.write_bytes(base_file.read_bytes()[:-100])
    truncated = run_llmx("perplexity", model_file("f16"), "--kl-divergence-base", str(cut), "--kl-divergence")
    assert truncated.returncode == 1 and b"truncated" in truncated.stderr


def test_a_failed_run_leaves_no_base_file(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short for one chunk")
    target = tmp_path / "base.kld"
    result = run_llmx("perplexity", model_file("f16"), "-f", str(short), "-c", "64",
                      "--kl-divergence-base", str(target))
    assert result.returncode == 1
    assert list(tmp_path.iterdir()) == [short]
