"""llmx's engine: the public API that `cli` and `server` talk to.

Importing this package is free: its names load on first use (`llmx run` through a server needs
`default_model` only, not the GGUF reader behind `model_info`).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "DEFAULT_MODEL_FILE": "default_model",
    "resolve_model_path": "default_model",
    "CostInputs": "model_info",
    "describe_model": "model_info",
    "load_tokenizer": "model_info",
    "tensor_table": "model_info",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'llmx.engine' has no attribute {name!r}")
    return getattr(import_module(f"llmx.engine.{_WHERE[name]}"), name)
