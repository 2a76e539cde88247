"""Backends: where a forward pass computes (DESIGN principle 5b).

The `Transformer` calls the same small set of operations on either backend (embed, rms_norm,
linear/linears, norm_rope, add_rms_norm, activate, kv_write, attend, rows, to_host); "cpu" holds numpy
arrays and runs Numba kernels (`backends.cpu`), "cuda" holds numba.cuda device arrays and runs
the kernels of `quant.cuda` (`backends.cuda`, imported only when asked for).
"""

from __future__ import annotations

from typing import Any

from llmx.engine.backends.cpu import CpuBackend, will_pack
from llmx.engine.config import ModelConfig
from llmx.errors import UsageError
from llmx.formats.gguf_file import GGUFTensor

DEVICES = ("cpu", "cuda", "auto")

__all__ = ["DEVICES", "CpuBackend", "make_backend", "resolve_device", "will_pack"]


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for a device name; "auto" is CUDA when a usable GPU is present. Naming
    "cuda" without one is a one-line `UsageError` saying what is missing."""
    if device not in DEVICES:
        raise UsageError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    from llmx.engine.backends.probe import cuda_problem, simulated

    problem = cuda_problem()
    if device == "auto":  # (numba's CUDA simulator is for tests: "auto" never picks it)
        return "cuda" if problem is None and not simulated() else "cpu"
    if problem is None:
        return "cuda"
    raise UsageError(f"--device cuda: {problem}")


def make_backend(device: str, config: ModelConfig, tensors: dict[str, GGUFTensor], threads: int | None = None,
                 isa: Any = None):
    """The backend of `device` ("cpu" or "cuda"), holding the model's weights its own way."""
    if device == "cpu":
        return CpuBackend(config, tensors, threads, isa)
    from llmx.engine.backends.cuda import CudaBackend

    return CudaBackend(config, tensors)
