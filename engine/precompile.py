"""A first run compiles its kernels on two cores instead of one.

Numba compiles one function at a time per process (a global lock), and a model's kernels take
tens of seconds to compile. So on a cold kernel cache the CLI starts a helper process that
compiles the matmul kernels (every weight type of this model, for each row count that picks a
different kernel) while this process compiles everything else, running forwards with the
matmuls stubbed out. Each matmul then waits until the helper reports its kernels (for its row
count and its kind of weight) done, and loads them from Numba's on-disk cache instead of compiling them again.

The helper compiles prompt shapes first, so the first token does not wait for the decode
kernels; once the run that started it has ended, it compiles one bound single-token step
(`cpu_decode`). It finishes even when that run ends early (`-n 1`), writing a marker that tells
later runs the cache is warm for this model.

    python -m llmx.engine.precompile MODEL --isa NAME [--threads N] [--use-mmap]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

# What this process runs with the matmuls stubbed. Not 16: the many-row variants of the other
# kernels (elementwise.PARALLEL_ROWS) compile when a long prompt or a big batch first needs them,
# so a short first prompt does not wait for them.
STUB_ROWS = (2, 1)
KERNEL_SOURCES = ("quant/cpu", "engine")


def row_classes(n_rows: int) -> tuple[int, ...]:
    """Row counts that select different matmul kernels (1: one token; 2: per-row k-quant decode
    and token pairs; 4: k-quant pairs; 16: token lanes): the ones a matmul of `n_rows` rows runs
    (20 rows: 16 in lanes, then 4 in pairs)."""
    if n_rows == 1:
        return (1,)
    return (2,) if n_rows < 4 else (2, 4) if n_rows < 16 else (2, 4, 16)


def weight_kind(backend, name: str) -> tuple:
    """What picks a weight's matmul kernels: its type, whether it is repacked, and whether its rows
    are long enough for token lanes (`linear.TOKEN_LANES_MIN_K`)."""
    from llmx.quant.cpu.linear import TOKEN_LANES_MIN_K

    t = backend.tensors[f"{name}.weight"]
    return t.qtype.name, backend.is_packed(name), t.shape[0] >= TOKEN_LANES_MIN_K


def output_name(backend) -> str:
    return "token_embd" if backend.config.tied_output else "output"


def jobs(backend) -> list[tuple[int, str]]:
    """(rows, representative weight) in the order the helper compiles them: what a short first
    prompt needs (two rows everywhere, then the output layer's one row, which samples the first
    token), then longer prompts and batches, then decoding's one row."""
    names = representative_weights(backend)
    out = output_name(backend)
    order = [(2, n) for n in names] + [(1, out)] + [(4, n) for n in names] + [(16, n) for n in names]
    return order + [(1, n) for n in names if n != out]


def marker(path: Path, isa: str | None, use_mmap: bool) -> Path:
    """A file whose presence says every kernel the model at `path` runs is in the cache: keyed by
    what the kernels' code depends on (numba, llmx's kernel sources, the instruction set and
    Numba's target CPU, the model file), and cheap to check before the model loads."""
    from importlib.metadata import version

    from llmx.paths import file_identity, kernel_cache_dir

    root = Path(__file__).resolve().parents[1]
    sources = sorted(p for folder in KERNEL_SOURCES for p in (root / folder).glob("*.py"))
    key = repr((version("numba"), [(p.name, p.stat().st_mtime_ns) for p in sources], isa,
                os.environ.get("NUMBA_CPU_NAME"), use_mmap, file_identity(path)))
    return kernel_cache_dir() / f"warm-{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}"


class Helper:
    """The helper process, as this process sees it: which (rows, weight) it has reported done."""

    def __init__(self, path: Path, isa: str | None, threads: int | None, use_mmap: bool):
        args = [sys.executable, "-m", "llmx.engine.precompile", str(path)]
        args += (["--isa", isa] if isa else []) + (["--threads", str(threads)] if threads else [])
        args += ["--use-mmap"] if use_mmap else []
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)  # it finishes the cache even if we end first
        self.done: set[tuple[int, str]] = set()  # (rows, representative weight name)
        self.finished = False
        self.changed = threading.Condition()
        self.representative: dict[tuple, str] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            rows, name = line.split()
            with self.changed:
                self.done.add((int(rows), name))
                self.changed.notify_all()
        with self.changed:  # it ended (all done, or failed): nothing more to wait for
            self.finished = True
            self.changed.notify_all()

    def wait(self, backend, n_rows: int, name: str) -> None:
        if not self.representative:
            self.representative = {weight_kind(backend, n): n for n in representative_weights(backend)}
        rep = self.representative.get(weight_kind(backend, name), name)
        needed = {(rows, rep) for rows in row_classes(n_rows)}
        with self.changed:
            self.changed.wait_for(lambda: self.finished or self.done.issuperset(needed))


