"""llmx: local, quantized LLM inference on CPU and GPU.

Kept import-light: `import llmx` and `llmx --help` must not pull in numba or the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmx.paths import use_kernel_cache_dir

__version__ = "0.1.0"
use_kernel_cache_dir()  # before any kernel module: compiled kernels go to $LLMX_CACHE_DIR, not site-packages

if TYPE_CHECKING:
    from llmx.engine.engine import Engine
    from llmx.engine.model import Model

__all__ = ["Engine", "load"]


def __getattr__(name: str):
    if name == "Engine":  # imported on first use: `import llmx` stays light
        from llmx.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'llmx' has no attribute {name!r}")


def load(path: str | Path | None = None, threads: int | None = None, ctx: int = 4096, device: str = "cpu",
         cache_dir: str | Path | None = None, use_mmap: bool = False, isa: str | None = None) -> Model:
    """Open a GGUF model (the default gemma-3-270m when `path` is None) for inference. The weights
    are read into memory; `use_mmap=True` computes on the file's mmap instead (slower decoding).
    `isa` forces "avx2", "vnni" or "portable" kernels (default: the best this CPU runs)."""
    from llmx.engine.default_model import resolve_model_path
    from llmx.engine.model import Model
    from llmx.paths import cache_dir as default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return Model(resolve_model_path(path, cache), threads=threads, ctx=ctx, device=device, use_mmap=use_mmap,
                 isa=isa)
