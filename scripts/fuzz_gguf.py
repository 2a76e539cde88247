"""Bad GGUF files at scale: mutate the reference tiny models and load each mutant.

Every mutant must either load and run a token, or fail with one LlmxError line: no crash, hang,
traceback or memory blow-up. Mutations: the header (magic, version, counts), metadata (value
types, values, key and string lengths, array counts), tensor infos (names, dimensions, types,
offsets), general.alignment, truncation, and random bytes in the header region.

Mutants run in a worker process (so a crash is seen, not suffered); a mutant that takes longer
than --timeout is a hang, and the worker runs under a memory limit (--memory-gb) so a blow-up
is a MemoryError, counted as one.

Usage: python scripts/fuzz_gguf.py [--count 10000] [--seed 0] [--models DIR] [--json]
Exit status 1 when any mutant crashed, hung, raised a traceback or blew up memory.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAD = ("crash", "hang", "traceback", "memory")
DEFAULT_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "models"
HEADER = 24  # magic, version, tensor count, kv count
U64 = 2**64 - 1
STRING, ARRAY = 8, 9


# -- where the fields are --------------------------------------------------------------------


def layout(path: Path) -> dict:
    """Byte offsets of every metadata entry and tensor info, from gguf-py's reader."""
    import gguf

    reader = gguf.GGUFReader(path)
    kvs = [(f.offset, [p.nbytes for p in f.parts], [int(t) for t in f.types]) for f in reader.fields.values()
           if f.offset >= HEADER]
    tensors = [(t.field.offset, [p.nbytes for p in t.field.parts]) for t in reader.tensors]
    alignment = reader.fields.get("general.alignment")
    return {"kvs": kvs, "tensors": tensors, "data": tensors[-1][0] + sum(tensors[-1][1]) if tensors else HEADER,
            "alignment": alignment.offset + sum(p.nbytes for p in alignment.parts[:-1]) if alignment else None}


# -- mutations: each returns (kind, mutant bytes) -----------------------------------------------


def _put(data: bytes, at: int, value: int, size: int) -> bytes:
    return data[:at] + (value % 2 ** (8 * size)).to_bytes(size, "little") + data[at + size:]


def _interesting(rng: random.Random, size: int) -> int:
    top = 2 ** (8 * size) - 1
    return rng.choice([0, 1, 2, 3, 7, 31, 32, 33, 255, 256, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                       2**40, 2**62, top, top - 1, rng.randrange(top + 1)]) % (top + 1)


def mutate_header(rng, data, lay):
    at, size = rng.choice([(0, 4), (4, 4), (8, 8), (16, 8)])
    return "header", _put(data, at, _interesting(rng, size), size)


def mutate_kv_type(rng, data, lay):
    offset, parts, _ = rng.choice(lay["kvs"])
    at = offset + parts[0] + parts[1]
    return "kv type", _put(data, at, rng.choice([*range(13), 13, 99, 2**31, 2**32 - 1]), 4)


def mutate_kv_value(rng, data, lay):
    offset, parts, types = rng.choice(lay["kvs"])
    at = offset + sum(parts[:3])
    if types[0] == ARRAY and len(parts) > 5:  # the element type, the count, or an element
        which = rng.choice(["type", "count", "element"])
        if which == "type":
            return "kv value", _put(data, at, rng.choice([*range(13), 99]), 4)
        if which == "count":
            return "kv value", _put(data, at + 4, _interesting(rng, 8), 8)
        at += 12 + rng.randrange(max(1, sum(parts[5:]) - 8))
        return "kv value", _put(data, at, _interesting(rng, 8), 8)
    if types[0] == STRING:  # the string's length, or its bytes
        if rng.random() < 0.5:
            return "kv value", _put(data, at, _interesting(rng, 8), 8)
        return "kv value", data[:at + 8] + rng.randbytes(parts[4]) + data[at + 8 + parts[4]:]
    size = parts[3]
    return "kv value", _put(data, at, _interesting(rng, size), size)


def mutate_key(rng, data, lay):
    offset, _, _ = rng.choice(lay["kvs"])
    return "key length", _put(data, offset, _interesting(rng, 8), 8)


