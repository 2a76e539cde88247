"""Is there a GPU llmx can use? Asked before anything CUDA is imported for real."""

from __future__ import annotations

import functools

INSTALL_HINT = "pip install 'llmx[cuda]'"


@functools.cache
def cuda_problem() -> str | None:
    """None when numba-cuda is installed and sees a GPU (or numba's CUDA simulator is on, which
    the tests use); otherwise what is missing, in one line."""
    try:
        from numba import cuda
    except ImportError:
        return f"numba-cuda is not installed ({INSTALL_HINT})"
    if simulated():
        return None
    try:
        if not cuda.is_available():
            return "no CUDA driver or NVIDIA GPU found (nvidia-smi should list one)"
        if len(cuda.gpus) == 0:
            return "no NVIDIA GPU found"
    except Exception as error:  # the driver's own words, on one line
        return f"CUDA is not usable here: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return None


def simulated() -> bool:
    """Whether numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM=1, read by numba)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)
