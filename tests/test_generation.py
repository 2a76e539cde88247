"""Sampling, the Python API and `llmx run` / `llmx chat` on the real model."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from conftest import run_llmx

import llmx
from llmx.engine.sampling import SamplingParams, StopMatcher, make_rng, make_sampler
from llmx.errors import LlmxError


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = np.random.default_rng(0).standard_normal(1000)
    rng = make_rng(1)
    assert make_sampler(SamplingParams(temperature=0))(logits, [], rng) == int(np.argmax(logits))
    top1 = make_sampler(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0))
    assert all(top1(logits, [], rng) == int(np.argmax(logits)) for _ in range(20))


def test_same_seed_same_draws_and_filters_hold():
    logits = np.random.default_rng(2).standard_normal(500) * 3
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0))
    a = [sampler(logits, [], make_rng(7)) for _ in range(5)]
    assert a == [sampler(logits, [], make_rng(7)) for _ in range(5)]
    draws = {sampler(logits, [], r) for r in [make_rng(s) for s in range(200)]}
    assert draws <= set(np.argsort(-logits)[:5].tolist()) and len(draws) > 1


def test_repeat_penalty_follows_llama_cpp():
    from llmx.engine.sampling import apply_penalties

    logits = np.array([2.0, -2.0, 1.0])
    out = apply_penalties(logits, [0, 1, 1], SamplingParams(repeat_penalty=2.0, frequency_penalty=0.5,
                                                             presence_penalty=0.25))
    assert out.tolist() == [2.0 / 2 - 0.5 - 0.25, -2.0 * 2 - 1.0 - 0.25, 1.0]


@pytest.mark.parametrize("pieces", [["Hello wor", "ld. STOP here"], ["Hello world. ST", "O", "P here"],
                                    ["Hello world. S", "TOP"]])
def test_stop_string_never_emitted_even_when_split(pieces):
    matcher = StopMatcher(["STOP"])
    out = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    assert out == "Hello world. " and matcher.stopped


def test_partial_stop_prefix_is_released_at_the_end():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("a ST") == "a " and matcher.flush() == "ST"


@pytest.fixture(scope="module")
def model(gemma_path):
    return llmx.load(gemma_path, threads=2, ctx=256)


def test_api_round_trip_and_logits(model, reference):
    ids = model.tokenize("Hello world")
    assert ids == reference["gemma"]["tokenize"]["Hello world"]["plain"]
    assert model.detokenize(ids[1:]) == "Hello world"
    assert model.logits(ids).shape == (3, 262144)


def test_generate_greedy_matches_llama_cpp(model, reference):
    case = reference["gemma"]["greedy"]["The capital of France is"]
    text = "".join(model.generate("The capital of France is", max_tokens=8, temperature=0))
    assert text == model.detokenize(case["greedy"][:8])


def test_generate_seeded_and_stopped(model):
    kwargs = dict(max_tokens=24, temperature=0.9, seed=11)
    first = "".join(model.generate("Once upon a time", **kwargs))
    assert first == "".join(model.generate("Once upon a time", **kwargs))
    stopped = "".join(model.generate("1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]))
    assert " 7" not in stopped and stopped.startswith(" 5, 6,")


def test_chat_uses_the_builtin_gemma_template(model, reference):
    ids = model.chat_prompt([{"role": "user", "content": "What is 2+2?"}])
    assert ids == reference["gemma"]["greedy"]["<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
                                                "<start_of_turn>model\n"]["ids"]


def test_prompt_longer_than_context(model):
    with pytest.raises(LlmxError, match="context"):
        list(model.generate("word " * 300))


def test_run_pipes_exactly_llama_cpp_text(gemma_path, reference):
    case = reference["gemma"]["greedy"]["The capital of France is"]
    result = run_llmx("run", str(gemma_path), "-n", "8", "--temp", "0", stdin=b"The capital of France is\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == llmx.load(gemma_path).detokenize(case["greedy"][:8])
    as_json = json.loads(run_llmx("run", str(gemma_path), "The capital of France is", "-n", "8", "--temp", "0",
                                  "--json").stdout)
    assert as_json["completion_tokens"] == 8 and as_json["finish_reason"] == "length"
    assert as_json["text"] == result.stdout.decode()


def test_run_argument_comes_before_piped_text(gemma_path):
    piped = json.loads(run_llmx("run", str(gemma_path), "The capital of", "-n", "4", "--temp", "0", "--json",
                                stdin=b"France is").stdout)
    whole = json.loads(run_llmx("run", str(gemma_path), "The capital of\nFrance is", "-n", "4", "--temp", "0",
                                "--json").stdout)
    assert (piped["prompt_tokens"], piped["text"]) == (whole["prompt_tokens"], whole["text"])


def test_chat_reads_turns_from_a_pipe(gemma_path):
    result = run_llmx("chat", str(gemma_path), "--temp", "0", "-n", "8", stdin=b"What is 2+2?\n/clear\nHi\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.decode().strip().splitlines()) >= 2


def test_run_errors_are_one_line(gemma_path, tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cases = [
        run_llmx("run", str(tmp_path / "mamba.gguf"), "hi"),
        run_llmx("run", str(gemma_path), "-c", "16", "word " * 40),
        run_llmx("run", str(gemma_path), stdin=b"\xff\xfe not utf-8"),
    ]
    for result, what in zip(cases, ["architecture 'mamba'", "context", "not UTF-8"], strict=True):
        stderr = result.stderr.decode()
        assert result.returncode == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert what in stderr and "Traceback" not in stderr


def test_logprobs_follow_the_logits(model):
    from llmx.engine.model import GenerationStats

    stats = GenerationStats()
    list(model.generate("The capital of France is", max_tokens=3, temperature=0, logprobs=4, stats=stats))
    assert [e["token"] for e in stats.logprobs] == stats.tokens and len(stats.tokens) == 3
    for entry in stats.logprobs:
        ranked = [lp for _, lp in entry["top_logprobs"]]
        assert ranked == sorted(ranked, reverse=True) and len(ranked) == 4
        assert entry["top_logprobs"][0][0] == entry["token"]  # greedy picks the most likely
        assert entry["logprob"] == ranked[0] <= 0
        assert sum(np.exp(ranked)) <= 1.0 + 1e-9
