"""Speculative decoding: prompt lookup and a draft model give the target's own output, exactly at
temperature 0 and in distribution above it."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
from conftest import MODELS_DIR, REPO, require_reference, run_llmx

import llmx
from llmx.engine.model import Model
from llmx.engine.speculative import Pacing, accept_greedy, accept_rejection, ngram_lookup
from llmx.errors import UsageError


def chi_square_p_value(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test, cells with expected counts under 5 pooled into one; the p-value from the
    Wilson-Hilferty normal approximation of the chi-square distribution."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat, df = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


# -- the rules, without a model --------------------------------------------------------------------


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_lookup(tokens, 3, max_n=4, min_n=2) == [7, 8, 5]  # "2 3" last seen before "7 8 5"
    assert ngram_lookup([4, 1, 2, 3, 5, 6, 0, 2, 3, 8, 1, 2, 3], 2, max_n=3, min_n=2) == [5, 6]  # "1 2 3" beats "2 3"
    assert ngram_lookup([1, 2, 3, 4], 3) == [] and ngram_lookup([5, 6, 5, 6], 4) == []  # nothing (long enough) repeats
    assert ngram_lookup([5, 6, 5, 6], 4, max_n=2, min_n=2) == [5, 6]  # runs up to the end


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_the_targets_next_token():
    targets = [7, 8, 9, 4, 5]
    assert accept_greedy(4, [7, 8, 1], lambda i, out: targets[i]) == [7, 8, 9]
    assert accept_greedy(4, [7, 8, 9], lambda i, out: targets[i]) == [7, 8, 9, 4]
    assert accept_greedy(1, [], lambda i, out: targets[i]) == [7]


def test_rejection_sampling_draws_from_the_target_whatever_the_draft():
    """p and q far apart: the accepted-or-resampled token must follow p, not q (4,000 draws)."""
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    q = np.array([0.05, 0.05, 0.1, 0.2, 0.6])
    firsts = []
    for _ in range(4000):
        x = int(rng.choice(5, p=q))
        firsts.append(accept_rejection([p, p], [x], [q], rng)[0])
    counts = np.bincount(firsts, minlength=5)
    assert counts[4] == 0  # the draft's favourite has no target probability
    assert chi_square_p_value(counts, 4000 * p) > 0.01
    # and the draft's own distribution is clearly rejected by the same test
    assert chi_square_p_value(counts, 4000 * q) < 1e-6


def test_pacing_shrinks_and_grows_the_proposals_and_pauses_after_failures():
    pacing = Pacing(limit=6)
    assert pacing.size == 3  # a small start
    pacing.record(3, 3)  # accepted whole: two more, up to the limit
    pacing.record(5, 5)
    assert pacing.size == 6
    pacing.record(6, 2)  # accepted in part: one fewer, no pause
    assert pacing.size == 5 and pacing.ready()
    pacing.record(5, 5)
    assert pacing.size == 6
    pacing.record(6, 0)  # accepted none: a pause of 1, then 2, 4 (at most `longest`)
    assert [pacing.ready() for _ in range(2)] == [False, True]
    pacing.record(5, 0)
    pacing.record(4, 0)
    assert pacing.skip == 4 and pacing.size == 3
    pacing.shadow = 11
    pacing.check_shadow(11)  # the model wrote what a paused proposal offered: the pause halves
    assert pacing.skip == 2 and pacing.wait <= 2
    pacing.record(3, 1)
    assert pacing.skip == 0 and pacing.size == 2


# -- on models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    require_reference()
    target = Model(MODELS_DIR / "tiny-llama-f16.gguf", threads=1)
    quantized = Model(MODELS_DIR / "tiny-llama-q2_k.gguf", threads=1, compute=target.compute)
    return target, quantized


def generate(model, prompts, speculative=None, **kw):
    with llmx.Engine(model, speculative=speculative, kv_cache_tokens=8192) as engine:
        engine.check_invariants = True
        requests = [engine.submit(p, **kw) for p in prompts]
        for r in requests:
            assert r.wait(120)
        return requests, engine.stats()


TINY_PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3, 4, 5, 6, 7,", "a b a b a b a b"]


@pytest.mark.parametrize("draft", ["itself", "q2_k", "ngram"])
def test_temperature_0_speculation_gives_the_targets_tokens_and_logits(tiny, draft):
    target, quantized = tiny
    spec = ({"method": "ngram", "k": 4} if draft == "ngram" else
            {"method": "draft", "model": target if draft == "itself" else quantized, "k": 4})
    plain, _ = generate(target, TINY_PROMPTS, max_tokens=48, temperature=0.0, keep_logits=True)
    fast, stats = generate(target, TINY_PROMPTS, spec, max_tokens=48, temperature=0.0, keep_logits=True)
    for a, b in zip(plain, fast, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert all(np.array_equal(x, y) for x, y in zip(a.step_logits, b.step_logits, strict=True))
    assert stats["draft_tokens"] > 0
    if draft == "itself":  # a draft that is the target is always right
        assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_step"] > 4.5  # (k + 1, less at max_tokens)


def test_temperature_1_draft_model_samples_the_targets_distribution(tiny):
    """The first token, verified against a quantized draft that disagrees most of the time,
    follows the target's softmax over 4,000 seeds (chi-square)."""
    target, quantized = tiny
    prompt = target.tokenize("Once upon a time")
    probs = np.exp(target.logits(prompt)[-1].astype(np.float64))
    probs /= probs.sum()
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    with llmx.Engine(target, speculative={"method": "draft", "model": quantized, "k": 2}, kv_cache_tokens=8192) as eng:
        requests = [eng.submit(prompt, max_tokens=3, seed=seed, **sampling) for seed in range(4000)]
        for r in requests:
            assert r.wait(300)
        stats = eng.stats()
    assert stats["spec_steps"] >= 4000 and 0 < stats["acceptance_rate"] < 0.9  # the draft is often wrong
    (eos,) = target.tokenizer.vocab.eog_ids()  # sampled but not kept: a request that ends at once drew it
    counts = Counter(r.token_ids[0] if r.token_ids else eos for r in requests)
    observed = np.array([counts.get(t, 0) for t in range(len(probs))], np.float64)
    assert observed.sum() == 4000
    assert chi_square_p_value(observed, 4000 * probs) > 0.01


