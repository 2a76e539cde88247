"""The CUDA backend: numba.cuda device arrays and the kernels of `quant.cuda`.

Weights are uploaded once, at load, as the file's bytes (no float copy: a matmul reads the same
bytes per token the file holds and decodes them in the kernel); norm weights and biases as
float32. Activations stay on the device through the whole forward; the KV cache's pools live on
the device too (one pair per `KVCache`, the same shape as its host pools), and only the rows of
logits asked for come back (`to_host`).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from numba import cuda

from llmx.engine.backends.cpu import STACKABLE, stackable_runs
from llmx.engine.config import ModelConfig
from llmx.engine.kv_cache import KVCache
from llmx.formats.gguf_file import GGUFTensor
from llmx.quant.cuda import attention, elementwise
from llmx.quant.cuda.device import Arena
from llmx.quant.cuda.linear import DeviceMatrix, matmul


class CudaBackend:
    name = "cuda"

    def __init__(self, config: ModelConfig, tensors: dict[str, GGUFTensor]):
        self.config, self.tensors = config, tensors
        # weight name (without ".weight") -> its DeviceMatrix; consecutive weights of q/k/v or
        # gate/up of one type and row length, without biases, share one (one launch for the run)
        self.matrices: dict[str, DeviceMatrix] = {}
        self.stacks: dict[str, tuple[str, ...]] = {}  # weight name -> the run it is stacked in
        self.vectors: dict[str, Any] = {}  # norm weights and biases -> device float32
        for layer in range(config.n_layer):
            for group in STACKABLE:
                for run in stackable_runs(tensors, [f"blk.{layer}.{role}" for role in group], lambda t: True):
                    self._upload_stack(run)
        for name, tensor in tensors.items():
            if tensor.data.ndim != 2:
                self.vectors[name] = cuda.to_device(np.ascontiguousarray(tensor.data, dtype=np.float32))
            elif name[: -len(".weight")] not in self.matrices:
                self.matrices[name[: -len(".weight")]] = DeviceMatrix.upload([_rows(tensor)], tensor.qtype)
        self._pools: weakref.WeakKeyDictionary[KVCache, tuple[Any, Any]] = weakref.WeakKeyDictionary()
        # host array id -> (the array, its device copy): the forward's index arrays and rope tables,
        # uploaded once for all layers; emptied when a forward starts (`embed`)
        self._uploads: dict[int, tuple[np.ndarray, Any]] = {}
        self.arena = Arena()  # every operation's output, reused forward after forward

    def _upload_stack(self, names: tuple[str, ...]) -> None:
        tensors = [self.tensors[f"{name}.weight"] for name in names]
        matrix = DeviceMatrix.upload([_rows(t) for t in tensors], tensors[0].qtype)
        for name in names:
            self.matrices[name], self.stacks[name] = matrix, names

    # -- where things live ----------------------------------------------------------------

    def _uploaded(self, host: np.ndarray):
        """`host` (an array of the forward's layout, or a rope table) on the device, uploaded on
        its first use in this forward."""
        if id(host) not in self._uploads:  # (the host array is kept with it: its id stays its own)
            self._uploads[id(host)] = (host, cuda.to_device(np.ascontiguousarray(host)))
        return self._uploads[id(host)][1]

    def pools(self, cache: KVCache) -> tuple[Any, Any]:
        """The cache's key and value pools on the device: [n_layer, cells, n_head_kv, dim] of
        float16 bits, or [..., row bytes] of Q8_0 rows; allocated on the cache's first use."""
        pools = self._pools.get(cache)
        if pools is None:
            pools = tuple(cuda.device_array((s[0], s[1] * s[2], s[3], s[4]), np.uint16 if kind == "f16" else np.uint8)
                          for s, kind in zip(cache.shapes, cache.cache_types, strict=True))
            self._pools[cache] = pools
        return pools

    def to_host(self, x) -> np.ndarray:
        return x.copy_to_host()

    # -- the operations of a forward ------------------------------------------------------

    def embed(self, tokens: np.ndarray):
        self._uploads.clear()  # a forward starts
        self.arena.reset()
        table = self.tensors["token_embd.weight"]
        return elementwise.embed(self.matrices["token_embd"].raw, table.qtype,
                                 cuda.to_device(tokens.astype(np.int64)), self.config.n_embd, self.config.embed_scale,
                                 self.arena)

    def linear(self, x, name: str):
        run = self.stacks.get(name)
        if run is not None:  # one weight of a stack, alone: the whole stack, then its part
            return matmul(x, self.matrices[name], arena=self.arena)[run.index(name)]
        return matmul(x, self.matrices[name], self.vectors.get(f"{name}.bias"), self.arena)[0]

    def linears(self, x, *names: str) -> list:
        """`linear` of one input with several weights; the weights of a stack in one launch."""
        outs: list = []
        while len(outs) < len(names):
            name = names[len(outs)]
            run = self.stacks.get(name)
            if run is not None and names[len(outs):len(outs) + len(run)] == run:
                outs += matmul(x, self.matrices[name], arena=self.arena)
            else:
                outs.append(self.linear(x, name))
        return outs

    def rms_norm(self, x, weight: str):
        return elementwise.rms_norm(x, self.vectors[weight], self.config.rms_eps, self.arena)

    def norm_rope(self, q, k, q_norm: str | None, k_norm: str | None, cos: np.ndarray, sin: np.ndarray,
                  q_scale: np.float32 | None = None):
        weights = (None if norm is None else self.vectors[norm] for norm in (q_norm, k_norm))
        return elementwise.norm_rope(q, k, *weights, self._uploaded(cos), self._uploaded(sin), self.config.rope_layout,
                                     1.0 if q_scale is None else q_scale, self.config.rms_eps, self.arena)

    def add_rms_norm(self, x, y, norm: str | None, pre_norm: str | None = None):
        return elementwise.add_rms_norm(x, y, None if norm is None else self.vectors[norm],
                                        None if pre_norm is None else self.vectors[pre_norm], self.config.rms_eps,
                                        self.arena)

    def activate(self, gate, up):
        return elementwise.gate(gate, up, self.config.activation, self.arena)

    def decode_row(self, layers: list, x, h, layout, cache: KVCache, rope) -> None:
        """The CPU backend's bound single-token step (`CpuBackend.decode_row`); here every step takes
        the generic blocks."""
        return None

    def rows(self, x, rows: np.ndarray):
        return elementwise.rows(x, cuda.to_device(rows.astype(np.int64)), self.arena)

    def kv_write(self, cache: KVCache, layer: int, layout, k, v) -> None:
        keys, values = self.pools(cache)
        elementwise.write_cache(keys[layer], values[layer], self._uploaded(layout.cells), k, v, cache.cache_types)

    def attend(self, q, cache: KVCache, layer: int, layout, window: int | None, kq_scale: np.float32):
        c = self.config
        keys, values = self.pools(cache)
        tables, row_seq, positions = (self._uploaded(a) for a in (layout.tables, layout.row_seq, layout.positions))
        longest = int(layout.positions.max()) + 1  # positions the longest row attends to
        return attention.attend(q, keys[layer], values[layer], cache.cache_types, tables, row_seq, positions,
                                cache.block_size, window, c.n_head // c.n_head_kv, kq_scale, c.head_dim_v,
                                min(longest, window or longest), self.arena)


def _rows(tensor: GGUFTensor) -> np.ndarray:
    """uint8 [rows, row bytes]: a matrix's bytes as the file holds them."""
    return tensor.data.view(np.uint8)
