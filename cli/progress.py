"""Progress of `llmx quantize`: a rich bar on a terminal, plain lines in a pipe or log."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def quantize_progress(plans) -> Iterator[Callable]:
    """Yields the per-tensor callback: tensors done/total, MB/s of input read, ETA."""
    if not sys.stderr.isatty():
        yield _plain_lines(len(plans))
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    total = sum(p.tensor.nbytes for p in plans)
    columns = [TextColumn("quantizing"), BarColumn(), TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
               TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("quantize", total=total, done=0, count=len(plans))
        done = 0

        def advance(plan) -> None:
            nonlocal done
            done += 1
            progress.update(task, advance=plan.tensor.nbytes, done=done)

        yield advance


def _plain_lines(count: int) -> Callable:
    done = 0

    def line(plan) -> None:
        nonlocal done
        done += 1
        t = plan.tensor
        sys.stderr.write(f"[{done:4d}/{count}] {t.name} {t.qtype.name} -> {plan.target.name} "
                         f"({t.nbytes / 2**20:.2f} MiB -> {plan.nbytes / 2**20:.2f} MiB)\n")
        sys.stderr.flush()

    return line
