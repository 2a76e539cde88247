"""`llmx quantize` against llama.cpp's `llama_model_quantize` on one F32 base, in one run.

For each mix: wall time of both at the same thread count (llmx in a fresh process, as a user
runs it; llama.cpp through llama-cpp-python's binding), the median of --reps alternating runs
each (the disk cache makes single runs noisy), llmx's peak RSS, whether the two files
hold the same tensor types and bytes, and (with --kld TEXT) each file's mean KL divergence from
the base over TEXT, as `llmx perplexity --kl-divergence` measures it. With --imatrix FILE, llmx
also quantizes with that importance matrix (llama.cpp's binding cannot take one from Python).
llama-cpp-python is a benchmark-only dependency.

Usage: python scripts/quantize_vs_llamacpp.py BASE.gguf OUT_DIR [--mixes Q4_K_M,Q3_K_M,Q2_K]
           [--threads 2] [--reps 5] [--kld gpl-3.txt --chunks 8] [--imatrix imatrix.gguf]
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

from llmx.formats.gguf_file import GGUFFile
from llmx.quant.mixes import MIXES


def llama_cpp_quantize(base: Path, out: Path, mix: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix].file_type)
    params.nthread = threads
    started = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return time.perf_counter() - started


def llmx_quantize(base: Path, out: Path, mix: str, threads: int, imatrix: Path | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `llmx quantize` in a child process."""
    cmd = [sys.executable, "-m", "llmx.cli.main", "quantize", str(base), str(out), mix, "-t", str(threads)]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not all children's
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"llmx quantize {mix} failed")
    return seconds, usage.ru_maxrss / 1024


def compare_files(ours: Path, theirs: Path) -> dict:
    a, b = GGUFFile.open(ours), GGUFFile.open(theirs)
    same_types = all(a.tensors[n].qtype == t.qtype for n, t in b.tensors.items())
    differing = [n for n, t in b.tensors.items()
                 if not np.array_equal(np.asarray(a.tensors[n].data).view(np.uint8), np.asarray(t.data).view(np.uint8))]
    return {"same_types": same_types, "tensors": len(b.tensors), "differing_tensors": differing}


def mean_kld(model: Path, base_logits: Path, chunks: int) -> float:
    out = subprocess.run([sys.executable, "-m", "llmx.cli.main", "perplexity", str(model), "--kl-divergence-base",
                          str(base_logits), "--kl-divergence", "--chunks", str(chunks)],
                         check=True, capture_output=True).stdout.decode()
    return float(out.split("Mean    KLD:")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mixes", default="Q4_K_M,Q3_K_M,Q2_K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--kld", type=Path, help="text for the KL divergence from the base")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--imatrix", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base_logits = args.out_dir / "base.kld"
    if args.kld and not base_logits.exists():
        subprocess.run([sys.executable, "-m", "llmx.cli.main", "perplexity", str(args.base), "-f", str(args.kld),
                        "--chunks", str(args.chunks), "--kl-divergence-base", str(base_logits)],
                       check=True, capture_output=True)
    rows = []
    for mix in args.mixes.split(","):
        ours, theirs = args.out_dir / f"llmx-{mix}.gguf", args.out_dir / f"llamacpp-{mix}.gguf"
        llama_runs, llmx_runs = [], []
        for _ in range(args.reps):
            llama_runs.append(llama_cpp_quantize(args.base, theirs, mix, args.threads))
            seconds, rss = llmx_quantize(args.base, ours, mix, args.threads)
            llmx_runs.append(seconds)
        llama_s, llmx_s = statistics.median(llama_runs), statistics.median(llmx_runs)
        row = {"mix": mix, "llmx_s": round(llmx_s, 2), "llamacpp_s": round(llama_s, 2),
               "ratio": round(llmx_s / llama_s, 2), "llmx_peak_rss_mb": round(rss), **compare_files(ours, theirs)}
        if args.kld:
            row["kld_llmx"] = mean_kld(ours, base_logits, args.chunks)
            row["kld_llamacpp"] = mean_kld(theirs, base_logits, args.chunks)
        if args.imatrix:
            with_imatrix = args.out_dir / f"llmx-{mix}-imatrix.gguf"
            llmx_quantize(args.base, with_imatrix, mix, args.threads, args.imatrix)
            if args.kld:
                row["kld_llmx_imatrix"] = mean_kld(with_imatrix, base_logits, args.chunks)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
