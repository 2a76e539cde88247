"""The continuous-batching engine on the real model: batch invariance, prefix caching,
cancellation, preemption, the q8_0 KV cache, and the API around it."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
from conftest import REFERENCE_DIR, kl_against_llama_cpp, needs_reference, require_reference

import llmx
from llmx.engine.model import Model
from llmx.engine.model_info import describe_model
from llmx.errors import LlmxError, UsageError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return Model(gemma_path, threads=2)


@pytest.fixture(scope="module")
def text_ids(gemma):
    require_reference()
    return gemma.tokenize((REFERENCE_DIR / "gpl-3.txt").read_text(encoding="utf-8"), add_bos=False)


def prompts_of(text_ids: list[int], lengths: list[int], bos: int) -> list[list[int]]:
    """Prompts of the given lengths cut from different places of the text, BOS first."""
    return [[bos] + text_ids[97 * i: 97 * i + n - 1] for i, n in enumerate(lengths)]


def finish_all(requests):
    for r in requests:
        assert r.wait(300), "a request did not finish"
    return requests


def alone(gemma, prompts, max_tokens):
    """Each prompt by itself: an engine with nothing else to run and no prefix cache."""
    with llmx.Engine(gemma, prefix_caching=False) as engine:
        return [finish_all([engine.submit(p, max_tokens=max_tokens, temperature=0.0, keep_logits=True)])[0]
                for p in prompts]


@pytest.fixture(scope="module")
def sixteen(gemma, text_ids):
    lengths = [5, 300, 17, 64, 128, 33, 250, 9, 190, 48, 16, 100, 7, 280, 75, 140]
    prompts = prompts_of(text_ids, lengths, gemma.tokenizer.vocab.bos_id)
    return prompts, alone(gemma, prompts, 8)


@pytest.mark.parametrize("max_batched_tokens", [512, 64])
def test_sixteen_prompts_together_give_each_its_solo_tokens_and_logits_bit_for_bit(gemma, sixteen, max_batched_tokens):
    prompts, solo = sixteen
    with llmx.Engine(gemma, max_seqs=16, max_batched_tokens=max_batched_tokens) as engine:
        engine.check_invariants = True
        together = finish_all([engine.submit(p, max_tokens=8, temperature=0.0, keep_logits=True) for p in prompts])
        assert engine.stats()["steps"] < sum(len(p) for p in prompts)  # they really ran together
    for a, b in zip(solo, together, strict=True):
        assert a.token_ids == b.token_ids and len(b.step_logits) == len(a.step_logits) >= 1
        assert all(np.array_equal(x, y) for x, y in zip(a.step_logits, b.step_logits, strict=True))


def test_a_shared_prefix_is_computed_once_and_the_second_first_token_comes_5x_sooner(gemma, text_ids):
    bos = gemma.tokenizer.vocab.bos_id
    prefix = [bos] + text_ids[:999]
    with llmx.Engine(gemma) as engine:
        first = finish_all([engine.submit(prefix + text_ids[2000:2012], max_tokens=1, temperature=0.0)])[0]
        before = engine.stats()
        suffix = text_ids[3000:3020]
        second = finish_all([engine.submit(prefix + suffix, max_tokens=1, temperature=0.0)])[0]
        after = engine.stats()
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    assert len(suffix) <= computed < len(suffix) + 16  # its suffix, and the prefix's last partial block
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 992
    ttft = [r.first_token_at - r.submitted_at for r in (first, second)]
    assert ttft[0] >= 5 * ttft[1], ttft


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_fifty_requests_cancelled_at_random_points_give_back_their_blocks(gemma, text_ids, prefix_caching):
    rng = random.Random(7)
    bos = gemma.tokenizer.vocab.bos_id
    with llmx.Engine(gemma, max_seqs=16, prefix_caching=prefix_caching) as engine:
        requests = [engine.submit([bos] + text_ids[rng.randrange(0, 40): rng.randrange(60, 200)], max_tokens=100,
                                  temperature=0.7, seed=i) for i in range(50)]
        for request in requests:
            pieces = iter(request)
            for _ in range(rng.randrange(0, 6)):
                next(pieces, None)
            request.cancel()
        finish_all(requests)
        time.sleep(0.2)  # one more step of the loop, if one was under way
        stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["kv_blocks_referenced"] == 0
    assert stats["kv_blocks_used"] == stats["kv_blocks_cached"]
    assert (stats["kv_blocks_used"] > 0) if prefix_caching else (stats["kv_blocks_used"] == 0)
    assert sum(r.finish_reason == "cancelled" for r in requests) >= 40


def test_a_pool_for_four_runs_twelve_by_preemption_each_with_its_solo_tokens(gemma, text_ids):
    lengths = [20, 31, 25, 40, 22, 37, 28, 35, 24, 39, 26, 33]
    prompts = prompts_of(text_ids, lengths, gemma.tokenizer.vocab.bos_id)
    with llmx.Engine(gemma, max_seqs=16) as engine:  # room for all: no preemption
        roomy = finish_all([engine.submit(p, max_tokens=200, temperature=0.0) for p in prompts])
        assert engine.stats()["preemptions"] == 0
    with llmx.Engine(gemma, max_seqs=16, kv_cache_tokens=4 * 240) as engine:
        engine.check_invariants = True
        tight = finish_all([engine.submit(p, max_tokens=200, temperature=0.0) for p in prompts])
        stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["kv_blocks_total"] == 60
    assert all(r.finish_reason in ("length", "stop") for r in tight)
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]
    solo = alone(gemma, prompts[:2], 200)
    assert [r.token_ids for r in solo] == [r.token_ids for r in tight[:2]]


@needs_reference
def test_q8_0_kv_cache_stays_within_3x_llama_cpps_spread_at_half_the_memory(gemma, gemma_path):
    ref = np.load(REFERENCE_DIR / "gemma_kld_gpl3.npz")
    kl, top1 = kl_against_llama_cpp(gemma, "q8_0")
    assert kl <= 3 * float(ref["spread_kld_mean"]) and top1 >= float(ref["spread_top1"]) - 0.02, (kl, top1)
    with llmx.Engine(gemma, kv_cache_tokens=256) as f16, \
            llmx.Engine(gemma, kv_cache_tokens=256, cache_type_k="q8_0", cache_type_v="q8_0") as q8:
        per_token = {"f16": f16.stats()["kv_bytes_per_token"], "q8_0": q8.stats()["kv_bytes_per_token"]}
        assert q8.cache.keys.nbytes / f16.cache.keys.nbytes == pytest.approx(34 / 64)
    assert per_token["q8_0"] / per_token["f16"] == pytest.approx(34 / 64)  # 34 bytes for 32 values, not 64
    assert describe_model(gemma_path)["memory"]["kv_bytes_per_token"] == {"F16": per_token["f16"],
                                                                         "Q8_0": per_token["q8_0"]}


def test_q8_0_engine_generates_like_its_own_solo_run(gemma, sixteen):
    prompts, _ = sixteen
    with llmx.Engine(gemma, cache_type_k="q8_0", cache_type_v="q8_0", prefix_caching=False) as engine:
        solo = [finish_all([engine.submit(p, max_tokens=6, temperature=0.0)])[0].token_ids for p in prompts[:4]]
        together = finish_all([engine.submit(p, max_tokens=6, temperature=0.0) for p in prompts[:4]])
    assert [r.token_ids for r in together] == solo


def test_stream_from_asyncio_gives_what_iteration_gives(gemma):
    with llmx.Engine(gemma) as engine:
        plain = "".join(engine.submit("The capital of France is", max_tokens=12, temperature=0.0))

        async def collect():
            request = engine.submit("The capital of France is", max_tokens=12, temperature=0.0)
            return "".join([piece async for piece in request.stream()]), request

        streamed, request = asyncio.run(collect())
    assert streamed == plain == request.text and request.finish_reason == "length"
    assert request.usage == {"prompt_tokens": len(request.prompt_ids), "completion_tokens": 12,
                             "total_tokens": len(request.prompt_ids) + 12}


def test_model_generate_is_the_engine_with_one_request(gemma):
    with llmx.Engine(gemma) as engine:
        request = engine.submit("Once upon a time", max_tokens=10, temperature=0.0, stop=["\n\n"])
        text = "".join(request)
    assert "".join(gemma.generate("Once upon a time", max_tokens=10, temperature=0.0, stop=["\n\n"])) == text


def test_stop_strings_and_seeds(gemma):
    with llmx.Engine(gemma) as engine:
        full = engine.submit("1, 2, 3, 4,", max_tokens=12, temperature=0.0)
        text = "".join(full)
        cut = text[: max(1, len(text) // 2)].split()[-1]
        stopped = engine.submit("1, 2, 3, 4,", max_tokens=12, temperature=0.0, stop=[cut])
        assert "".join(stopped) == text[: text.index(cut)] and stopped.finish_reason == "stop"
        a, b = (engine.submit("Hello", max_tokens=8, temperature=1.0, seed=3) for _ in range(2))
        assert "".join(a) == "".join(b)


def test_bad_requests_fail_with_one_clear_error(gemma):
    with llmx.Engine(gemma, kv_cache_tokens=64) as engine:
        with pytest.raises(UsageError, match="empty"):
            engine.submit([])
        with pytest.raises(LlmxError, match=r"100 tokens but the KV cache holds 64"):
            engine.submit(list(range(2, 102)))
        with pytest.raises(UsageError, match="token ids"):
            engine.submit([2, gemma.config.n_vocab])
        assert "".join(engine.submit("Hi", max_tokens=3, temperature=0.0)) != ""  # still serving
    with pytest.raises(LlmxError, match="cache_type_k 'q4_0'"):
        llmx.Engine(gemma, cache_type_k="q4_0")


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(gemma, monkeypatch):
    with llmx.Engine(gemma) as engine:
        real_run = engine._runner.run
        calls = []

        def broken_once(output):
            calls.append(1)
            if len(calls) == 1:
                raise FloatingPointError("boom")
            return real_run(output)

        monkeypatch.setattr(engine._runner, "run", broken_once)
        failed = engine.submit("Hi", max_tokens=3, temperature=0.0)
        with pytest.raises(LlmxError, match="boom"):
            "".join(failed)
        assert failed.finish_reason == "error"
        assert "".join(engine.submit("Hi", max_tokens=3, temperature=0.0)) != ""
        assert engine.stats()["kv_blocks_referenced"] == 0


def test_the_forced_avx2_path_gives_the_same_logits(gemma_path, gemma):
    """`isa="avx2"` (what `--isa avx2` passes) runs the 256-bit kernels on an AVX-512 host: integer
    dot products and float orders are the same, so the logits are too."""
    avx2 = Model(gemma_path, threads=2, isa="avx2")
    ids = gemma.tokenize("The quick brown fox jumps over the lazy dog, again and again")
    assert np.array_equal(avx2.logits(ids), gemma.logits(ids))
    with pytest.raises(UsageError, match="instruction set"):
        Model(gemma_path, isa="avx9")
