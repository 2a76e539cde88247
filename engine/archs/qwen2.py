"""Qwen2 / Qwen2.5: llama with q/k/v biases and the NeoX rope layout."""

from llmx.engine.archs.common import base_config
from llmx.engine.config import ModelConfig
from llmx.formats.gguf_file import GGUFFile


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    return base_config(gguf, rope_layout="neox")
