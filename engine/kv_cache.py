"""The paged KV cache: one pool of fixed-size blocks, a block table per sequence (PagedAttention).

Keys and values are stored as float16 (llama.cpp's default cache type) in
    keys   [n_layer, n_blocks, block_size, n_head_kv, head_dim]
    values [n_layer, n_blocks, block_size, n_head_kv, head_dim_v]
A sequence owns the blocks listed in its table, in position order; position p lives in block
table[p // block_size], slot p % block_size. Outside this module a sequence is an opaque
`SequenceHandle`. One request in `llmx run` uses the same path as many in `llmx serve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from llmx.engine.block_pool import BlockPool, prompt_rows_end
from llmx.engine.config import ModelConfig
from llmx.errors import LlmxError
from llmx.quant.cpu import simd as S
from llmx.quant.cpu.activations import quantize_q8_0

BLOCK_SIZE = 16
CACHE_TYPES = ("f16", "q8_0")
Q8_0_BLOCK, Q8_0_BYTES = 32, 34  # values per block; bytes per block (float16 scale, 32 int8 codes)


@dataclass(eq=False)
class SequenceHandle:
    """A sequence's place in the cache; only `KVCache` looks inside."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions written
    # Positions below this are the prompt's (None: the first forward's tokens). Attention takes a
    # row's float order from its own role, never from the batch: see `prompt_order`.
    prompt_length: int | None = None


def check_cache_type(name: str, cache_type: str, head_dim: int) -> None:
    if cache_type not in CACHE_TYPES:
        raise LlmxError(f"{name} {cache_type!r} is not a KV cache type; use one of {', '.join(CACHE_TYPES)}")
    if cache_type == "q8_0" and head_dim % Q8_0_BLOCK:
        raise LlmxError(f"{name} q8_0 needs a head size that is a multiple of {Q8_0_BLOCK}, not {head_dim}")


