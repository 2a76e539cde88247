"""Llama 2/3, Mistral, TinyLlama, SmolLM: the plain pre-norm transformer, normal rope layout."""

from llmx.engine.archs.common import base_config
from llmx.engine.config import ModelConfig
from llmx.formats.gguf_file import GGUFFile


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    return base_config(gguf, rope_layout="normal")
