"""What every architecture reads the same way from `{arch}.*` keys."""

from __future__ import annotations

from typing import Any

from gguf import Keys

from llmx.engine.config import ModelConfig
from llmx.errors import GGUFError
from llmx.formats.gguf_file import GGUFFile


def base_config(gguf: GGUFFile, **flags: Any) -> ModelConfig:
    """A config from the standard keys; `flags` set what the architecture decides."""
    n_embd = arch_int(gguf, "embedding_length")
    n_head = arch_int(gguf, "attention.head_count")
    head_dim = arch_int(gguf, "attention.key_length", n_embd // n_head)
    values: dict[str, Any] = dict(
        arch=gguf.architecture,
        n_vocab=_vocab_size(gguf),
        n_embd=n_embd,
        n_layer=layer_count(gguf),
        n_ff=arch_int(gguf, "feed_forward_length"),
        n_head=n_head,
        n_head_kv=arch_int(gguf, "attention.head_count_kv", n_head),
        head_dim=head_dim,
        head_dim_v=arch_int(gguf, "attention.value_length", head_dim),
        n_ctx_train=arch_int(gguf, "context_length", 2048),
        rms_eps=arch_float(gguf, "attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=arch_float(gguf, "rope.freq_base", 10000.0),
        rope_dim=arch_int(gguf, "rope.dimension_count", head_dim),
        rope_scaling=_rope_scaling(gguf),
        rope_scale_factor=arch_float(gguf, "rope.scaling.factor", 1.0),
        rope_orig_ctx=arch_int(gguf, "rope.scaling.original_context_length", arch_int(gguf, "context_length", 2048)),
        tied_output="output.weight" not in gguf.tensors,
        qkv_bias="blk.0.attn_q.bias" in gguf.tensors,
    )
    values.update(flags)
    return ModelConfig(**values)


def arch_int(gguf: GGUFFile, suffix: str, default: int | None = None) -> int:
    """A positive integer `{arch}.{suffix}`; required when there is no default."""
    value = gguf.arch_get(suffix, default) if default is not None else gguf.arch_require(suffix)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GGUFError(f"{gguf.path}: {gguf.arch_key(suffix)} = {value!r} must be a positive integer")
    return value


def layer_count(gguf: GGUFFile) -> int:
    """`{arch}.block_count`, which sizes per-layer work before any tensor is read: every layer has
    tensors, so a count above the file's tensor count is a corrupt file, refused here."""
    n_layer = arch_int(gguf, "block_count")
    if n_layer > len(gguf.tensors):
        raise GGUFError(f"{gguf.path}: {gguf.arch_key('block_count')} = {n_layer} but the file has only "
                        f"{len(gguf.tensors)} tensors")
    return n_layer


def arch_float(gguf: GGUFFile, suffix: str, default: float) -> float:
    value = gguf.arch_get(suffix, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise GGUFError(f"{gguf.path}: {gguf.arch_key(suffix)} = {value!r} must be a positive number")
    return float(value)


def _vocab_size(gguf: GGUFFile) -> int:
    tokens = gguf.get(Keys.Tokenizer.LIST)
    return len(tokens) if isinstance(tokens, list) else arch_int(gguf, "vocab_size")


def _rope_scaling(gguf: GGUFFile) -> str | None:
    kind = gguf.arch_get("rope.scaling.type")
    return None if kind in (None, "none") else str(kind)
