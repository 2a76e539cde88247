"""`ComputeThread`: the one thread that runs a model's Numba kernels.

Numba's OpenMP layer keeps a thread team per calling thread. Once two Python threads have run
parallel kernels, the process manages more OpenMP threads than it has cores, and libgomp then
stops spinning between parallel regions (its throttled spin count): every region pays a futex
wake-up. Measured on 2 cores, gemma, 16 sequences: 29 ms a decode step from one thread, 51 ms
from a second thread after the main thread had run kernels. So the engine loop, `Model.logits`
and `Model.warm_up` all hand their forwards to one `ComputeThread`, and models served together
can share one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "llmx-compute"):
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started by the first call
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the compute thread; its result, or its exception raised here."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.submit(fn, *args).result()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        """Start fn(*args) on the compute thread; its future (the caller works meanwhile)."""
        future: Future = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=_work, args=(self._jobs,), name=self._name, daemon=True)
                self._thread.start()
            self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        """Let the thread end once the calls already posted are done."""
        self._jobs.put(None)


def _work(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        future, fn, args = job
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to the caller, which raises it
            future.set_exception(e)
