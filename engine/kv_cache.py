"""The paged KV cache: one pool of fixed-size blocks, a block table per sequence (PagedAttention).

Keys and values are stored as float16 (llama.cpp's default cache type) in
    keys   [n_layer, n_blocks, block_size, n_head_kv, head_dim]
    values [n_layer, n_blocks, block_size, n_head_kv, head_dim_v]
A sequence owns the blocks listed in its table, in position order; position p lives in block
table[p // block_size], slot p % block_size. Outside this module a sequence is an opaque
`SequenceHandle`. One request in `llmx run` uses the same path as many in `llmx serve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from llmx.engine.config import ModelConfig
from llmx.errors import LlmxError
from llmx.quant.cpu import simd as S

BLOCK_SIZE = 16


@dataclass(eq=False)
class SequenceHandle:
    """A sequence's place in the cache; only `KVCache` looks inside."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions written


class KVCache:
    def __init__(self, config: ModelConfig, n_tokens: int, block_size: int = BLOCK_SIZE):
        self.block_size = block_size
        n_blocks = max(1, -(-n_tokens // block_size))
        shape = (config.n_layer, n_blocks, block_size, config.n_head_kv)
        self.keys = np.zeros((*shape, config.head_dim), np.float16)
        self.values = np.zeros((*shape, config.head_dim_v), np.float16)
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() hands out low blocks first

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    def new_sequence(self) -> SequenceHandle:
        return SequenceHandle()

    def release(self, seq: SequenceHandle) -> None:
        self._free.extend(reversed(seq.blocks))
        seq.blocks.clear()
        seq.length = 0

    def reserve(self, seq: SequenceHandle, n_new: int) -> np.ndarray:
        """Make room for `n_new` more positions; returns their positions (int64 [n_new])."""
        needed = -(-(seq.length + n_new) // self.block_size) - len(seq.blocks)
        if needed > len(self._free):
            raise LlmxError(f"the KV cache is full: {seq.length + n_new} positions do not fit; "
                            "raise the context size (-c)")
        seq.blocks.extend(self._free.pop() for _ in range(needed))
        return np.arange(seq.length, seq.length + n_new)

    def cells(self, seq: SequenceHandle, positions: np.ndarray) -> np.ndarray:
        """Flat cell indices (block * block_size + slot) of `positions` of `seq` (int64 [n])."""
        table = np.asarray(seq.blocks, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """k [n, n_head_kv, head_dim], v [n, n_head_kv, head_dim_v] into `cells` of layer `layer`."""
        for pool, rows in ((self.keys[layer], k), (self.values[layer], v)):
            bits = pool.reshape(len(pool) * pool.shape[1], -1).view(np.uint16)  # [cells, n_head_kv * dim]
            rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(len(rows), -1)
            (_write_rows_parallel if len(rows) >= PARALLEL_ROWS else _write_rows)(bits, np.asarray(cells), rows)

    def commit(self, seq: SequenceHandle, n_new: int) -> None:
        seq.length += n_new

    def block_tables(self, seqs: list[SequenceHandle]) -> np.ndarray:
        """int32 [n_seqs, most blocks]: each sequence's block ids, padded with 0."""
        tables = np.zeros((len(seqs), max(len(s.blocks) for s in seqs)), np.int32)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.blocks)] = seq.blocks
        return tables


PARALLEL_ROWS = 16  # a prompt's rows are split over threads; a token's are not worth it


@njit(cache=True, nogil=True, inline="always")
def _write_row(bits, cells, rows, i):
    """Row i as float16 (round half to even, as numpy's astype) into cell cells[i]."""
    for j in range(rows.shape[1]):
        bits[cells[i], j] = S.f16_bits(rows[i, j])


@njit(cache=True, nogil=True)
def _write_rows(bits, cells, rows):
    for i in range(len(cells)):
        _write_row(bits, cells, rows, i)


@njit(cache=True, nogil=True, parallel=True)
def _write_rows_parallel(bits, cells, rows):
    for i in prange(len(cells)):
        _write_row(bits, cells, rows, i)
