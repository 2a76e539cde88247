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

from llmx.engine.config import ModelConfig
from llmx.engine.kv_cache import KVCache
from llmx.errors import LlmxError
from llmx.formats.gguf_file import GGUFTensor
from llmx.quant.cuda import attention, elementwise
from llmx.quant.cuda.linear import matmul, supported


class CudaBackend:
    name = "cuda"

    def __init__(self, config: ModelConfig, tensors: dict[str, GGUFTensor]):
        self.config, self.tensors = config, tensors
        self.matrices: dict[str, Any] = {}  # weight name -> device uint8, the file's bytes
        self.vectors: dict[str, Any] = {}  # norm weights and biases -> device float32
        for name, tensor in tensors.items():
            if tensor.data.ndim == 2:
                if not supported(tensor.qtype):
                    raise LlmxError(f"{name} is {tensor.qtype.name}, which the CUDA backend does not run")
                self.matrices[name] = cuda.to_device(np.ascontiguousarray(tensor.data.view(np.uint8)).reshape(-1))
            else:
                self.vectors[name] = cuda.to_device(np.ascontiguousarray(tensor.data, dtype=np.float32))
        self._pools: weakref.WeakKeyDictionary[KVCache, tuple[Any, Any]] = weakref.WeakKeyDictionary()
        self._layout: tuple[Any, dict[str, Any]] | None = None  # the last forward's layout, uploaded

    # -- where things live ----------------------------------------------------------------

    def _uploaded(self, layout) -> dict[str, Any]:
        """The layout's index arrays on the device, uploaded once per forward (all layers use them)."""
        if self._layout is None or self._layout[0] is not layout:
            self._layout = (layout, {name: cuda.to_device(np.ascontiguousarray(getattr(layout, name)))
                                     for name in ("cells", "row_seq", "positions", "tables")})
        return self._layout[1]

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
        table = self.tensors["token_embd.weight"]
        return elementwise.embed(self.matrices[table.name], table.qtype, cuda.to_device(tokens.astype(np.int64)),
                                 self.config.n_embd, self.config.embed_scale)

    def linear(self, x, name: str):
        tensor = self.tensors[f"{name}.weight"]
        return matmul(x, self.matrices[tensor.name], tensor.qtype, tensor.shape[1], self.vectors.get(f"{name}.bias"))

    def linears(self, x, *names: str) -> list:
        return [self.linear(x, name) for name in names]

    def rms_norm(self, x, weight: str):
        return elementwise.rms_norm(x, self.vectors[weight], self.config.rms_eps)

    def rope(self, x, cos: np.ndarray, sin: np.ndarray):
        return elementwise.rope(x, cuda.to_device(cos), cuda.to_device(sin), self.config.rope_layout)

    def scale(self, x, factor: np.float32):
        return elementwise.scale(x, factor)

    def add(self, x, y):
        return elementwise.add(x, y)

    def activate(self, gate, up):
        return elementwise.gate(gate, up, self.config.activation)

    def rows(self, x, rows: np.ndarray):
        return elementwise.rows(x, cuda.to_device(rows.astype(np.int64)))

    def kv_write(self, cache: KVCache, layer: int, layout, k, v) -> None:
        cells = self._uploaded(layout)["cells"]
        for pool, rows, kind in zip(self.pools(cache), (k, v), cache.cache_types, strict=True):
            elementwise.write_cache(pool[layer], cells, rows, kind)

    def attend(self, q, cache: KVCache, layer: int, layout, window: int | None, kq_scale: np.float32):
        c = self.config
        keys, values = self.pools(cache)
        on = self._uploaded(layout)
        return attention.attend(q, keys[layer], values[layer], cache.cache_types, on["tables"], on["row_seq"],
                                on["positions"], cache.block_size, window, c.n_head // c.n_head_kv, kq_scale,
                                c.head_dim_v)