def start_helper(path: Path, isa: str | None = None, threads: int | None = None,
                 use_mmap: bool = False) -> Helper | None:
    """The helper for the model at `path` when the cache is cold for it (else None). Start it
    before loading the model here: it loads its own copy meanwhile."""
    return None if marker(path, isa, use_mmap).exists() else Helper(path, isa, threads, use_mmap)


def compile_in_parallel(model, helper: Helper) -> None:
    """Compile the non-matmul kernels here while `helper` compiles the matmuls, and make the
    model's forwards wait for the helper's kernels where they need them."""
    backend = model.transformer.backend
    backend.stub_matmuls = True
    try:
        for n in STUB_ROWS:
            model.compute.call(_forward, model, n)
    finally:
        backend.stub_matmuls = False

    def wait(n_rows: int, name: str) -> None:
        helper.wait(backend, n_rows, name)
        if helper.finished:
            backend.await_kernels = None

    backend.await_kernels = wait


def _forward(model, n_rows: int) -> None:
    from llmx.engine.kv_cache import KVCache

    cache = KVCache(model.config, n_rows)
    model.transformer.forward(np.zeros(n_rows, np.int64), cache.new_sequence(), cache, "last")


def _decode_steps(model) -> None:
    """A two-token prompt and one decoded token: the step that `CpuBackend.decode_row` binds,
    whose fused kernels the run that started us then loads (it takes that step once we are done)."""
    from llmx.engine.kv_cache import KVCache

    cache = KVCache(model.config, 3)
    seq = cache.new_sequence()
    model.transformer.forward(np.zeros(2, np.int64), seq, cache, "last")
    model.transformer.forward(np.zeros(1, np.int64), seq, cache, "last")


def representative_weights(backend) -> list[str]:
    """One matmul weight per `weight_kind`, the output layer's first."""
    out = output_name(backend)
    names = [out] + [name[: -len(".weight")] for name, t in backend.tensors.items()
                     if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2]
    seen: dict[tuple, str] = {}
    for name in names:
        seen.setdefault(weight_kind(backend, name), name)
    return list(seen.values())


PARENT_WAIT_S = 120.0


def compile_matmuls(model, done: Path) -> None:
    """The helper's work: every matmul kernel of the model, job by job, reported on stdout; then
    the single-token step's kernels; then the marker `done`."""
    parent = os.getppid()
    for rows, name in jobs(model.transformer.backend):
        k = model.transformer.backend.tensors[f"{name}.weight"].shape[0]
        model.compute.call(model.transformer.backend.linears, np.ones((rows, k), np.float32), name)
        _report(f"{rows} {name}")
    # Then the single-token step's own kernels (`cpu_decode`), once the run that started us has
    # ended (or after PARENT_WAIT_S), at the lowest priority: compiled beside that run's prompt, even
    # at nice 19, they made a first `llmx run -n 1` 3 s longer (11.2-11.8 -> 14.7-14.9 s). Until
    # we finish, that run decodes through the generic blocks.
    _wait_for_parent_exit(parent, PARENT_WAIT_S)
    _lowest_priority()
    model.compute.call(_decode_steps, model)
    _report("1 decode-step")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()


def _wait_for_parent_exit(parent: int, limit_s: float) -> None:
    """Until the process that started us has ended (we are handed to another parent), or limit_s."""
    import time

    deadline = time.monotonic() + limit_s
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.1)


def _lowest_priority() -> None:
    """Nice 19 for every thread of this process (Linux gives each thread its own nice value: the
    compute thread and Numba's workers too)."""
    tasks = Path("/proc/self/task")
    for tid in (int(t.name) for t in tasks.iterdir()) if tasks.is_dir() else [0]:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, 19)


def _report(line: str) -> None:
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):  # the run that started us ended: finish the cache anyway
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115


def main() -> None:
    import argparse
    import signal

    from llmx.engine.model import Model

    parser = argparse.ArgumentParser(description="compile a model's matmul kernels into the cache")
    parser.add_argument("model", type=Path)
    parser.add_argument("--isa")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--use-mmap", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # the run that started us may end first: see _report
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is for that run, not us
    model = Model(args.model, threads=args.threads, use_mmap=args.use_mmap, isa=args.isa)
    compile_matmuls(model, marker(args.model, args.isa, args.use_mmap))


if __name__ == "__main__":
    main()
