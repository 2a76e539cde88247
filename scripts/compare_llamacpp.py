"""llmx against llama.cpp (llama-cpp-python) on one model, in one run, on the same machine.

For each thread count, pp (prompt) and tg (generation) are measured llama-bench style: random
ids with BOS first, a fresh KV cache per repetition, one untimed warm-up, no sampling. The two
engines alternate repetition by repetition so that drift in the machine's speed hits both.
Prints t/s (mean ± sample std) for both and the ratio llmx / llama.cpp.

llama-cpp-python is a benchmark-only dependency (`pip install llama-cpp-python`, ~12 minutes of
compiling on 2 cores); llmx never imports it.

`--isa avx2` runs llmx's AVX2 kernels compiled for an AVX2-only CPU (the script starts itself
again with `bench_engine.AVX2_ONLY`), to compare with a llama.cpp built for AVX2 only
(CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF");
the table's header line says which instruction sets each side ran.

Usage: python scripts/compare_llamacpp.py [MODEL] [--threads 1,2] [--reps 5] [--pp 512] [--tg 128]
       [--isa avx2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llmx.engine.bench import Bench, BenchTest
from llmx.engine.model import Model
from llmx.quant.cpu.simd import isa_name, isa_named


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


def built_for() -> str:
    """The instruction sets this llama.cpp build uses, from its system info."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    return " ".join(f for f in ("AVX2", "AVX512", "AVX512_VNNI", "AVX_VNNI") if f"{f} = 1" in info) or info


def stats(n_tokens: int, samples_ns: list[int]) -> tuple[float, float]:
    ts = [n_tokens * 1e9 / ns for ns in samples_ns]
    return statistics.fmean(ts), statistics.stdev(ts) if len(ts) > 1 else 0.0


def compare(path: Path, threads: int, reps: int, n_pp: int, n_tg: int, isa: str | None) -> list[dict]:
    ours = Bench(Model(path, threads=threads, ctx=0, isa=isa))
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
    parser.add_argument("--isa", choices=["avx2", "vnni", "portable"], default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.isa == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        from bench_engine import AVX2_ONLY

        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_ONLY}))
    if args.model:
        path = Path(args.model)
    else:
        from llmx.engine import resolve_model_path
        from llmx.paths import cache_dir

        path = resolve_model_path(None, cache_dir())
    rows = []
    if not args.json:
        print(f"llmx: {isa_name(isa_named(args.isa))} kernels; llama.cpp: {built_for()}")
        print("| threads | test   | llama.cpp t/s      | llmx t/s           | llmx / llama.cpp |\n"
              "| ------: | :----- | -----------------: | -----------------: | ---------------: |", flush=True)
    for threads in (int(t) for t in args.threads.split(",")):
        for row in compare(path, threads, args.reps, args.pp, args.tg, args.isa):
            rows.append(row)
            if not args.json:
                print(format_row(row), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
