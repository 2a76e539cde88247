"""llmx against llama.cpp (llama-cpp-python) on one model, in one run, on the same machine.

For each thread count, pp (prompt) and tg (generation) are measured llama-bench style: random
ids with BOS first, a fresh KV cache per repetition, one untimed warm-up, no sampling. The two
engines alternate repetition by repetition so that drift in the machine's speed hits both.
Prints t/s (mean ± sample std) for both and the ratio llmx / llama.cpp.

llama-cpp-python is a benchmark-only dependency (`pip install llama-cpp-python`, ~12 minutes of
compiling on 2 cores); llmx never imports it.

Usage: python scripts/compare_llamacpp.py [MODEL] [--threads 1,2] [--reps 5] [--pp 512] [--tg 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from llmx.engine.bench import Bench, BenchTest
from llmx.engine.model import Model


class LlamaCpp:
    def __init__(self, path: Path, threads: int, seed: int = 1234):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)
        self.rng = np.random.default_rng(seed)

    def _random(self, n: int) -> list[int]:
        return self.rng.integers(0, self.llm.n_vocab(), size=n).tolist()

    def pp(self, n: int) -> int:
        tokens = [self.llm.token_bos()] + self._random(n - 1)
        self.llm.reset()
        started = time.perf_counter_ns()
        self.llm.eval(tokens)
        return time.perf_counter_ns() - started

    def tg(self, n: int) -> int:
        self.llm.reset()
        tokens = [self.llm.token_bos()] + self._random(n - 1)
        started = time.perf_counter_ns()
        for token in tokens:
            self.llm.eval([token])
        return time.perf_counter_ns() - started


def stats(n_tokens: int, samples_ns: list[int]) -> tuple[float, float]:
    ts = [n_tokens * 1e9 / ns for ns in samples_ns]
    return statistics.fmean(ts), statistics.stdev(ts) if len(ts) > 1 else 0.0


def compare(path: Path, threads: int, reps: int, n_pp: int, n_tg: int) -> list[dict]:
    ours = Bench(Model(path, threads=threads, ctx=0))
    theirs = LlamaCpp(path, threads)
    tests = [("pp", n_pp, BenchTest(n_pp, 0), theirs.pp), ("tg", n_tg, BenchTest(0, n_tg), theirs.tg)]
    rows = []
    for kind, n, test, their_run in tests:
        ours.run_once(test, warm_up=True)
        their_run(min(n, 8))
        mine, other = [], []
        for _ in range(reps):  # alternate, so drift in machine speed hits both engines alike
            other.append(their_run(n))
            mine.append(ours.run_once(test))
        (ours_ts, ours_sd), (theirs_ts, theirs_sd) = stats(n, mine), stats(n, other)
        rows.append({"threads": threads, "test": f"{kind}{n}", "llmx_ts": ours_ts, "llmx_stddev": ours_sd,
                     "llamacpp_ts": theirs_ts, "llamacpp_stddev": theirs_sd, "ratio": ours_ts / theirs_ts})
    return rows


def format_row(row: dict) -> str:
    return (f"| {row['threads']:7d} | {row['test']:6s} | {row['llamacpp_ts']:9.2f} ± {row['llamacpp_stddev']:6.2f} "
            f"| {row['llmx_ts']:9.2f} ± {row['llmx_stddev']:6.2f} | {row['ratio']:15.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="a .gguf file (default: the default model)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        from llmx.engine import resolve_model_path
        from llmx.paths import cache_dir

        path = resolve_model_path(None, cache_dir())
    rows = []
    if not args.json:
        print("| threads | test   | llama.cpp t/s      | llmx t/s           | llmx / llama.cpp |\n"
              "| ------: | :----- | -----------------: | -----------------: | ---------------: |", flush=True)
    for threads in (int(t) for t in args.threads.split(",")):
        for row in compare(path, threads, args.reps, args.pp, args.tg):
            rows.append(row)
            if not args.json:
                print(format_row(row), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
