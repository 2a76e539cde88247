"""Where llmx keeps what it writes: models, kernel caches, the serve socket.

Kept import-light: `llmx/__init__` points Numba's on-disk cache here before any kernel module
is imported, so nothing is ever written into the installed package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    """$LLMX_CACHE_DIR, else the XDG cache dir's llmx folder (~/.cache/llmx)."""
    if os.environ.get("LLMX_CACHE_DIR"):
        return Path(os.environ["LLMX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmx"


def file_identity(path: Path) -> str:
    """Names a file's current contents for cache keys: its resolved path, size and mtime (a
    changed or replaced file gets a new key)."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def kernel_cache_dir() -> Path:
    """Numba's compiled kernels: NUMBA_CACHE_DIR when the user set one, else under cache_dir()."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or cache_dir() / "numba")


def use_kernel_cache_dir() -> None:
    """Point Numba's cache at kernel_cache_dir(). Numba reads NUMBA_CACHE_DIR when it is first
    imported, and each `cache=True` function picks its folder when its module is imported, so this
    runs before any llmx kernel module (if numba is already imported, its config is set directly)."""
    folder = str(kernel_cache_dir())
    os.environ["NUMBA_CACHE_DIR"] = folder
    if "numba" in sys.modules:
        from numba.core import config

        config.CACHE_DIR = folder
