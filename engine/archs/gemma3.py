"""Gemma 3: GELU-tanh gate, q/k norms, post-block norms, scaled embeddings, and
sliding-window layers (all but every 6th) that use rope base 10000."""

import math

from llmx.engine.archs.common import arch_int, base_config, layer_count
from llmx.engine.config import ModelConfig
from llmx.formats.gguf_file import GGUFFile

GLOBAL_LAYER_EVERY = 6  # layer il is global when il % 6 == 5
LOCAL_ROPE_BASE = 10000.0


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    n_layer = layer_count(gguf)
    n_embd = arch_int(gguf, "embedding_length")
    window = arch_int(gguf, "attention.sliding_window") if gguf.arch_get("attention.sliding_window") else None
    return base_config(
        gguf,
        rope_layout="neox",
        rope_base_local=LOCAL_ROPE_BASE,
        sliding_window=window,
        sliding_layers=sliding_layers(n_layer) if window else (),
        qk_norm=True,
        post_norms=True,
        scale_queries=True,
        embed_scale=math.sqrt(n_embd),
        activation="gelu_tanh",
    )


def sliding_layers(n_layer: int) -> tuple[bool, ...]:
    return tuple(il % GLOBAL_LAYER_EVERY != GLOBAL_LAYER_EVERY - 1 for il in range(n_layer))
