"""llmx: local, quantized LLM inference on CPU and GPU.

Kept import-light: `import llmx` and `llmx --help` must not pull in numba or the engine.
"""

__version__ = "0.1.0"
