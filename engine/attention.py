"""Causal attention over the paged KV cache.

Each sequence's keys and values are gathered through its block table, then attention runs as
llama.cpp's CPU graph does without flash attention: queries rounded to float16 (its K is float16),
scores scaled and masked (causal, and for sliding-window layers only the last `window`
positions), softmax in float32, probabilities rounded to float16 for the V product.

The products go through numpy's BLAS. Numba kernels that follow ggml's own accumulation orders
were tried (ggml_vec_dot_f16's 4 x 8 lanes, and its flash-attention order): they matched the tiny
models no better, and on gemma-3-270m, whose logits are chaotically sensitive to the last bits of
attention (a 3e-7 relative change of one layer's output moves the logits by ~0.1), they matched
llama.cpp's greedy text worse than this. A Numba kernel comes back with the batching work.
"""

from __future__ import annotations

import math

import numpy as np


def gather(pool: np.ndarray, table: np.ndarray, n_positions: int) -> np.ndarray:
    """float16 pool [n_blocks, block_size, heads, dim] -> float32 [n_positions, heads, dim]."""
    blocks = pool[table]  # [n_seq_blocks, block_size, heads, dim]
    return blocks.reshape(-1, *pool.shape[2:])[:n_positions].astype(np.float32)


def attend_paged(q: np.ndarray, keys: np.ndarray, values: np.ndarray, table: np.ndarray, positions: np.ndarray,
                 window: int | None, group: int) -> np.ndarray:
    """q [n, n_head, d] -> [n, n_head, dv]; keys/values a layer's float16 pool, `table` the
    sequence's block ids, `positions` the queries' positions (all already written)."""
    n_kv = int(positions.max()) + 1
    k, v = gather(keys, table, n_kv), gather(values, table, n_kv)
    n, n_head, d = q.shape
    q16 = q.astype(np.float16).astype(np.float32)
    kv_pos = np.arange(n_kv)
    allowed = kv_pos[None, :] <= positions[:, None]  # [n, n_kv]
    if window:
        allowed &= positions[:, None] - kv_pos[None, :] < window
    out = np.empty((n, n_head, v.shape[2]), np.float32)
    scale = np.float32(1.0 / math.sqrt(d))
    for head in range(n_head):
        kv_head = head // group
        scores = (q16[:, head, :] @ k[:, kv_head, :].T) * scale  # [n, n_kv]
        scores = np.where(allowed, scores, -np.inf)
        scores -= scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=1, keepdims=True)
        probs = probs.astype(np.float16).astype(np.float32)
        out[:, head, :] = probs @ v[:, kv_head, :]
    return out
