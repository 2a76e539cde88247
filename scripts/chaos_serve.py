"""Chaos against a real `llmx serve` on loopback: many requests at once, some dropped midway.

Starts `llmx serve MODEL` on a free loopback port (no Unix socket), computes each (prompt, length)
pair's solo text one request at a time, then sends --requests requests from --concurrency
clients at once, mixing streaming SSE, plain JSON and WebSocket turns; a --disconnect share of
them hang up at a random point (mid-stream, or by a timeout for plain requests). It stops by
itself and exits non-zero when any of these fails:
- no response has a 5xx status;
- every request that was not dropped gets exactly its solo text (temperature 0);
- afterwards /metrics shows 0 running and 0 waiting, and the KV blocks in use are the prefix
  cache's own;
- the server's RSS grew by less than --max-rss-growth-mb (measured after the solo pass).

Usage: python scripts/chaos_serve.py [MODEL] [--requests 2000] [--concurrency 32] [--disconnect 0.1]
       [--seed 0] [-t 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [f"{topic} is" for topic in ("The sea", "A good map", "My neighbour's cat", "Winter in the mountains",
                                       "The first computer", "Bread", "A quiet library", "The old bridge",
                                       "Jazz music", "The moon landing", "Learning to swim", "A red bicycle")]
LENGTHS = (4, 8, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


class Chaos:
    def __init__(self, url: str, solo: dict[tuple[str, str, int], str], disconnect: float, rng: random.Random):
        self.url, self.solo, self.disconnect, self.rng = url, solo, disconnect, rng
        self.counts = {"ok": 0, "dropped": 0, "5xx": 0, "wrong_text": 0, "other_error": 0}
        self.failures: list[str] = []

    def _record(self, key: str, detail: str = "") -> None:
        self.counts[key] += 1
        if detail and len(self.failures) < 20:
            self.failures.append(detail)

    async def one(self, client: httpx.AsyncClient) -> None:
        prompt, n = self.rng.choice(PROMPTS), self.rng.choice(LENGTHS)
        kind = self.rng.choice(("stream", "json", "ws"))
        drop = self.rng.random() < self.disconnect
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        try:
            text = await getattr(self, f"_{kind}")(client, body, drop)
        except httpx.HTTPStatusError as e:
            self._record("5xx" if e.response.status_code >= 500 else "other_error", f"{kind}: {e}")
            return
        except (httpx.TimeoutException, asyncio.TimeoutError):
            self._record("dropped" if drop else "other_error", f"{kind}: timeout")
            return
        expected = self.solo["chat" if kind == "ws" else "completion", prompt, n]
        if text is None:
            self._record("dropped")
        elif text == expected:
            self._record("ok")
        else:
            self._record("wrong_text", f"{kind} {prompt!r} {n}: {text!r} != {expected!r}")

    async def _json(self, client: httpx.AsyncClient, body: dict, drop: bool) -> str | None:
        timeout = self.rng.uniform(0.01, 0.3) if drop else 300
        r = await client.post(self.url + "/v1/completions", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    async def _stream(self, client: httpx.AsyncClient, body: dict, drop: bool) -> str | None:
        stop_after = self.rng.randrange(0, 4) if drop else None
        pieces = []
        async with client.stream("POST", self.url + "/v1/completions", json={**body, "stream": True},
                                 timeout=300) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if stop_after is not None and len(pieces) >= stop_after:
                    return None  # leaving the block closes the connection mid-stream
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        return None if drop else "".join(pieces)

    async def _ws(self, client: httpx.AsyncClient, body: dict, drop: bool) -> str | None:
        from websockets.asyncio.client import connect

        stop_after = self.rng.randrange(0, 3) if drop else None
        turn = {"messages": [{"role": "user", "content": body["prompt"]}], "max_tokens": body["max_tokens"],
                "temperature": 0}
        async with connect(self.url.replace("http", "ws") + "/v1/ws") as ws:
            await ws.send(json.dumps(turn))
            deltas = []
            while True:
                if stop_after is not None and len(deltas) >= stop_after:
                    return None
                event = json.loads(await asyncio.wait_for(ws.recv(), 300))
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if event.get("done"):
                    return "".join(deltas)
                deltas.append(event["delta"])


async def run_chaos(url: str, chaos: Chaos, n_requests: int, concurrency: int) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(n_requests):
        queue.put_nowait(None)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await chaos.one(client)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def solo_texts(url: str) -> dict[tuple[str, str, int], str]:
    """Each (kind, prompt, length)'s text, one request at a time: "completion" for SSE and plain
    requests, "chat" (the prompt as a user turn) for WebSocket turns."""
    solo = {}
    for prompt in PROMPTS:
        for n in LENGTHS:
            body = {"max_tokens": n, "temperature": 0}
            r = httpx.post(url + "/v1/completions", json={**body, "prompt": prompt}, timeout=300)
            solo["completion", prompt, n] = r.json()["choices"][0]["text"]
            r = httpx.post(url + "/v1/chat/completions", json={**body, "messages": [{"role": "user",
                                                                                     "content": prompt}]}, timeout=300)
            solo["chat", prompt, n] = r.json()["choices"][0]["message"]["content"]
    return solo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmx.cli.main", "serve", *([args.model] if args.model else []), "--port",
               str(port), "--no-socket", "-t", str(args.threads)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        return _drive(proc, url, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _drive(proc: subprocess.Popen, url: str, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"llmx serve did not come up: {proc.stderr.read().decode()[-2000:]}")
                return 1
            time.sleep(0.3)
    solo = solo_texts(url)
    rss_before = rss_mb(proc.pid)
    chaos = Chaos(url, solo, args.disconnect, random.Random(args.seed))
    started = time.monotonic()
    asyncio.run(run_chaos(url, chaos, args.requests, args.concurrency))
    elapsed = time.monotonic() - started
    metrics = _settled_metrics(url)
    rss_growth = rss_mb(proc.pid) - rss_before
    checks = {
        "no 5xx": chaos.counts["5xx"] == 0,
        "every kept request got its solo text": chaos.counts["wrong_text"] == 0 and chaos.counts["other_error"] == 0,
        "0 running, 0 waiting": metric(metrics, "llmx_requests_running") == 0
        and metric(metrics, "llmx_requests_waiting") == 0,
        "KV blocks back to the prefix cache's": metric(metrics, "llmx_kv_blocks_used")
        == metric(metrics, "llmx_kv_blocks_cached"),
        f"RSS grew < {args.max_rss_growth_mb:.0f} MB": rss_growth < args.max_rss_growth_mb,
    }
    print(f"{args.requests} requests, {args.concurrency} at once, {elapsed:.1f} s: {chaos.counts}; "
          f"RSS +{rss_growth:.1f} MB")
    for failure in chaos.failures:
        print("  ", failure)
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


def _settled_metrics(url: str) -> str:
    """/metrics once the engine has caught up with the cancellations (at most 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        if metric(text, "llmx_requests_running") == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
