"""`llmx bench`: llama-bench's tests, table and JSON fields, batched decode, and bad flags."""

from __future__ import annotations

import json

import pytest
from conftest import MODELS_DIR, needs_reference, run_llmx

from llmx.engine.bench import BenchResult, BenchTest, plan

pytestmark = needs_reference  # the tiny models and llama.cpp's outputs in ../shared

TINY = str(MODELS_DIR / "tiny-llama-q8_0.gguf")


def test_plan_follows_llama_bench_order_and_names():
    tests = plan([512, 0], [128], [(512, 128)], [1, 16])
    assert [t.name for t in tests] == ["pp512", "tg128", "pp512+tg128", "tg128 x1", "tg128 x16"]
    assert [t.tokens for t in tests] == [512, 128, 640, 128, 16 * 128]


def test_statistics_are_mean_and_sample_std():
    result = BenchResult(BenchTest(100, 0), threads=1, samples_ns=[1_000_000_000, 500_000_000])
    assert result.samples_ts == [100.0, 200.0]
    assert result.avg_ts == 150.0
    assert result.stddev_ts == pytest.approx(70.7107, abs=1e-4)  # sample std: |200 - 100| / sqrt(2)


def test_bench_json_has_llama_bench_fields():
    result = run_llmx("bench", TINY, "-p", "16", "-n", "4", "-pg", "8,2", "-t", "1", "-r", "2", "-b", "1,3",
                      "-o", "json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["test"] for r in records] == ["pp16", "tg4", "pp8+tg2", "tg4 x1", "tg4 x3"]
    for r in records:
        assert {"n_prompt", "n_gen", "avg_ts", "stddev_ts", "n_threads", "model_type", "model_size",
                "model_n_params", "samples_ts", "avg_ns"} <= set(r)
        assert len(r["samples_ns"]) == 2 and r["avg_ts"] > 0 and r["n_threads"] == 1
    assert (records[0]["n_prompt"], records[0]["n_gen"]) == (16, 0)
    assert (records[2]["n_prompt"], records[2]["n_gen"]) == (8, 2)
    assert records[4]["n_seq"] == 3


def test_bench_markdown_table():
    result = run_llmx("bench", TINY, "-p", "8", "-n", "2", "-t", "1,2", "-r", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[4], r[5]) for r in rows] == [("1", "pp8"), ("1", "tg2"), ("2", "pp8"), ("2", "tg2")]
    assert all(r[0] == "llama 2M Q8_0" and r[3] == "CPU" and " ± " in r[6] for r in rows)


@pytest.mark.parametrize("flags", [["-o", "xml"], ["-t", "9999"], ["-pg", "5"], ["-p", "x"], ["-p", "0", "-n", "0"]])
def test_bench_bad_flags_are_one_line_usage_errors(flags):
    result = run_llmx("bench", TINY, *flags, "-r", "1")
    assert result.returncode == 2
    assert len(result.stderr.decode().strip().splitlines()) == 1