class KVCache:
    """The cache's storage, one layer's pool at a time, and its `BlockPool` of block ids.
    `cache_type_k/v` "q8_0" stores each head's row as llama.cpp's Q8_0 blocks (34 bytes per 32
    values instead of 64); attention reads such a layer through `layer_f16`."""

    def __init__(self, config: ModelConfig, n_tokens: int, block_size: int = BLOCK_SIZE, cache_type_k: str = "f16",
                 cache_type_v: str = "f16", prefix_caching: bool = False):
        check_cache_type("cache_type_k", cache_type_k, config.head_dim)
        check_cache_type("cache_type_v", cache_type_v, config.head_dim_v)
        self.block_size = block_size
        self.cache_types = (cache_type_k, cache_type_v)
        n_blocks = max(1, -(-n_tokens // block_size))
        # [n_layer, n_blocks, block_size, n_head_kv, dim or row bytes], keys' then values'
        self.shapes = (_pool_shape(config, n_blocks, block_size, config.head_dim, cache_type_k),
                       _pool_shape(config, n_blocks, block_size, config.head_dim_v, cache_type_v))
        self._host: tuple[np.ndarray, np.ndarray] | None = None
        self.pool = BlockPool(n_blocks, block_size, prefix_caching)

    @property
    def keys(self) -> np.ndarray:
        return self._host_pools()[0]

    @property
    def values(self) -> np.ndarray:
        return self._host_pools()[1]

    def _host_pools(self) -> tuple[np.ndarray, np.ndarray]:
        """The host storage, taken on first use: a cache a GPU backend fills (`backends.cuda`
        keeps its own pools of these shapes on the device) never takes host memory."""
        if self._host is None:
            self._host = tuple(_pool(shape, kind) for shape, kind in zip(self.shapes, self.cache_types, strict=True))
        return self._host

    @property
    def free_tokens(self) -> int:
        return self.pool.num_free * self.block_size

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position takes over all layers, keys and values."""
        item = {"f16": 2, "q8_0": 1}
        return sum(math.prod(shape[:1] + shape[3:]) * item[kind] for shape, kind in
                   zip(self.shapes, self.cache_types, strict=True))

    def new_sequence(self) -> SequenceHandle:
        return SequenceHandle()

    def release(self, seq: SequenceHandle) -> None:
        self.pool.release(seq.blocks)
        seq.blocks.clear()
        seq.length = 0

    def reserve(self, seq: SequenceHandle, n_new: int) -> np.ndarray:
        """Make room for `n_new` more positions; returns their positions (int64 [n_new])."""
        if seq.prompt_length is None:
            seq.prompt_length = seq.length + n_new
        needed = self.pool.blocks_for(seq.length + n_new) - len(seq.blocks)
        if needed > 0:
            seq.blocks.extend(self.pool.allocate(needed))
        return np.arange(seq.length, seq.length + n_new)

    def cells(self, seq: SequenceHandle, positions: np.ndarray) -> np.ndarray:
        """Flat cell indices (block * block_size + slot) of `positions` of `seq` (int64 [n])."""
        table = np.asarray(seq.blocks, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """k [n, n_head_kv, head_dim], v [n, n_head_kv, head_dim_v] into `cells` of layer `layer`."""
        k_type, v_type = self.cache_types
        cells = np.asarray(cells)
        if k_type == v_type == "f16" and len(k) < PARALLEL_ROWS:  # a decode step's rows: one call
            write_key_value_rows(cell_bits(self.keys[layer]), cell_bits(self.values[layer]), cells,
                                  _flat_rows(k), _flat_rows(v))
            return
        for pool, rows, kind in ((self.keys[layer], k, k_type), (self.values[layer], v, v_type)):
            if kind == "q8_0":
                _write_q8_0(pool, cells, np.ascontiguousarray(rows, dtype=np.float32))
                continue
            rows = _flat_rows(rows)
            (_write_rows_parallel if len(rows) >= PARALLEL_ROWS else _write_rows)(cell_bits(pool), cells, rows)

    def layer_f16(self, layer: int, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer `layer`'s keys and values as float16 pools [n_blocks, block_size, n_head_kv, dim],
        and `tables` pointing into them. A q8_0 layer is decoded for the blocks in `tables` only,
        into a pool of those blocks, and the tables renumbered."""
        if self.cache_types == ("f16", "f16"):
            return self.keys[layer], self.values[layer], tables
        used, renumbered = np.unique(tables, return_inverse=True)
        keys, values = (_f16_blocks(pool[layer], used, kind) for pool, kind in
                        ((self.keys, self.cache_types[0]), (self.values, self.cache_types[1])))
        return keys, values, renumbered.reshape(tables.shape).astype(np.int32)

    def commit(self, seq: SequenceHandle, n_new: int) -> None:
        seq.length += n_new

    def block_tables(self, seqs: list[SequenceHandle]) -> np.ndarray:
        """int32 [n_seqs, most blocks]: each sequence's block ids, padded with 0."""
        tables = np.zeros((len(seqs), max(len(s.blocks) for s in seqs)), np.int32)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.blocks)] = seq.blocks
        return tables


def prompt_order(positions: np.ndarray, prompt_length: int) -> np.ndarray:
    """bool [n]: which rows take the prompt's float order in attention (`prompt_rows_end`). It
    depends on the row's position and its sequence's prompt only, so a row's bits do not depend on
    its batch or chunk."""
    return positions < prompt_rows_end(prompt_length)


def _pool_shape(config: ModelConfig, n_blocks: int, block_size: int, dim: int, cache_type: str) -> tuple[int, ...]:
    row = dim // Q8_0_BLOCK * Q8_0_BYTES if cache_type == "q8_0" else dim
    return (config.n_layer, n_blocks, block_size, config.n_head_kv, row)


def _pool(shape: tuple[int, ...], cache_type: str) -> np.ndarray:
    """One pool, its memory taken at once (as vLLM and llama.cpp do; here at the cache's first
    use): np.zeros alone maps pages on first write, and a server's memory would then creep up
    block by block to the pool's size."""
    pool = np.empty(shape, np.uint8 if cache_type == "q8_0" else np.float16)
    pool.fill(0)
    return pool


