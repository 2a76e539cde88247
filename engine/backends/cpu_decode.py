"""One decoded token of one sequence through every block, each kernel call bound once (`RowDecoder`).

The generic forward looks up every weight by name, quantizes, allocates and splits around each
kernel call, and picks each kernel per call: ~4,300 Python calls per gemma decode step, ~1.3 ms of
an 8.5 ms step on one thread (cProfile, `scripts/profile_decode.py`). A single-token step of one
sequence (`llmx run`, `chat`, a server with one request) is the common case, so here the same
kernels run on the same inputs, hence with the same bits, but with their weights, kernels, norm
vectors, output buffers and views resolved when the decoder is built; each step sets only the
token's position, cache cell and block table.

Anything else takes the generic forward: several rows, a row in its prompt's float order, a
weight multiplied unpacked or with a bias, a quantized KV cache, a matmul observer
(`llmx imatrix`), the first run's stubbed matmuls, or a step while another thread's is running.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from llmx.engine.attention import NO_CELLS, NO_PAIRS, attend_kernel, has_single_heads, wide_quads
from llmx.engine.backends.cpu import Stack
from llmx.engine.elementwise import NO_WEIGHT, add_norm_rows, gelu_rows, gelu_table, norm_rope_rows
from llmx.engine.kv_cache import KVCache, cell_bits, write_key_value_rows
from llmx.quant.cpu.activations import (
    q8_0_row,
    q8_k_row,
    quantize_q8_0,
    quantize_q8_0_into,
    quantize_q8_k,
    quantize_q8_k_into,
)
from llmx.quant.cpu.linear import PACKED_K_KERNELS, activation_quantizer, packed_k_kernel, packed_kernel
from llmx.quant.cpu.simd import host_isa


@dataclass(frozen=True)
class _Product:
    """One input row times one or more packed matrices, every call's arguments bound: the row is
    quantized once per activation type into buffers, then each kernel writes its output. The
    first type's quantization can be done by the fused kernel that makes the row (`run_quantized`)."""

    quantizer: Any  # the first activation type's `activation_quantizer`
    activations: tuple[np.ndarray, ...]  # its buffers [1, ...]: codes, scales (and Q8_K's sums)
    quantize: tuple[Any, tuple]  # (function, arguments) filling them from the input row
    rest: tuple[tuple[Any, tuple], ...]  # the other types' quantizations, then the kernels
    outputs: tuple[np.ndarray, ...]  # each weight's float32 [m_i], a view of its kernel's output

    def run(self) -> None:
        self.quantize_input()
        self.run_quantized()

    def quantize_input(self) -> None:
        function, args = self.quantize
        function(*args)

    def run_quantized(self) -> None:
        for function, args in self.rest:
            function(*args)


# `activation_quantizer`'s functions -> their single-thread versions writing into given buffers
_QUANTIZE_INTO = {quantize_q8_0: quantize_q8_0_into, quantize_q8_k: quantize_q8_k_into}


