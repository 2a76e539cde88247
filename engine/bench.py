"""`llmx bench`: llama-bench's tests and statistics, plus batched decode (llama-batched-bench's S_TG).

Each test runs on random token ids (BOS first when the model adds one) in a fresh KV cache:
- pp<N>: one forward pass over N prompt tokens (logits for the last one only);
- tg<N>: N single-token decode steps, each on a random token (no sampling);
- pp<N>+tg<M>: both, in one context, timed together;
- tg<N> xB: B sequences decoding together, N steps; t/s counts all B x N tokens.
One untimed warm-up precedes the repetitions; t/s is the mean over repetitions with the sample
standard deviation, as llama-bench reports it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from gguf import Keys, LlamaFileType

from llmx.engine.kv_cache import BLOCK_SIZE, KVCache
from llmx.engine.model import Model


@dataclass(frozen=True)
class BenchTest:
    n_prompt: int
    n_gen: int
    n_seq: int = 1  # sequences decoding together
    batched: bool = False  # a batched-decode test (sequences start from BOS, untimed)

    @property
    def name(self) -> str:
        if self.batched:
            return f"tg{self.n_gen} x{self.n_seq}"
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts)

    @property
    def tokens(self) -> int:
        return self.n_prompt + self.n_gen * self.n_seq


@dataclass
class BenchResult:
    test: BenchTest
    threads: int
    samples_ns: list[int]

    @property
    def samples_ts(self) -> list[float]:
        return [self.test.tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0


def plan(n_prompt: list[int], n_gen: list[int], pg: list[tuple[int, int]], batches: list[int]) -> list[BenchTest]:
    """llama-bench's order: prompt tests, then generation, then prompt+generation; then batched decode."""
    tests = [BenchTest(n, 0) for n in n_prompt if n > 0]
    tests += [BenchTest(0, n) for n in n_gen if n > 0]
    tests += [BenchTest(p, g) for p, g in pg if p > 0 or g > 0]
    steps = next((n for n in n_gen if n > 0), 128)
    tests += [BenchTest(0, steps, b, batched=True) for b in batches]
    return tests


class Bench:
    def __init__(self, model: Model, seed: int = 1234):
        self.model = model
        self.rng = np.random.default_rng(seed)
        vocab = model.tokenizer.vocab
        self.bos = vocab.bos_id if vocab.add_bos and vocab.bos_id is not None else None

    def _random(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.model.config.n_vocab, size=n)

    def _prompt(self, n: int) -> np.ndarray:
        ids = self._random(n)
        if self.bos is not None and n:
            ids[0] = self.bos
        return ids

    def run_once(self, test: BenchTest, warm_up: bool = False) -> int:
        """Nanoseconds for one repetition (a fresh cache); a warm-up decodes a single step."""
        transformer = self.model.transformer
        n_gen = min(test.n_gen, 1) if warm_up else test.n_gen
        per_seq = -(-(test.n_prompt + n_gen + 1) // BLOCK_SIZE) * BLOCK_SIZE  # whole blocks per sequence
        cache = KVCache(self.model.config, test.n_seq * per_seq)
        seqs = [cache.new_sequence() for _ in range(test.n_seq)]
        prompt = self._prompt(test.n_prompt)
        if test.batched:  # every sequence starts from BOS (untimed), then all decode together
            transformer.forward_batch([(s, self._prompt(1)) for s in seqs], cache, "last")
        started = time.perf_counter_ns()
        if test.n_prompt:
            transformer.forward(prompt, seqs[0], cache, "last")
        first = self.bos if self.bos is not None and not test.n_prompt and not test.batched else None
        for step in range(n_gen):
            tokens = self._random(test.n_seq)
            if step == 0 and first is not None:
                tokens[0] = first
            transformer.forward_batch([(s, tokens[i : i + 1]) for i, s in enumerate(seqs)], cache, "last")
        return time.perf_counter_ns() - started

    def run(self, test: BenchTest, threads: int, repetitions: int) -> BenchResult:
        self.model.transformer.backend.threads = threads
        self.run_once(test, warm_up=True)
        return BenchResult(test, threads, [self.run_once(test) for _ in range(repetitions)])


# -- reporting -------------------------------------------------------------------------------

COLUMNS = [("model", 30, "<"), ("size", 10, ">"), ("params", 10, ">"), ("backend", 10, "<"),
           ("threads", 7, ">"), ("test", 15, ">"), ("t/s", 20, ">")]


def model_description(model: Model) -> dict[str, Any]:
    gguf = model.gguf
    n_params = sum(t.n_elements for t in gguf.tensors.values())
    size = sum(t.nbytes for t in gguf.tensors.values())
    label = gguf.get(Keys.General.SIZE_LABEL) or _size_label(n_params)
    return {"model_filename": str(model.path), "model_type": f"{gguf.architecture} {label} {_ftype_name(gguf)}",
            "model_size": size, "model_n_params": n_params, "backends": model.device.upper()}


def _size_label(n_params: int) -> str:
    return f"{n_params / 1e9:.0f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"


def _ftype_name(gguf) -> str:
    """llama.cpp's file-type names: Q4_K_M -> 'Q4_K - Medium'."""
    raw = gguf.get(Keys.General.FILE_TYPE)
    try:
        name = LlamaFileType(raw).name.removeprefix("MOSTLY_") if raw is not None else "unknown"
    except ValueError:
        return f"unknown ({raw})"
    sizes = {"S": "Small", "M": "Medium", "L": "Large"}
    head, _, tail = name.rpartition("_")
    return f"{head} - {sizes[tail]}" if head.endswith("_K") and tail in sizes else name


def markdown_header() -> str:
    names = "| " + " | ".join(f"{n:{a}{w}}" for n, w, a in COLUMNS) + " |"
    rules = "| " + " | ".join(("-" * (w - 1) + ":") if a == ">" else "-" * w for _, w, a in COLUMNS) + " |"
    return names + "\n" + rules


def markdown_row(desc: dict[str, Any], result: BenchResult) -> str:
    size = desc["model_size"]
    size_text = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"
    n = desc["model_n_params"]
    params = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    cells = [desc["model_type"], size_text, params, desc["backends"], str(result.threads), result.test.name,
             f"{result.avg_ts:.2f} ± {result.stddev_ts:.2f}"]
    return "| " + " | ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, COLUMNS, strict=True)) + " |"


def json_record(desc: dict[str, Any], result: BenchResult, version: str) -> dict[str, Any]:
    ns = result.samples_ns
    return {
        "build_commit": f"llmx-{version}", **desc,
        "n_threads": result.threads, "n_prompt": result.test.n_prompt, "n_gen": result.test.n_gen,
        "n_seq": result.test.n_seq, "test": result.test.name,
        "test_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "avg_ns": int(statistics.fmean(ns)), "stddev_ns": int(statistics.stdev(ns)) if len(ns) > 1 else 0,
        "avg_ts": result.avg_ts, "stddev_ts": result.stddev_ts,
        "samples_ns": ns, "samples_ts": result.samples_ts,
    }


def run_all(bench: Bench, tests: list[BenchTest], threads: list[int], repetitions: int,
            on_result: Callable[[BenchResult], None]) -> list[BenchResult]:
    results = []
    for n_threads in threads:
        for test in tests:
            result = bench.run(test, n_threads, repetitions)
            on_result(result)
            results.append(result)
    return results
