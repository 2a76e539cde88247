"""Outputs that appear whole or not at all: written beside the target, renamed at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(target: Path) -> Path:
    """A hidden temporary name in the target's directory (so the rename stays on one filesystem)."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


@contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yields the path to write; renames it onto `target` when the block ends normally and
    removes it when the block raises (Ctrl-C included)."""
    partial = partial_path(target)
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
