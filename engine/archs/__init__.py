"""Registry of per-architecture `config_from_gguf` functions, one small module each."""

from __future__ import annotations

from collections.abc import Callable

from llmx.engine.archs import gemma3, llama, qwen2, qwen3
from llmx.engine.config import ModelConfig
from llmx.errors import UnsupportedModelError
from llmx.formats.gguf_file import GGUFFile

CONFIG_FROM_GGUF: dict[str, Callable[[GGUFFile], ModelConfig]] = {
    "llama": llama.config_from_gguf,
    "qwen2": qwen2.config_from_gguf,
    "qwen3": qwen3.config_from_gguf,
    "gemma3": gemma3.config_from_gguf,
}


def supported_architectures() -> list[str]:
    return sorted(CONFIG_FROM_GGUF)


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    arch = gguf.architecture
    make = CONFIG_FROM_GGUF.get(arch)
    if make is None:
        raise UnsupportedModelError(
            f"{gguf.path}: architecture {arch!r} is not supported; "
            f"llmx runs {', '.join(supported_architectures())}"
        )
    return make(gguf)
