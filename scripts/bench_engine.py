"""The continuous-batching engine under load: C concurrent clients (threads), each sending
--requests requests one after the other (the next when the last finished, as a chat user or
vLLM's --max-concurrency does). Each request is a prompt of --prompt tokens (random ids, BOS
first, a different prompt each so the prefix cache cannot help) generating exactly --gen tokens
(end-of-generation ignored, as llama-bench does).

Per concurrency: aggregate generated tokens/s (all tokens over the run's wall time), time to first
token p50/p99, inter-token latency p50/p99 (gaps between a request's tokens), and the aggregate
relative to one client. The levels run in turns, --reps rounds; each level's median run (by
aggregate t/s) is reported. One untimed warm-up request compiles or loads the kernels first.

`--isa avx2` runs the AVX2 kernels on an AVX-512 host, and this script then also tells Numba to
generate code for an AVX2-only CPU (NUMBA_CPU_NAME=haswell, AVX-512 features off) by starting
itself again with those variables: what an AVX2 laptop runs, not AVX2 intrinsics in 512-bit code.

Usage: python scripts/bench_engine.py [MODEL] [--concurrency 1,4,16] [--prompt 128] [--gen 128]
       [-t 2] [--requests 3] [--reps 3] [--isa avx2] [--cache-type q8_0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell",
             "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+lzcnt,+movbe,+sse4.2,+cx16,"
                                   "-avx512f,-avx512vnni,-avx512bw,-avx512vl,-avx512dq,-avxvnni"}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def load(engine, prompts: list[list[list[int]]], n_gen: int) -> dict:
    """One client thread per list of prompts, each sending its prompts one after the other."""
    finished = []

    def client(own: list[list[int]]) -> None:
        for prompt in own:
            request = engine.submit(prompt, max_tokens=n_gen, temperature=0.0, ignore_eos=True)
            request.wait()
            finished.append(request)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(own,)) for own in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttft = [r.first_token_at - r.submitted_at for r in finished]
    gaps = [b - a for r in finished for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    generated = sum(len(r.token_ids) for r in finished)
    return {"tokens_per_s": generated / wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99), "requests": len(finished),
            "generated": generated, "wall_s": wall}


def run(args: argparse.Namespace) -> list[dict]:
    import llmx
    from llmx.quant.cpu.simd import isa_name

    model = llmx.load(args.model, threads=args.threads, isa=args.isa)
    rng = np.random.default_rng(0)
    bos = model.tokenizer.vocab.bos_id or 0
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with llmx.Engine(model, max_seqs=max(levels), kv_cache_tokens=max(levels) * (args.prompt + args.gen + 16),
                     cache_type_k=args.cache_type, cache_type_v=args.cache_type) as engine:
        def prompts(clients: int, each: int) -> list[list[list[int]]]:
            return [[[bos] + rng.integers(100, model.config.n_vocab, args.prompt - 1).tolist() for _ in range(each)]
                    for _ in range(clients)]

        load(engine, prompts(min(levels), 1), 4)  # warm-up
        runs: dict[int, list[dict]] = {c: [] for c in levels}
        for _ in range(args.reps):  # the levels in turns, so the machine's drift hits them alike
            for c in levels:
                runs[c].append(load(engine, prompts(c, args.requests), args.gen))
        for c in levels:
            ordered = sorted(runs[c], key=lambda w: w["tokens_per_s"])
            rows.append({"concurrency": c, **ordered[len(ordered) // 2]})
    base = rows[0]["tokens_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    for row in rows:
        row["vs_1"] = row["tokens_per_s"] / base if base else None
        row["isa"] = isa_name(model.transformer.isa)
        row["threads"] = args.threads
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"isa {rows[0]['isa']}, {rows[0]['threads']} threads")
    print("| concurrency | aggregate t/s | vs 1 request | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_1']:.2f}x" if r["vs_1"] else "-"
        print(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {vs} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} "
              f"| {1e3 * r['itl_p50_s']:.1f} | {1e3 * r['itl_p99_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3, help="requests each client sends in turn")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--isa", choices=["avx2", "vnni", "portable"], default=None)
    parser.add_argument("--cache-type", choices=["f16", "q8_0"], default="f16")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.isa == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_ONLY}))
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
