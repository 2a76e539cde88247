"""Perplexity as llama-perplexity computes it.

The text is tokenized without BOS and cut into chunks of `ctx` tokens; each chunk's first token
is replaced by BOS, and only the second half of each chunk is scored (every scored token has at
least ctx / 2 tokens of context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from llmx.engine.kv_cache import KVCache
from llmx.engine.model import Model
from llmx.errors import LlmxError


@dataclass(frozen=True)
class ChunkResult:
    index: int
    nll_sum: float  # over this chunk's scored tokens
    nll_sq_sum: float
    count: int


def chunks(model: Model, text: str, ctx: int, max_chunks: int | None) -> Iterator[list[int]]:
    tokens = model.tokenize(text, add_bos=False)
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise LlmxError(f"the text is {len(tokens)} tokens; perplexity needs at least one chunk of {ctx}")
    bos = model.tokenizer.vocab.bos_id
    for c in range(n_chunks if max_chunks is None else min(max_chunks, n_chunks)):
        ids = tokens[c * ctx : (c + 1) * ctx]
        yield ([bos] + ids[1:]) if bos is not None else ids


def chunk_log_probs(model: Model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-softmax [n_scored, n_vocab] of the scored (second-half) positions, and the
    token each of them predicts."""
    cache = KVCache(model.config, len(ids))
    half = len(ids) // 2
    logits = model.transformer.forward(np.asarray(ids), cache.new_sequence(), cache)
    return log_softmax(logits[half : len(ids) - 1]), np.asarray(ids[half + 1 :])  # predicting ids[half + 1:]


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """float64 log-softmax of each row."""
    rows = rows.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    return rows - (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))


def score_chunk(model: Model, ids: list[int], index: int, log_probs: np.ndarray | None = None) -> ChunkResult:
    if log_probs is None:
        log_probs, targets = chunk_log_probs(model, ids)
    else:
        targets = np.asarray(ids[len(ids) // 2 + 1 :])
    nll = -log_probs[np.arange(len(targets)), targets]
    return ChunkResult(index, float(nll.sum()), float((nll * nll).sum()), len(targets))


def perplexity(model: Model, text: str, ctx: int = 512, max_chunks: int | None = None,
               on_chunk: Callable[[ChunkResult, float], None] = lambda r, p: None,
               save_logits: Callable[[list[int], np.ndarray], None] | None = None) -> tuple[float, float]:
    """(PPL, its uncertainty as llama-perplexity estimates it from the per-token NLL spread).
    `save_logits(ids, log_probs)` receives each chunk's scored log-probabilities (KL-divergence base)."""
    total = total_sq = 0.0
    count = 0
    for index, ids in enumerate(chunks(model, text, ctx, max_chunks)):
        log_probs, _ = chunk_log_probs(model, ids)
        if save_logits is not None:
            save_logits(ids, log_probs)
        result = score_chunk(model, ids, index, log_probs)
        total, total_sq, count = total + result.nll_sum, total_sq + result.nll_sq_sum, count + result.count
        on_chunk(result, float(np.exp(total / count)))
    mean = total / count
    variance = total_sq / count - mean * mean
    ppl = float(np.exp(mean))
    return ppl, (ppl * float(np.sqrt(variance / (count - 1))) if variance > 0 and count > 1 else 0.0)
