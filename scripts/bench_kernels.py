"""Quantized matmul kernels against the machine's own read bandwidth, measured in the same run.

For each weight type, shape (m x k), batch and thread count: weight GB/s read, effective GMAC/s,
the ratio of GB/s to the read bandwidth that a Numba streaming-sum kernel reaches on the same
number of threads (with software prefetch, as the kernels use; the plain streaming sum's figure
is printed too), and (batch > 1) tokens/s relative to batch 1. Shapes whose rows are not whole
blocks of a type (k-quants need k % 256 == 0) are skipped, as llama.cpp picks another type there.
Weights are prepared as the model prepares a weight matrix at load (`linear.pack`: Q8_0, Q4_0, Q5_0,
Q4_K and Q6_K packed 16 rows per vector).
The batches of one (type, shape, threads) are timed in turns, so that their ratio sees one machine state.
With --cold, each call reads its weights from DRAM, as a decode step reads each layer's matrices
(the output table evicts them): the calls go in turn through copies of the matrix that together
exceed any cache, and a call's time is a pass's over the copies divided by their count.

`--isa avx2` runs the AVX2 kernels on an AVX-512 host, compiled for an AVX2-only CPU (the script
starts itself again with `bench_engine.AVX2_ONLY`), as an AVX2 laptop runs them.

Usage: python scripts/bench_kernels.py [--types Q8_0,Q4_K] [--shapes 4096x4096] [--batches 1,16]
                                       [--threads 1,2] [--isa host|avx2|portable] [--cold] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numba
import numpy as np
from numba import njit, prange

from llmx.quant.cpu import simd
from llmx.quant.cpu.linear import matmul, pack
from llmx.quant.formats import quantize
from llmx.quant.qtypes import QType, block_size

ALL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ALL_SHAPES = ["640x2048", "2048x640", "4096x4096", "262144x640"]
SEED_ROWS = 1024  # quantize this many random rows, then tile them up to the full shape
COLD_BYTES = 128 << 20  # --cold: the copies' total, more than any cache


@njit(nogil=True, parallel=True)
def _stream_sum(raw, distance, isa):
    """Sum (of squares) over a large byte array, 64 bytes per step in two 32-byte vectors, with
    software prefetch `distance` bytes ahead when `distance` > 0."""
    n_chunks = 512
    per = raw.size // n_chunks
    total = 0
    for c in prange(n_chunks):
        a0 = simd.zero_i32x8()
        a1 = simd.zero_i32x8()
        for j in range(c * per, (c + 1) * per, 64):
            if distance:
                simd.prefetch(raw, j + distance)
            v0, v1 = simd.load_i8x32(raw, j), simd.load_i8x32(raw, j + 32)
            a0 = simd.add_i32x8(a0, simd.dot_u8i8x32(isa, v0, v0))
            a1 = simd.add_i32x8(a1, simd.dot_u8i8x32(isa, v1, v1))
        total += simd.hsum_i32x8(simd.add_i32x8(a0, a1))
    return total


def read_bandwidth(threads: int, nbytes: int = 512 << 20) -> tuple[float, float]:
    """GB/s of a streaming read over an array far larger than any cache: (plain, best), where
    plain relies on hardware prefetch alone and best also tries software prefetch at several
    distances. The kernels prefetch, so `best` is the bar they are measured against."""
    numba.set_num_threads(threads)
    raw = np.ones(nbytes, np.uint8)
    isa = simd.AVX2 if simd.host_isa() is simd.VNNI else simd.host_isa()  # (the sum needs no VNNI)
    seconds = {}
    for distance in (0, 2048, 4096, 8192):
        _stream_sum(raw, distance, isa)
        seconds[distance] = min(_timed(lambda d=distance: _stream_sum(raw, d, isa)) for _ in range(3))
    return raw.nbytes / seconds[0] / 1e9, raw.nbytes / min(seconds.values()) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_weights(qtype: QType, m: int, k: int, rng) -> np.ndarray:
    seed = quantize(rng.standard_normal((min(m, SEED_ROWS), k)).astype(np.float32), qtype)
    return np.ascontiguousarray(np.tile(seed, (-(-m // seed.shape[0]), 1))[:m])


def cold_copies(w: np.ndarray, packed: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(weights, packed) copies, COLD_BYTES in all: the copy a kernel reads (the packed one when
    there is one) is a fresh array each time; the other is shared."""
    read = w if packed is None else packed
    n = max(2, -(-COLD_BYTES // read.nbytes))
    return [(w.copy(), None) if packed is None else (w, packed.copy()) for _ in range(n)]


def time_batches(xs: dict, w, qtype, threads, isa, packed=None, min_seconds=0.3, slice_seconds=0.02,
                 cold: bool = False) -> dict:
    """Best seconds of one `matmul` for each batch's x in `xs`, the batches taking turns (a slice of
    ~20 ms each per round) until each has run `min_seconds`, so that the batch-16 / batch-1 ratio
    compares the two under one state of the machine, whose speed drifts within minutes. `cold`:
    each call on weights out of every cache (`cold_copies`)."""
    copies = cold_copies(w, packed) if cold else [(w, packed)]

    def once(x):
        def calls():
            for cw, cp in copies:
                matmul(x, cw, qtype, threads=threads, isa=isa, packed=cp)
        return _timed(calls) / len(copies)

    for x in xs.values():
        once(x)  # compile / warm
    best = {batch: float("inf") for batch in xs}
    elapsed = {batch: 0.0 for batch in xs}
    runs = {batch: 0 for batch in xs}
    while any(elapsed[b] < min_seconds or runs[b] < 3 for b in xs):
        for batch, x in xs.items():
            spent = 0.0
            while spent < slice_seconds or runs[batch] < 1:
                dt = once(x)
                best[batch], spent, runs[batch] = min(best[batch], dt), spent + dt, runs[batch] + 1
            elapsed[batch] += spent
    return best


def run(args) -> list[dict]:
    rng = np.random.default_rng(0)
    isa = simd.host_isa() if args.isa == "host" else simd.isa_named(args.isa)
    bandwidth = {t: read_bandwidth(t) for t in args.threads}
    rows = []
    for name in args.types:
        qtype = QType[name]
        for shape in args.shapes:
            m, k = map(int, shape.split("x"))
            if k % block_size(qtype):
                continue  # e.g. k-quants need rows of 256: llama.cpp picks another type there
            w = make_weights(qtype, m, k, rng)
            packed = pack(w, qtype)
            xs = {batch: rng.standard_normal((batch, k)).astype(np.float32) for batch in args.batches}
            for threads in args.threads:
                base_tps = None
                best = time_batches(xs, w, qtype, threads, isa, packed, cold=args.cold)
                for batch in args.batches:
                    seconds = best[batch]
                    gbps = w.nbytes / seconds / 1e9
                    tps = batch / seconds
                    base_tps = tps if batch == args.batches[0] else base_tps
                    rows.append({
                        "type": name, "shape": shape, "batch": batch, "threads": threads,
                        "ms": seconds * 1e3, "weight_gbps": gbps, "gmacs": batch * m * k / seconds / 1e9,
                        "bandwidth_gbps": bandwidth[threads][1], "ratio_to_bandwidth": gbps / bandwidth[threads][1],
                        "plain_bandwidth_gbps": bandwidth[threads][0],
                        "ratio_to_plain_bandwidth": gbps / bandwidth[threads][0],
                        "tokens_per_s_vs_first_batch": tps / base_tps,
                    })
                    if not args.json:
                        _print_row(rows[-1])
    return rows


def _print_row(r: dict) -> None:
    print(f"{r['type']:<5} {r['shape']:>11} b{r['batch']:<3} t{r['threads']}  {r['ms']:8.3f} ms  "
          f"{r['weight_gbps']:6.1f} GB/s  {r['gmacs']:7.1f} GMAC/s  {100 * r['ratio_to_bandwidth']:5.1f}% of "
          f"{r['bandwidth_gbps']:.1f} GB/s ({100 * r['ratio_to_plain_bandwidth']:5.1f}% of plain "
          f"{r['plain_bandwidth_gbps']:.1f})  x{r['tokens_per_s_vs_first_batch']:.2f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(ALL_TYPES))
    parser.add_argument("--shapes", default=",".join(ALL_SHAPES))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isa", choices=["host", "avx2", "portable"], default="host",
                        help="host: the best kernels this CPU runs")
    parser.add_argument("--cold", action="store_true", help="weights read from DRAM at each call, as in a decode step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.isa == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        from bench_engine import AVX2_ONLY

        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_ONLY}))
    args.types = args.types.split(",")
    args.shapes = args.shapes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    if not args.json:
        print(f"isa: {args.isa} (host: {simd.isa_name(simd.host_isa())}, AVX-512 kernels: {simd.has_avx512_pairs()})")
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
