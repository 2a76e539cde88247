"""`ModelConfig`: everything the one Transformer needs to know about a model, as frozen flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # of queries and keys
    head_dim_v: int
    n_ctx_train: int
    rms_eps: float
    rope_layout: Literal["normal", "neox"]
    rope_base: float
    rope_dim: int
    rope_scaling: str | None = None  # "linear" or "yarn"
    rope_scale_factor: float = 1.0
    rope_orig_ctx: int = 0  # YaRN: the context the model was trained with before scaling
    rope_base_local: float | None = None  # rope base of sliding-window layers, where it differs
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it attend within the window only
    qk_norm: bool = False
    qkv_bias: bool = False
    post_norms: bool = False  # norms after attention and after the FFN (gemma)
    scale_queries: bool = False  # 1/sqrt(head_dim) multiplies q before q.k (gemma), not the scores
    embed_scale: float = 1.0
    activation: Literal["silu", "gelu_tanh"] = "silu"
    tied_output: bool = False

    def kv_tokens_cached(self, layer: int, n_ctx: int) -> int:
        """How many positions layer `layer` keeps in its KV cache for a context of `n_ctx`."""
        if self.sliding_window and self.sliding_layers and self.sliding_layers[layer]:
            return min(n_ctx, self.sliding_window)
        return n_ctx