def _bind_product(backend, names: tuple[str, ...], x: np.ndarray, isa) -> _Product:
    """x float32 [1, k] (a buffer the decoder fills) times `names`' weights, stacks whole as
    `CpuBackend.linears` multiplies them."""
    quantizations, kernels, outputs, quantized = [], [], [], {}
    for step in backend._linears_plan(names):
        if isinstance(step, Stack):
            qtype, packed, bounds = step.qtype, step.packed, step.bounds
        else:
            name, qtype = step
            packed, bounds = backend._packed(f"{name}.weight"), (0, backend.tensors[f"{name}.weight"].shape[1])
        quantizer = activation_quantizer(qtype)
        if quantizer not in quantized:  # its buffers: what it returns for one row of zeros
            buffers = quantized[quantizer] = quantizer(np.zeros_like(x))
            quantizations.append((quantizer, buffers, (_QUANTIZE_INTO[quantizer], (x, *buffers))))
        out = np.empty((1, bounds[-1]), np.float32)
        k_quant = qtype in PACKED_K_KERNELS
        kernel = packed_k_kernel(qtype, isa) if k_quant else packed_kernel(qtype, isa)
        k_blocks = x.shape[1] // (256 if k_quant else 32)  # the kernels' count of activation blocks per row
        flat_activations = tuple(b.reshape(-1) for b in quantized[quantizer])  # (the kernels take them flat)
        kernels.append((kernel, (*flat_activations, packed, k_blocks, bounds[-1], 1, out, isa)))
        flat = out.reshape(-1)  # (a view: out is one contiguous row)
        outputs += [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    (quantizer, buffers, quantize), *others = quantizations
    return _Product(quantizer, buffers, quantize, tuple(call for *_, call in others) + tuple(kernels), tuple(outputs))


# -- fused kernels: each step's small operations in one call ------------------------------------
# In a decode step every call starts cold: the ~250 MB of weights it streams evict the code, the
# Python objects and the dispatch state of the small calls between the matmuls, so each costs
# several microseconds beyond its work (gemma, one thread: leaving out the q/k norms and rope saved
# 0.31 ms per step, the two add-norms 0.20 ms, GELU 0.15 ms). The same row functions in fewer calls
# give the same bits, and take numpy's error model as the parallel kernels do (inf activations give
# inf, not an exception).


@njit(cache=True, nogil=True, error_model="numpy")
def norm_rope_write(q, k, v, q_norm, k_norm, cos, sin, q_scale, scratch_q, scratch_k, q_out, k_out, neox, eps,
                    k_bits, v_bits, cells):
    """`norm_rope_rows` of one row, then its key and value into the cache (`write_key_value_rows`)."""
    norm_rope_rows(q, k, q_norm, k_norm, cos, sin, q_scale, scratch_q, scratch_k, q_out, k_out, neox, eps, 0, 1)
    write_key_value_rows(k_bits, v_bits, cells, k_out.reshape((1, k_out.size)), v)


@njit(cache=True, nogil=True, error_model="numpy")
def add_norm_q8_0(x, y, pre, norm, eps, total, normed, codes, scales):
    """`add_norm_rows` of one row, then the normed row quantized as `quantize_q8_0`."""
    add_norm_rows(x, y, pre, norm, eps, total, normed)
    q8_0_row(normed, 0, codes, scales)


@njit(cache=True, nogil=True, error_model="numpy")
def add_norm_q8_k(x, y, pre, norm, eps, total, normed, codes, scales, sums):
    """`add_norm_rows` of one row, then the normed row quantized as `quantize_q8_k`."""
    add_norm_rows(x, y, pre, norm, eps, total, normed)
    q8_k_row(normed, 0, codes, scales, sums)


@njit(cache=True, nogil=True, error_model="numpy")
def gelu_q8_0(gate, table, act, up, codes, scales):
    """act [1, ffn] = `gelu_rows`(gate) x up, then quantized as `quantize_q8_0`."""
    gelu_rows(gate, table, act[0], up)
    q8_0_row(act, 0, codes, scales)


@njit(cache=True, nogil=True, error_model="numpy")
def gelu_q8_k(gate, table, act, up, codes, scales, sums):
    """act [1, ffn] = `gelu_rows`(gate) x up, then quantized as `quantize_q8_k`."""
    gelu_rows(gate, table, act[0], up)
    q8_k_row(act, 0, codes, scales, sums)


# a product's first activation quantizer -> the fused kernel that makes and quantizes its row
_ADD_NORM_INTO = {quantize_q8_0: add_norm_q8_0, quantize_q8_k: add_norm_q8_k}
_GELU_INTO = {quantize_q8_0: gelu_q8_0, quantize_q8_k: gelu_q8_k}


@dataclass(frozen=True)
class _Block:
    """One block's calls, bound: its products, the views their outputs are read through, norms."""

    qkv: _Product
    q: np.ndarray  # float32 [1, n_head, head_dim], a view of a qkv output
    k: np.ndarray  # float32 [1, n_head_kv, head_dim]
    v: np.ndarray  # float32 [1, n_head_kv * head_dim_v]
    q_norm: np.ndarray  # (NO_WEIGHT: none)
    k_norm: np.ndarray
    attn_output: _Product
    gate_up: _Product
    ffn_down: _Product
    attn_out: np.ndarray  # float32 [1, n_embd]: attn_output's output
    ffn_out: np.ndarray  # float32 [1, n_embd]: ffn_down's output
    post_attention_norm: np.ndarray  # (NO_WEIGHT: none)
    ffn_norm: np.ndarray
    post_ffw_norm: np.ndarray
    next_norm: np.ndarray  # the next block's attn_norm (NO_WEIGHT after the last)
    next_qkv: _Product | None  # the next block's qkv, whose activations the last add_norm makes
    rope_base: float
    window: int
    q_scale: np.float32
    kq_scale: np.float32


class RowDecoder:
    """A `CpuBackend`'s weights bound for single-token decode steps (`decode`). Build it with
    `bind`, which returns None for a model it does not cover."""

    def __init__(self, backend, layers: list, rope) -> None:
        c = backend.config
        self.isa = host_isa() if backend.isa is None else backend.isa
        self.eps = float(c.rms_eps)
        self.neox = c.rope_layout != "normal"
        self.group = c.n_head // c.n_head_kv
        wide = wide_quads(backend.wide_attention, self.group, c.head_dim, c.head_dim_v)  # as `attend_paged` picks
        self.attend = attend_kernel(wide, has_single_heads(self.group, c.head_dim, c.head_dim_v))
        self.gelu_table = gelu_table() if c.activation != "silu" else None
        self.activate = backend.activate  # (silu: gelu is fused with its quantization)
        # the step's rows, reused by every step (`decode` returns a copy of its result)
        self.x = (np.empty((1, c.n_embd), np.float32), np.empty((1, c.n_embd), np.float32))  # in turn
        self.h = np.empty((1, c.n_embd), np.float32)  # the normed residual stream: qkv's and gate_up's input
        self.q_out = np.empty((1, c.n_head, c.head_dim), np.float32)
        self.k_out = np.empty((1, c.n_head_kv, c.head_dim), np.float32)
        self.scratch_q, self.scratch_k = np.empty_like(self.q_out), np.empty_like(self.k_out)
        self.attn = np.empty((1, c.n_head, c.head_dim_v), np.float32)
        self.act = np.empty((1, backend.tensors[f"{layers[0].ffn_down}.weight"].shape[0]), np.float32)
        self.row_seq = np.zeros(1, np.int64)
        self.row_tiled = np.zeros(1, np.uint8)  # a decoded token: ggml_vec_dot_f16's order
        self.blocks: list[_Block] = []
        for plan in reversed(layers):  # (each block's last add_norm quantizes the next one's input)
            self.blocks.insert(0, self._bind_block(backend, plan, self.blocks[0].qkv if self.blocks else None))
        self.rope = rope  # the Transformer's `_rope(base, positions)`
        self._rope_tables: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # base -> cos, sin of positions 0..
        self.busy = threading.Lock()  # the buffers are one step's: a second thread takes the generic blocks
        self._pools: tuple = (lambda: None, [])  # (weakref of the cache, per-layer views of its pools)

    @classmethod
    def bind(cls, backend, layers: list, rope) -> RowDecoder | None:
        """The decoder of `backend`'s model (`layers`: the Transformer's `LayerPlan`s; `rope`: its
        `_rope(base, positions)` -> cos, sin), or None when a block multiplies a weight unpacked or
        with a bias, or the blocks' FFN sizes differ."""
        names = [(*p.qkv, p.attn_output, *p.gate_up, p.ffn_down) for p in layers]
        if not layers or any(not backend.is_packed(n) or f"{n}.bias" in backend.tensors for n in sum(names, ())):
            return None
        if len({backend.tensors[f"{p.ffn_down}.weight"].shape[0] for p in layers}) > 1:
            return None
        return cls(backend, layers, rope)

    def _bind_block(self, backend, plan, next_qkv: _Product | None) -> _Block:
        c = backend.config
        attn_rows = self.attn.reshape(1, -1)
        qkv, o = _bind_product(backend, plan.qkv, self.h, self.isa), _bind_product(backend, (plan.attn_output,),
                                                                                    attn_rows, self.isa)
        down = _bind_product(backend, (plan.ffn_down,), self.act, self.isa)
        q, k, v = qkv.outputs

        def vector(name):
            return NO_WEIGHT if name is None else backend._vector(name)

        return _Block(qkv=qkv, q=q.reshape(1, c.n_head, c.head_dim), k=k.reshape(1, c.n_head_kv, c.head_dim),
                      v=v.reshape(1, -1), q_norm=vector(plan.qk_norms[0]), k_norm=vector(plan.qk_norms[1]),
                      attn_output=o, gate_up=_bind_product(backend, plan.gate_up, self.h, self.isa),
                      ffn_down=down, attn_out=o.outputs[0].reshape(1, -1), ffn_out=down.outputs[0].reshape(1, -1),
                      post_attention_norm=vector(plan.post_attention_norm), ffn_norm=vector(plan.ffn_norm),
                      post_ffw_norm=vector(plan.post_ffw_norm), next_norm=vector(plan.next_norm), next_qkv=next_qkv,
                      rope_base=plan.rope_base, window=plan.window or 0,
                      q_scale=np.float32(1 if plan.q_scale is None else plan.q_scale),
                      kq_scale=np.float32(plan.kq_scale))

    def _layer_pools(self, cache: KVCache) -> list[tuple]:
        """Per layer: its keys' and values' float16 bits by cell (for the write), and as bytes
        (for attention). Held by a weak reference: a released cache's memory goes."""
        if self._pools[0]() is not cache:
            views = [(cell_bits(k), cell_bits(v), k.reshape(-1).view(np.uint8), v.reshape(-1).view(np.uint8))
                     for k, v in zip(cache.keys, cache.values, strict=True)]
            self._pools = (weakref.ref(cache), views)
        return self._pools[1]

    def _rope_row(self, base: float, position: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin float32 [1, rope_dim / 2] at `position`: rows of tables computed by the
        Transformer's `_rope` for positions 0.. (elementwise, so the same bits as for one
        position), doubled in length when a position passes their end."""
        table = self._rope_tables.get(base)
        if table is None or position >= len(table[0]):
            table = self._rope_tables[base] = self.rope(base, np.arange(max(256, 2 * position)))
        cos, sin = table
        return cos[position:position + 1], sin[position:position + 1]

    def decode(self, x: np.ndarray, h: np.ndarray, layout, cache: KVCache) -> np.ndarray | None:
        """x, h float32 [1, n_embd] (the embedding and its attn_norm) -> the last block's output
        (a new array); None while another thread decodes with these buffers."""
        if not self.busy.acquire(blocking=False):
            return None
        try:
            return self._blocks(x, h, layout, cache)
        finally:
            self.busy.release()

    def _blocks(self, x: np.ndarray, h: np.ndarray, layout, cache: KVCache) -> np.ndarray:
        pools = self._layer_pools(cache)
        tables = np.ascontiguousarray(layout.tables, dtype=np.int32)
        positions, cells, block_size = layout.positions, layout.cells, cache.block_size
        position = int(positions[0])
        xs, gelu = self.x, self.gelu_table is not None
        np.copyto(xs[0], x)
        np.copyto(self.h, h)
        self.blocks[0].qkv.quantize_input()  # (each later block's comes from the block before)
        at = 0  # xs[at]: the residual stream
        for layer, block in enumerate(self.blocks):
            cos, sin = self._rope_row(block.rope_base, position)
            k_bits, v_bits, k_bytes, v_bytes = pools[layer]
            block.qkv.run_quantized()
            norm_rope_write(block.q, block.k, block.v, block.q_norm, block.k_norm, cos, sin, block.q_scale,
                            self.scratch_q, self.scratch_k, self.q_out, self.k_out, self.neox, self.eps, k_bits,
                            v_bits, cells)
            self.attend(self.q_out, k_bytes, v_bytes, tables, self.row_seq, block_size, positions, block.window,
                        self.group, block.kq_scale, self.row_tiled, NO_PAIRS, NO_CELLS, self.attn)
            block.attn_output.run()
            _ADD_NORM_INTO[block.gate_up.quantizer](xs[at], block.attn_out, block.post_attention_norm, block.ffn_norm,
                                                    self.eps, xs[1 - at], self.h, *block.gate_up.activations)
            at = 1 - at
            block.gate_up.run_quantized()
            gate, up = block.gate_up.outputs
            if gelu:
                _GELU_INTO[block.ffn_down.quantizer](gate, self.gelu_table, self.act, up, *block.ffn_down.activations)
                block.ffn_down.run_quantized()
            else:
                self.act[0] = self.activate(gate, up)
                block.ffn_down.run()
            if block.next_qkv is None:
                add_norm_rows(xs[at], block.ffn_out, block.post_ffw_norm, NO_WEIGHT, self.eps, xs[1 - at], self.h)
            else:
                _ADD_NORM_INTO[block.next_qkv.quantizer](xs[at], block.ffn_out, block.post_ffw_norm, block.next_norm,
                                                         self.eps, xs[1 - at], self.h, *block.next_qkv.activations)
            at = 1 - at
        return xs[at].copy()