def mutate_tensor(rng, data, lay):
    offset, parts = rng.choice(lay["tensors"])
    name_len, name, n_dims, dims, qtype = offset, offset + 8, offset + 8 + parts[1], offset + 12 + parts[1], \
        offset + 12 + parts[1] + parts[3]
    which = rng.choice(["name length", "name", "n_dims", "dim", "type", "offset"])
    if which == "name length":
        return "tensor info", _put(data, name_len, _interesting(rng, 8), 8)
    if which == "name":
        return "tensor info", data[:name] + rng.randbytes(parts[1]) + data[name + parts[1]:]
    if which == "n_dims":
        return "tensor info", _put(data, n_dims, rng.choice([0, 1, 2, 3, 4, 5, 8, 2**31, 2**32 - 1]), 4)
    if which == "dim":
        return "tensor info", _put(data, dims + 8 * rng.randrange(max(1, parts[3] // 8)), _interesting(rng, 8), 8)
    if which == "type":
        return "tensor info", _put(data, qtype, rng.choice([*range(40), 99, 2**31, 2**32 - 1]), 4)
    return "tensor offset", _put(data, qtype + 4, _interesting(rng, 8), 8)


def mutate_alignment(rng, data, lay):
    if lay["alignment"] is None:  # no general.alignment: misalign the data by inserting bytes
        cut = lay["data"]
        return "alignment", data[:cut] + bytes(rng.randrange(1, 32)) + data[cut:]
    return "alignment", _put(data, lay["alignment"], rng.choice([0, 1, 3, 7, 16, 31, 64, 2**31, 2**32 - 1]), 4)


def mutate_truncate(rng, data, lay):
    cut = rng.choice([rng.randrange(len(data)), rng.randrange(lay["data"]), len(data) - rng.randrange(1, 64)])
    return "truncation", data[:max(cut, 0)]


def mutate_bytes(rng, data, lay):
    out = bytearray(data)
    for _ in range(rng.randrange(1, 9)):
        out[rng.randrange(min(len(out), lay["data"]))] = rng.randrange(256)
    return "random bytes", bytes(out)


MUTATIONS = [mutate_header, mutate_kv_type, mutate_kv_value, mutate_kv_value, mutate_key, mutate_tensor,
             mutate_tensor, mutate_alignment, mutate_truncate, mutate_bytes]


# -- the worker: load each mutant and run a token ------------------------------------------------


def worker(memory_gb: float) -> None:
    import resource

    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np

    import llmx
    from llmx.errors import LlmxError

    def try_one(path: str) -> dict:
        try:
            model = llmx.load(path, threads=1, ctx=64)
            model.logits(np.array([0]))
            return {"outcome": "ran"}
        except LlmxError as e:
            message = str(e)
            return {"outcome": "refused" if message and "\n" not in message else "traceback", "error": message}
        except MemoryError:
            return {"outcome": "memory"}
        except Exception as e:  # the bug this script exists to find
            return {"outcome": "traceback", "error": f"{type(e).__name__}: {e}"}

    for line in sys.stdin:
        result = try_one(line.strip())
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result), flush=True)


class Worker:
    def __init__(self, memory_gb: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--memory-gb", str(memory_gb)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, path: Path, timeout: float) -> dict:
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"outcome": "crash", "error": f"exit {self.proc.wait()}"}
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            return {"outcome": "hang"}
        line = self.proc.stdout.readline()
        if not line:
            return {"outcome": "crash", "error": f"exit {self.proc.wait()}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def fuzz(models: list[Path], count: int, seed: int, timeout: float, memory_gb: float, progress: bool) -> dict:
    rng = random.Random(seed)
    sources = [(p, p.read_bytes(), layout(p)) for p in models]
    outcomes, kinds, bad, max_rss = collections.Counter(), collections.Counter(), [], 0.0
    w = Worker(memory_gb)
    with tempfile.TemporaryDirectory() as tmp:
        for source, _, _ in sources:  # compile and load once, unmutated, outside the timeout
            assert w.run(source, 900)["outcome"] == "ran", f"{source} does not run unmutated"
        started = time.perf_counter()
        for i in range(count):
            source, data, lay = sources[i % len(sources)]
            kind, mutant = rng.choice(MUTATIONS)(rng, data, lay)
            path = Path(tmp) / f"mutant-{i}.gguf"
            path.write_bytes(mutant)
            result = w.run(path, timeout)
            outcomes[result["outcome"]] += 1
            kinds[kind] += 1
            max_rss = max(max_rss, result.get("max_rss_mb", 0.0))
            if result["outcome"] in BAD:
                kept = Path(tmp).parent / f"llmx-fuzz-{seed}-{i}.gguf"
                kept.write_bytes(mutant)
                bad.append({"mutant": i, "source": source.name, "kind": kind, "kept": str(kept), **result})
                if result["outcome"] in ("crash", "hang"):
                    w = Worker(memory_gb)
            path.unlink()
            if progress and (i + 1) % 500 == 0:
                print(f"{i + 1} mutants, {dict(outcomes)}", file=sys.stderr, flush=True)
    w.close()
    return {"mutants": count, "seed": seed, "outcomes": dict(outcomes), "mutations": dict(kinds),
            "worker_max_rss_mb": round(max_rss, 1), "seconds": round(time.perf_counter() - started, 1),
            "bad": bad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=Path, default=Path(os.environ.get("LLMX_REFERENCE_DIR", "")) / "models"
                        if os.environ.get("LLMX_REFERENCE_DIR") else DEFAULT_MODELS)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a mutant counts as a hang")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="the worker's address-space limit")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.memory_gb)
        return
    models = sorted(args.models.glob("tiny-*.gguf"))
    if not models:
        sys.exit(f"error: no tiny-*.gguf models in {args.models}")
    report = fuzz(models, args.count, args.seed, args.timeout, args.memory_gb, progress=not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['mutants']} mutants of {len(models)} models in {report['seconds']} s (seed {args.seed})")
        print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items())))
        print("mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(report["mutations"].items())))
        print(f"worker peak RSS {report['worker_max_rss_mb']} MB")
        for b in report["bad"]:
            print(f"BAD {b}")
    sys.exit(1 if report["bad"] else 0)


if __name__ == "__main__":
    main()