def test_a_draft_with_another_vocabulary_is_refused_at_load(tiny, gemma_path):
    target, _ = tiny
    other = Model(gemma_path, threads=1)
    with pytest.raises(UsageError, match="vocabulary"):
        llmx.Engine(target, speculative={"method": "draft", "model": other})
    with pytest.raises(UsageError, match="unknown"):
        llmx.Engine(target, speculative={"method": "medusa"})
    with pytest.raises(UsageError, match="k must be"):
        llmx.Engine(target, speculative={"method": "ngram", "k": 0})


@pytest.mark.slow
def test_prompt_lookup_on_gemma_gives_plain_decodings_tokens(gemma_path):
    """An input-grounded task (rewrite a function with type hints) at temperature 0, alone and
    beside other requests: the same tokens as plain decoding, and most proposals accepted."""
    require_reference()
    model = Model(gemma_path, threads=2)
    source = (REPO / "engine" / "speculative.py").read_text(encoding="utf-8")
    fence = "```python\n"
    rewrite = "Rewrite this code with type hints:\n\n" + fence + source[:2500] + "```\n\nWith type hints:\n\n" + fence
    prompts = [rewrite,
               "The weather today is", "Text:\n" + source[:800] + "\n\nText:\n" + source[:800] + "\n\nText:\n"]
    plain, _ = generate(model, prompts, max_tokens=64, temperature=0.0)
    fast, stats = generate(model, prompts, {"method": "ngram", "k": 7}, max_tokens=64, temperature=0.0)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert stats["tokens_per_step"] > 2.5


@pytest.mark.slow
def test_llmx_run_lookup_and_draft_print_the_plain_text_and_the_acceptance(tiny):
    require_reference()
    target = str(MODELS_DIR / "tiny-llama-f16.gguf")
    common = ["run", target, "a b a b a b a b a b", "-n", "30", "--temp", "0", "--no-server"]
    plain = run_llmx(*common)
    assert plain.returncode == 0, plain.stderr
    for flags in (["--lookup", "5"], ["--draft", str(MODELS_DIR / "tiny-llama-q8_0.gguf"), "--draft-max", "3"]):
        fast = run_llmx(*common, *flags, "--verbose")
        assert fast.returncode == 0 and fast.stdout == plain.stdout, fast.stderr
        assert re.search(rb"speculative \((ngram|draft)\): \d+ of \d+ proposed tokens accepted", fast.stderr)
    both = run_llmx(*common, "--lookup", "3", "--draft", target)
    assert both.returncode == 2 and b"pick one" in both.stderr
