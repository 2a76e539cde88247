"""llmx's engine: the public API that `cli` and `server` talk to.

Importing this package stays light (numpy and gguf, no numba); heavy parts load on first use.
"""

from llmx.engine.default_model import DEFAULT_MODEL_FILE, resolve_model_path
from llmx.engine.model_info import CostInputs, describe_model, load_tokenizer, tensor_table

__all__ = [
    "DEFAULT_MODEL_FILE",
    "CostInputs",
    "describe_model",
    "load_tokenizer",
    "resolve_model_path",
    "tensor_table",
]
