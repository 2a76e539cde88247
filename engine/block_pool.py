"""The KV cache's block accounting: one pool of block ids for all sequences, with reference
counts and automatic prefix caching (vLLM's block manager, nano-vllm's size).

Plain Python, no numba and no arrays: the scheduler uses it, and tests drive it without a model.
A full block is keyed by (key of the previous block, its token ids); a new sequence takes every
cached block of its prefix. Blocks nobody references wait in `_free` in least-recently-freed order,
still cached, until an allocation needs them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from llmx.errors import LlmxError

BlockKey = bytes


def block_key(previous: BlockKey | None, tokens: Sequence[int], prompt_rows: int) -> BlockKey:
    """The prefix-cache key of a full block: a 16-byte digest of the previous key, its tokens, and
    how many of its rows are in the prompt's float order (`prompt_rows_in`): the same tokens
    computed as generated ones hold other bits, and a hit must give exactly what computing gives."""
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(np.asarray([*tokens, prompt_rows], dtype=np.int64).tobytes())
    return digest.digest()


def prompt_rows_end(n_prompt: int) -> int:
    """Attention takes positions below this in the prompt's float order (llama.cpp's tinyBLAS for a
    prompt of 2+ tokens), the rest in a decoded token's (ggml_vec_dot_f16): the one rule that
    `kv_cache.prompt_order` and the prefix-cache keys share."""
    return n_prompt if n_prompt >= 2 else 0


def prompt_rows_in(start: int, block_size: int, n_prompt: int) -> int:
    """How many of the positions start..start+block_size-1 attention takes in the prompt's order."""
    return min(max(prompt_rows_end(n_prompt) - start, 0), block_size)


class BlockPool:
    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True):
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refs = [0] * n_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(n_blocks))
        self._key_of: dict[int, BlockKey] = {}  # cached block -> its key
        self._cached: dict[BlockKey, int] = {}  # key -> cached block

    # -- counts ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free ones, cached or not)."""
        return len(self._free)

    @property
    def num_referenced(self) -> int:
        """Blocks some sequence holds."""
        return self.n_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks that hold a cached prefix (referenced or not)."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        """Blocks that hold data: referenced by a sequence, or kept by the prefix cache."""
        cached = list(self._key_of)  # (one C-level copy: /metrics reads this while the engine runs)
        return self.num_referenced + sum(1 for b in cached if self.refs[b] == 0)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # -- allocation -----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, each with one reference; the least recently freed go first."""
        if n > len(self._free):
            raise LlmxError(f"the KV cache is full: {n} more blocks needed, {len(self._free)} free "
                            f"of {self.n_blocks} ({self.n_blocks * self.block_size} tokens); raise its size")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones become free (cached ones stay cached).
        The last block is freed first, so a prefix's head outlives its tail."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} released twice"
            if self.refs[block] == 0:
                self._free[block] = None

    # -- prefix cache ---------------------------------------------------------------------

    def cached_prefix(self, tokens: Sequence[int], n_prompt: int) -> tuple[list[int], list[BlockKey]]:
        """The longest cached prefix of `tokens` (a sequence with an `n_prompt`-token prompt) in
        whole blocks, referenced now, and their keys."""
        blocks: list[int] = []
        keys: list[BlockKey] = []
        if not self.prefix_caching:
            return blocks, keys
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            key = block_key(keys[-1] if keys else None, tokens[start:start + self.block_size],
                            prompt_rows_in(start, self.block_size, n_prompt))
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
        for block in blocks:
            self._free.pop(block, None)
            self.refs[block] += 1
        return blocks, keys

    def cache_full_blocks(self, blocks: Sequence[int], tokens: Sequence[int], n_prompt: int, n_computed: int,
                          keys: list[BlockKey]) -> None:
        """Key the blocks that `n_computed` positions of `tokens` fill; `keys` (the sequence's keys
        of its full blocks so far) grows in place. A block whose key some other block holds
        already stays uncached (two sequences computed the same prefix at once)."""
        full = min(n_computed // self.block_size, len(blocks))
        while self.prefix_caching and len(keys) < full:
            start = len(keys) * self.block_size
            key = block_key(keys[-1] if keys else None, tokens[start:start + self.block_size],
                            prompt_rows_in(start, self.block_size, n_prompt))
            i = len(keys)
            keys.append(key)
            if key not in self._cached and blocks[i] not in self._key_of:
                self._cached[key] = blocks[i]
                self._key_of[blocks[i]] = key

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._cached[key]

    # -- invariants (tests call this every step) ------------------------------------------

    def check(self, tables: Sequence[Sequence[int]]) -> None:
        """Each block's reference count is the number of tables holding it; free means unreferenced;
        a block in two tables is a cached prefix block."""
        counts = [0] * self.n_blocks
        for table in tables:
            for block in table:
                counts[block] += 1
        assert counts == self.refs, "reference counts disagree with the block tables"
        assert all((self.refs[b] == 0) == (b in self._free) for b in range(self.n_blocks))
        assert all(c <= 1 or b in self._key_of for b, c in enumerate(counts)), "shared block not in the prefix cache"
        assert all(self._cached[k] == b for b, k in self._key_of.items())
