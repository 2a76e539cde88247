"""Where one decode step's time goes: per-op wall time, as a percent of the step.

Wraps the Transformer's pieces (each matmul by tensor role and weight type, attention, norms,
rope, activations, cache writes) with timers, prefills a prompt, then decodes N tokens one at a
time and prints each op's share. What is not inside a wrapped op is "python/other". With
--batch B, B sequences (each with the prompt) decode together, as `llmx bench -b B` runs them.
With --prefill N, each step is instead one N-token prompt of a new sequence (what a server's
prefill steps and llama-bench's pp run).

`--isa avx2` runs the AVX2 kernels on an AVX-512 host, compiled for an AVX2-only CPU (the script
starts itself again with `bench_engine.AVX2_ONLY`), as an AVX2 laptop runs them.

Usage: python scripts/profile_decode.py [MODEL] [--threads 2] [--prompt 128] [--steps 64] [--batch 1]
       [--isa avx2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from llmx.engine import kv_cache
from llmx.engine.backends import cpu
from llmx.engine.model import Model

TIMES: dict[str, float] = defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name(*args) if callable(name) else name] += time.perf_counter() - started
    return wrapper


def linear_name(self, x, name, quantized=None):
    role = name.rsplit(".", 1)[-1] if name.startswith("blk.") else name
    return f"matmul {role} ({self._tensor(name + '.weight').qtype.name})"


def stacked_name(self, x, stack, quantized=None):
    roles = "+".join(name.rsplit(".", 1)[-1] for name in stack.names)
    return f"matmul {roles} ({stack.qtype.name})"


def instrument() -> None:
    B = cpu.CpuBackend
    B.linear = timed(linear_name, B.linear)
    B._stacked = timed(stacked_name, B._stacked)
    B.embed = timed("embed", B.embed)
    cpu.attend_paged = timed("attention", cpu.attend_paged)
    cpu.rms_norm = timed("rms_norm", cpu.rms_norm)
    cpu.add_rms_norm = timed("residual add + norms", cpu.add_rms_norm)
    cpu.norm_rope = timed("q/k norms + rope", cpu.norm_rope)
    B.activate = timed("activation", B.activate)
    cpu.quantize_activations = timed("activations quantized once for several matmuls", cpu.quantize_activations)
    kv_cache.KVCache.write = timed("kv write", kv_cache.KVCache.write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--isa", choices=["avx2", "vnni", "portable"], default=None)
    parser.add_argument("--prefill", type=int, default=0, help="profile N-token prompts instead of decoding")
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
    model = Model(path, threads=args.threads, ctx=0, isa=args.isa)
    rng = np.random.default_rng(0)
    per_seq = -(-(args.prompt + args.steps + 2) // kv_cache.BLOCK_SIZE) * kv_cache.BLOCK_SIZE
    cache = kv_cache.KVCache(model.config, args.batch * per_seq)
    seqs = [cache.new_sequence() for _ in range(args.batch)]
    for seq in seqs:
        model.transformer.forward(rng.integers(0, model.config.n_vocab, args.prompt), seq, cache, "last")

    def step() -> None:
        tokens = rng.integers(0, model.config.n_vocab, args.batch)
        model.transformer.forward_batch([(s, tokens[i:i + 1]) for i, s in enumerate(seqs)], cache, "last")

    if args.prefill:
        def step() -> None:  # noqa: F811 (a prompt step instead)
            seq = cache.new_sequence()
            model.transformer.forward(rng.integers(0, model.config.n_vocab, args.prefill), seq, cache, "last")
            cache.release(seq)

        cache = kv_cache.KVCache(model.config, -(-args.prefill // kv_cache.BLOCK_SIZE) * kv_cache.BLOCK_SIZE)

    step()  # loads the decode shapes' kernels, which the prompt did not use, outside the timing
    instrument()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    step = (time.perf_counter() - started) / args.steps
    total = sum(TIMES.values()) / args.steps
    if args.prefill:
        print(f"{path.name}, {args.threads} threads, {args.prefill}-token prompt: {1e3 * step:.2f} ms per prompt "
              f"({args.prefill / step:.1f} t/s)\n")
    else:
        print(f"{path.name}, {args.threads} threads, context {args.prompt}, {args.batch} sequence(s): "
              f"{1e3 * step:.2f} ms per decode step ({args.batch / step:.1f} t/s)\n")
    print(f"{'op':40s} {'ms/step':>8s} {'share':>7s}")
    rows = sorted(TIMES.items(), key=lambda kv: -kv[1]) + [("python/other", (step - total) * args.steps)]
    for name, seconds in rows:
        per_step = seconds / args.steps
        print(f"{name:40s} {1e3 * per_step:8.3f} {100 * per_step / step:6.1f}%")


if __name__ == "__main__":
    main()
