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
(`llmx imatrix`), or the first run's stubbed matmuls.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmx.engine.attention import NO_CELLS, NO_PAIRS, attend_kernel, has_single_heads
from llmx.engine.backends.cpu import Stack
from llmx.engine.elementwise import NO_WEIGHT, add_norm_rows, gelu_rows, gelu_table, norm_rope_rows
from llmx.engine.kv_cache import KVCache, cell_bits, write_key_value_rows
from llmx.quant.cpu.activations import quantize_q8_0, quantize_q8_0_into, quantize_q8_k, quantize_q8_k_into
from llmx.quant.cpu.linear import PACKED_K_KERNELS, activation_quantizer, packed_k_kernel, packed_kernel
from llmx.quant.cpu.simd import VNNI, has_avx512_pairs, host_isa


@dataclass(frozen=True)
class _Product:
    """One input row times one or more packed matrices, every call's arguments bound: the row is
    quantized once per activation type into buffers, then each kernel writes its output."""

    calls: tuple[tuple[Any, tuple], ...]  # (function, its arguments), in order
    outputs: tuple[np.ndarray, ...]  # each weight's float32 [m_i], a view of its kernel's output

    def run(self) -> None:
        for function, args in self.calls:
            function(*args)


# `activation_quantizer`'s functions -> their single-thread versions writing into given buffers
_QUANTIZE_INTO = {quantize_q8_0: quantize_q8_0_into, quantize_q8_k: quantize_q8_k_into}


