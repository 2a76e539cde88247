"""Qwen3: NeoX rope, RMSNorm on queries and keys per head, no biases."""

from llmx.engine.archs.common import base_config
from llmx.engine.config import ModelConfig
from llmx.formats.gguf_file import GGUFFile


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    return base_config(gguf, rope_layout="neox", qk_norm=True)