def _f16_blocks(pool: np.ndarray, blocks: np.ndarray, cache_type: str) -> np.ndarray:
    """float16 [len(blocks), block_size, n_head_kv, dim] of one layer's `blocks`."""
    if cache_type == "f16":
        return pool[blocks]
    n_blocks, block_size, n_head_kv, row_bytes = pool.shape
    out = np.empty((len(blocks), block_size, n_head_kv, row_bytes // Q8_0_BYTES * Q8_0_BLOCK), np.float16)
    _dequantize_q8_0_blocks(pool, blocks.astype(np.int64), out.view(np.uint16))
    return out


def cell_bits(pool: np.ndarray) -> np.ndarray:
    """One layer's float16 pool [n_blocks, block_size, n_head_kv, dim] as uint16 [cells, n_head_kv * dim]."""
    return pool.reshape(len(pool) * pool.shape[1], -1).view(np.uint16)


def _flat_rows(rows: np.ndarray) -> np.ndarray:
    """float32 [n, n_head_kv, dim] -> [n, n_head_kv * dim], contiguous."""
    return np.ascontiguousarray(rows, dtype=np.float32).reshape(len(rows), -1)


PARALLEL_ROWS = 16  # a prompt's rows are split over threads; a token's are not worth it


@njit(cache=True, nogil=True)
def _write_row(bits, cells, rows, i):
    """Row i as float16 (round half to even, as numpy's astype) into cell cells[i]."""
    for j in range(rows.shape[1]):
        bits[cells[i], j] = S.f16_bits(rows[i, j])


@njit(cache=True, nogil=True)
def _write_rows(bits, cells, rows):
    for i in range(len(cells)):
        _write_row(bits, cells, rows, i)


@njit(cache=True, nogil=True)
def write_key_value_rows(k_bits, v_bits, cells, k_rows, v_rows):
    for i in range(len(cells)):
        _write_row(k_bits, cells, k_rows, i)
        _write_row(v_bits, cells, v_rows, i)


@njit(cache=True, nogil=True, parallel=True)
def _write_rows_parallel(bits, cells, rows):
    for i in prange(len(cells)):
        _write_row(bits, cells, rows, i)


@njit(cache=True, nogil=True, parallel=True)
def _write_q8_0_rows(pool, cells, codes, scales):
    """Q8_0 rows (codes int8 [n * n_head_kv, dim], scales float32 [n * n_head_kv, dim / 32]) into
    cells of one layer's pool uint8 [n_blocks, block_size, n_head_kv, row_bytes]."""
    flat = pool.reshape(-1, pool.shape[2], pool.shape[3])  # [cells, n_head_kv, row_bytes]
    n_head_kv = pool.shape[2]
    for r in prange(len(codes)):
        row = flat[cells[r // n_head_kv], r % n_head_kv]
        for b in range(scales.shape[1]):
            bits = S.f16_bits(scales[r, b])
            row[34 * b], row[34 * b + 1] = bits & 0xFF, bits >> 8
            for i in range(32):
                row[34 * b + 2 + i] = np.uint8(codes[r, 32 * b + i] & 0xFF)


def _write_q8_0(pool: np.ndarray, cells: np.ndarray, rows: np.ndarray) -> None:
    """rows float32 [n, n_head_kv, dim] as llama.cpp's quantize_row_q8_0 into `cells`."""
    codes, scales = quantize_q8_0(rows.reshape(-1, rows.shape[-1]))
    _write_q8_0_rows(pool, cells.astype(np.int64), codes, scales)


@njit(cache=True, nogil=True, parallel=True)
def _dequantize_q8_0_blocks(pool, blocks, out):
    """out[i] = float16 bits (uint16) of pool[blocks[i]] (Q8_0 rows: code x scale, rounded)."""
    _, block_size, n_head_kv, row_bytes = pool.shape
    raw = pool.reshape(-1).view(np.uint8)
    for i in prange(len(blocks)):
        for s in range(block_size):
            for h in range(n_head_kv):
                at = ((blocks[i] * block_size + s) * n_head_kv + h) * row_bytes
                for b in range(row_bytes // 34):
                    d = S.load_f16(raw, at + 34 * b)
                    for j in range(32):
                        out[i, s, h, 32 * b + j] = S.f16_bits(d * np.float32(np.int8(raw[at + 34 * b + 2 + j])))