def _bind_product(backend, names: tuple[str, ...], x: np.ndarray, isa) -> _Product:
    """x float32 [1, k] (a buffer the decoder fills) times `names`' weights, stacks whole as
    `CpuBackend.linears` multiplies them."""
    calls, outputs, quantized = [], [], {}
    for step in backend._linears_plan(names):
        if isinstance(step, Stack):
            qtype, packed, bounds = step.qtype, step.packed, step.bounds
        else:
            name, qtype = step
            packed, bounds = backend._packed(f"{name}.weight"), (0, backend.tensors[f"{name}.weight"].shape[1])
        quantizer = activation_quantizer(qtype)
        if quantizer not in quantized:
            buffers = _activation_buffers(quantizer, x.shape[1])
            calls.append((_QUANTIZE_INTO[quantizer], (x, *buffers)))
            quantized[quantizer] = tuple(b.reshape(-1) for b in buffers)  # the kernels take them flat
        out = np.empty((1, bounds[-1]), np.float32)
        k_quant = qtype in PACKED_K_KERNELS
        kernel = packed_k_kernel(qtype, isa) if k_quant else packed_kernel(qtype, isa)
        k_blocks = x.shape[1] // (256 if k_quant else 32)  # the kernels' count of activation blocks per row
        calls.append((kernel, (*quantized[quantizer], packed, k_blocks, bounds[-1], 1, out, isa)))
        flat = out.reshape(-1)  # (a view: out is one contiguous row)
        outputs += [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return _Product(tuple(calls), tuple(outputs))


def _activation_buffers(quantizer, k: int) -> tuple[np.ndarray, ...]:
    """What `quantizer` makes of one row of k values: Q8_0 codes and scales per 32, or Q8_K codes,
    scales per 256 and sums per 16."""
    if quantizer is quantize_q8_0:
        return np.empty((1, k), np.int8), np.empty((1, k // 32), np.float32)
    return np.empty((1, k), np.int8), np.empty((1, k // 256), np.float32), np.empty((1, k // 16), np.int32)


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
    rope_base: float
    window: int
    q_scale: np.float32
    kq_scale: np.float32


class RowDecoder:
    """A `CpuBackend`'s weights bound for single-token decode steps (`decode`). Build it with
    `bind`, which returns None for a model it does not cover."""

    def __init__(self, backend, layers: list) -> None:
        c = backend.config
        self.isa = host_isa() if backend.isa is None else backend.isa
        self.eps = float(c.rms_eps)
        self.neox = c.rope_layout != "normal"
        self.group = c.n_head // c.n_head_kv
        wide = (backend.isa is None or backend.isa is VNNI) and self.group % 4 == 0 and c.head_dim % 8 == 0 \
            and c.head_dim_v % 16 == 0 and has_avx512_pairs()  # as `attend_paged` picks
        self.attend = attend_kernel(wide, has_single_heads(self.group, c.head_dim, c.head_dim_v))
        self.gelu_table = gelu_table() if c.activation != "silu" else None
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
        self.blocks = [self._bind_block(backend, plan) for plan in layers]
        self.busy = threading.Lock()  # the buffers are one step's: a second thread takes the generic blocks
        self._pools: tuple = (lambda: None, [])  # (weakref of the cache, per-layer views of its pools)

    @classmethod
    def bind(cls, backend, layers: list) -> RowDecoder | None:
        """The decoder of `backend`'s model (`layers`: the Transformer's `LayerPlan`s), or None
        when a block multiplies a weight unpacked or with a bias, or the blocks' FFN sizes differ."""
        names = [(*p.qkv, p.attn_output, *p.gate_up, p.ffn_down) for p in layers]
        if not layers or any(not backend.is_packed(n) or f"{n}.bias" in backend.tensors for n in sum(names, ())):
            return None
        if len({backend.tensors[f"{p.ffn_down}.weight"].shape[0] for p in layers}) > 1:
            return None
        return cls(backend, layers)

    def _bind_block(self, backend, plan) -> _Block:
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
                      post_ffw_norm=vector(plan.post_ffw_norm), next_norm=vector(plan.next_norm),
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

    def decode(self, x: np.ndarray, h: np.ndarray, layout, cache: KVCache, rope_tables) -> np.ndarray | None:
        """x, h float32 [1, n_embd] (the embedding and its attn_norm) -> the last block's output
        (a new array); None while another thread decodes with these buffers."""
        if not self.busy.acquire(blocking=False):
            return None
        try:
            return self._blocks(x, h, layout, cache, rope_tables)
        finally:
            self.busy.release()

    def _blocks(self, x: np.ndarray, h: np.ndarray, layout, cache: KVCache, rope_tables) -> np.ndarray:
        pools = self._layer_pools(cache)
        tables = np.ascontiguousarray(layout.tables, dtype=np.int32)
        positions, cells, block_size = layout.positions, layout.cells, cache.block_size
        xs = self.x
        np.copyto(xs[0], x)
        np.copyto(self.h, h)
        at = 0  # xs[at]: the residual stream
        for layer, block in enumerate(self.blocks):
            cos, sin = rope_tables(block.rope_base)
            k_bits, v_bits, k_bytes, v_bytes = pools[layer]
            block.qkv.run()
            norm_rope_rows(block.q, block.k, block.q_norm, block.k_norm, cos, sin, block.q_scale, self.scratch_q,
                           self.scratch_k, self.q_out, self.k_out, self.neox, self.eps, 0, 1)
            write_key_value_rows(k_bits, v_bits, cells, self.k_out.reshape(1, -1), block.v)
            self.attend(self.q_out, k_bytes, v_bytes, tables, self.row_seq, block_size, positions, block.window,
                        self.group, block.kq_scale, self.row_tiled, NO_PAIRS, NO_CELLS, self.attn)
            block.attn_output.run()
            add_norm_rows(xs[at], block.attn_out, block.post_attention_norm, block.ffn_norm, self.eps, xs[1 - at],
                          self.h)
            at = 1 - at
            block.gate_up.run()
            self._activate(*block.gate_up.outputs)
            block.ffn_down.run()
            add_norm_rows(xs[at], block.ffn_out, block.post_ffw_norm, block.next_norm, self.eps, xs[1 - at], self.h)
            at = 1 - at
        return xs[at].copy()

    def _activate(self, gate: np.ndarray, up: np.ndarray) -> None:
        """act = the gate's activation times up (float32 [ffn] each), as `CpuBackend.activate`."""
        if self.gelu_table is not None:
            gelu_rows(gate, self.gelu_table, self.act.reshape(-1), up)
            return
        self.act[0] = gate / (np.float32(1) + np.exp(-gate)) * up
