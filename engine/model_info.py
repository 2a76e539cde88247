"""What `llmx info` reports about a model file, as plain data (no printing here)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import Keys, LlamaFileType

from llmx.engine.archs import CONFIG_FROM_GGUF, config_from_gguf
from llmx.engine.archs.common import arch_int
from llmx.engine.config import ModelConfig
from llmx.errors import UsageError
from llmx.formats.chat_template import chat_template_for
from llmx.formats.gguf_file import GGUFFile
from llmx.formats.tokenizer import Tokenizer
from llmx.formats.vocab import describe_tokenizer
from llmx.quant.qtypes import QType, block_size, type_size

# Bytes per cached K or V element for the cache types llmx offers.
KV_CACHE_TYPES = {"F16": type_size(QType.F16) / block_size(QType.F16),
                  "Q8_0": type_size(QType.Q8_0) / block_size(QType.Q8_0)}


@dataclass(frozen=True)
class CostInputs:
    requests_per_month: float
    tokens_per_request: float
    gpu_seconds_per_token: float
    dollars_per_hour: float


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile.open(path))


def describe_model(path: Path, ctx: int | None = None, parallel: int = 1,
                   cost: CostInputs | None = None, device: str = "cpu") -> dict[str, Any]:
    gguf = GGUFFile.open(path)
    config = config_from_gguf(gguf) if gguf.architecture in CONFIG_FROM_GGUF else None
    n_ctx = ctx if ctx is not None else _context_length(gguf)
    if n_ctx <= 0 or parallel <= 0:
        raise UsageError("--ctx and --parallel must be positive")
    info: dict[str, Any] = {
        "path": str(path),
        "name": gguf.get(Keys.General.NAME),
        "architecture": gguf.architecture,
        "supported": config is not None,
        "gguf_version": gguf.version,
        "file_size": gguf.file_size,
        "file_type": _file_type(gguf),
        "parameters": sum(t.n_elements for t in gguf.tensors.values()),
        "tensor_count": len(gguf.tensors),
        "tensor_types": _tensor_types(gguf),
        **_shape_info(gguf, config),
        **_tokenizer_info(gguf),
        "memory": _memory(gguf, config, n_ctx, parallel),
    }
    if device == "cuda" and config is not None:
        info["memory"]["cuda"] = _device_memory(gguf, config, info["memory"], parallel)
    if cost is not None:
        info["cost"] = monthly_cost(cost)
    return info


def tensor_table(path: Path) -> list[dict[str, Any]]:
    """One row per tensor, in file order: name, type, GGML shape, bytes, offset."""
    gguf = GGUFFile.open(path)
    return [
        {"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes, "offset": t.offset}
        for t in gguf.tensors.values()
    ]


def monthly_cost(c: CostInputs) -> dict[str, float]:
    """GPU hours and dollars a month: requests x tokens x seconds per token, priced by the hour."""
    gpu_hours = c.requests_per_month * c.tokens_per_request * c.gpu_seconds_per_token / 3600.0
    return {"gpu_hours_per_month": gpu_hours, "dollars_per_month": gpu_hours * c.dollars_per_hour}


def _context_length(gguf: GGUFFile) -> int:
    return arch_int(gguf, "context_length", 2048)


def _file_type(gguf: GGUFFile) -> str | None:
    raw = gguf.get(Keys.General.FILE_TYPE)
    if raw is None:
        return None
    try:
        return LlamaFileType(raw).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown ({raw})"


def _tensor_types(gguf: GGUFFile) -> dict[str, dict[str, int]]:
    counts = Counter(t.qtype.name for t in gguf.tensors.values())
    nbytes: Counter[str] = Counter()
    for t in gguf.tensors.values():
        nbytes[t.qtype.name] += t.nbytes
    return {name: {"count": counts[name], "bytes": nbytes[name]} for name in sorted(counts)}


def _shape_info(gguf: GGUFFile, config: ModelConfig | None) -> dict[str, Any]:
    if config is not None:
        return {
            "context_length": config.n_ctx_train,
            "layers": config.n_layer,
            "embedding_length": config.n_embd,
            "heads": config.n_head,
            "kv_heads": config.n_head_kv,
            "head_dim": config.head_dim,
            "sliding_window": config.sliding_window,
            "sliding_window_layers": sum(config.sliding_layers),
        }
    # An architecture llmx cannot run still gets the standard keys it has.
    head_count = gguf.arch_get("attention.head_count")
    return {
        "context_length": gguf.arch_get("context_length"),
        "layers": gguf.arch_get("block_count"),
        "embedding_length": gguf.arch_get("embedding_length"),
        "heads": head_count,
        "kv_heads": gguf.arch_get("attention.head_count_kv", head_count),
        "head_dim": gguf.arch_get("attention.key_length"),
        "sliding_window": gguf.arch_get("attention.sliding_window"),
        "sliding_window_layers": None,
    }


def _tokenizer_info(gguf: GGUFFile) -> dict[str, Any]:
    tokens = gguf.get(Keys.Tokenizer.LIST)
    tokens = tokens if isinstance(tokens, list) else []
    template = chat_template_for(gguf.metadata, gguf.architecture, tokens)
    return {
        "vocab_size": len(tokens),
        "tokenizer": describe_tokenizer(gguf.get(Keys.Tokenizer.MODEL), gguf.get(Keys.Tokenizer.PRE)),
        "chat_template": template.origin,
    }


def _device_memory(gguf: GGUFFile, config: ModelConfig, memory: dict[str, Any], parallel: int) -> dict[str, Any]:
    """What `backends.cuda` holds on the GPU: the matrices as the file's bytes, the vectors as
    float32, the KV pools, and one forward's largest buffers (logits and activations of a
    512-token batch, `max_batched_tokens`' default), per KV cache type."""
    weights = sum(t.nbytes if len(t.shape) == 2 else 4 * t.n_elements for t in gguf.tensors.values())
    tokens = max(512, parallel)
    scratch = 4 * (parallel * config.n_vocab + 4 * tokens * max(config.n_ff, config.n_head * config.head_dim))
    return {"weights_bytes": weights, "scratch_bytes": scratch,
            "total_bytes": {k: weights + kv + scratch for k, kv in memory["kv_bytes"].items()}}


def _memory(gguf: GGUFFile, config: ModelConfig | None, n_ctx: int, parallel: int) -> dict[str, Any]:
    memory: dict[str, Any] = {
        "weights_bytes": sum(t.nbytes for t in gguf.tensors.values()),
        "ctx": n_ctx,
        "parallel": parallel,
    }
    if config is None:
        return memory
    per_token_elements = config.n_layer * config.n_head_kv * (config.head_dim + config.head_dim_v)
    cached_elements = parallel * sum(
        config.kv_tokens_cached(il, n_ctx) * config.n_head_kv * (config.head_dim + config.head_dim_v)
        for il in range(config.n_layer)
    )
    memory["kv_bytes_per_token"] = {k: round(per_token_elements * b) for k, b in KV_CACHE_TYPES.items()}
    memory["kv_bytes"] = {k: round(cached_elements * b) for k, b in KV_CACHE_TYPES.items()}
    return memory
