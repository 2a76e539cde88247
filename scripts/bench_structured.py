"""Decode speed with a JSON schema against without one, at batch 1 and 16 (issue: >= 90%).

    python scripts/bench_structured.py [MODEL] [--threads 2] [--batches 1,16] [--tokens 128] [--isa avx2]

Each run submits B requests at once to one `Engine` and counts generated tokens over the time
from the first token to the last (prompt excluded). "ratio" is the median over rounds of each
round's schema / plain pair (run back to back, so drift cancels). The schema run constrains every request to an
array of at least 100 small objects, so the grammar is active for all of the run (a mask every
step, strings, keys and numbers alike); the plain run generates the same number of tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llmx
from llmx.engine.default_model import resolve_model_path
from llmx.engine.model import Model
from llmx.paths import cache_dir
from llmx.quant.cpu.simd import ISA_NAMES, host_isa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import AVX2_ONLY  # noqa: E402  (what an AVX2-only laptop compiles for)

SCHEMA = {"type": "array", "minItems": 100, "items": {  # long enough that no request completes it early
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                     "count": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["name", "count"], "additionalProperties": False}}
PROMPT = "The inventory, as JSON:\n"


def decode_rate(engine: llmx.Engine, batch: int, tokens: int, response_format) -> tuple[float, int]:
    """Generated tokens per second over the batch, and the tokens generated."""
    started = time.perf_counter()
    requests = [engine.submit(PROMPT, max_tokens=tokens, temperature=0.8, seed=i, ignore_eos=response_format is None,
                              response_format=response_format) for i in range(batch)]
    for r in requests:
        r.wait()
    first = max(r.first_token_at or started for r in requests)
    last = max(r.finished_at for r in requests)
    # tokens generated after the last request's first token: the steady decode of all B together
    n = sum(sum(1 for t in r.token_times if t > first) for r in requests)
    return n / (last - first), sum(len(r.token_ids) for r in requests)


def load_model(args: argparse.Namespace) -> tuple[Model, str]:
    """The model of `args` (model, threads, isa), warm, and the name of the kernels it runs. With
    --isa avx2 on a host with more, this process first starts itself again as an AVX2 laptop would
    compile (`AVX2_ONLY`)."""
    if args.isa == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_ONLY}))
    model = Model(resolve_model_path(args.model, cache_dir()), threads=args.threads, isa=args.isa)
    model.warm_up()
    return model, args.isa or next(name for name, marker in ISA_NAMES.items() if marker is host_isa())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--isa", choices=sorted(ISA_NAMES))
    args = parser.parse_args()
    model, kernels = load_model(args)
    print(f"{model.path.name}, {args.threads} threads, {kernels} kernels")
    fmt = {"type": "json_schema", "json_schema": {"name": "notes", "schema": SCHEMA}}
    print(f"{'batch':>5} {'plain t/s':>10} {'schema t/s':>11} {'ratio':>6} {'schema tokens':>14}")
    for batch in [int(b) for b in args.batches.split(",")]:
        with llmx.Engine(model, max_seqs=max(16, batch), kv_cache_tokens=batch * (args.tokens + 64)) as engine:
            decode_rate(engine, batch, 8, fmt)  # the tokenizer view, built once
            plain, constrained, produced = [], [], 0
            for _ in range(args.repeat):  # interleaved: drift hits both alike
                plain.append(decode_rate(engine, batch, args.tokens, None)[0])
                rate, produced = decode_rate(engine, batch, args.tokens, fmt)
                constrained.append(rate)
        p, c = statistics.median(plain), statistics.median(constrained)
        ratio = statistics.median(b / a for a, b in zip(plain, constrained, strict=True))  # pairs run back to back
        print(f"{batch:>5} {p:>10.1f} {c:>11.1f} {ratio:>6.2f} {produced:>14}")


if __name__ == "__main__":
    main()
