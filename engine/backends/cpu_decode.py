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
from llmx.quant.cpu.linear import PACKED_K_KERNELS, activation_quantizer, packed_k_kernel, packed_kernel
from llmx.quant.cpu.simd import VNNI, has_avx512_pairs, host_isa


@dataclass(frozen=True)
class _Matmul:
    """One packed matrix (a weight, or a stack of them) multiplying one row into `out`."""

    quantizer: Any  # `activation_quantizer` of its type: its result feeds `kernel`
    kernel: Any
    packed: np.ndarray
    k_blocks: int  # the kernel's count of activation blocks per row: k / 256 (k-quants) or k / 32
    k_quant: bool  # Q8_K activations (codes, scales, sums) rather than Q8_0's (codes, scales)
    m: int
    out: np.ndarray  # float32 [1, m]


def _run(steps: tuple[_Matmul, ...], x: np.ndarray, isa) -> None:
    """Each step's out = x @ its matrix.T, x quantized once per activation type."""
    quantized: dict = {}
    for step in steps:
        q = quantized.get(step.quantizer)
        if q is None:
            q = quantized[step.quantizer] = step.quantizer(x)
        if step.k_quant:
            step.kernel(q[0].reshape(-1), q[1].reshape(-1), q[2].reshape(-1), step.packed, step.k_blocks, step.m, 1,
                        step.out, isa)
        else:
            step.kernel(q[0].reshape(-1), q[1].reshape(-1), step.packed, step.k_blocks, step.m, 1, step.out, isa)


@dataclass(frozen=True)
class _Block:
    """One block's calls, bound: matmul steps, the views their outputs are read through, norms."""

    qkv: tuple[_Matmul, ...]
    q: np.ndarray  # float32 [1, n_head, head_dim], a view of a qkv step's output
    k: np.ndarray  # float32 [1, n_head_kv, head_dim]
    v: np.ndarray  # float32 [1, n_head_kv * head_dim_v]
    q_norm: np.ndarray  # (empty: none)
    k_norm: np.ndarray
    attn_output: tuple[_Matmul, ...]
    gate_up: tuple[_Matmul, ...]
    gate: np.ndarray  # float32 [ffn], a view
    up: np.ndarray
    ffn_down: tuple[_Matmul, ...]
    post_attention_norm: np.ndarray  # (empty: none)
    ffn_norm: np.ndarray
    post_ffw_norm: np.ndarray
    next_norm: np.ndarray  # the next block's attn_norm (empty after the last)
    rope_base: float
    window: int
    q_scale: np.float32
    kq_scale: np.float32


class RowDecoder:
    """A `CpuBackend`'s weights bound for single-token decode steps (`decode`); `build` returns
    None for a model it does not cover."""

    def __init__(self, backend, blocks: list[_Block], isa) -> None:
        c = backend.config
        self.blocks, self.isa = blocks, isa
        self.eps = float(c.rms_eps)
        self.neox = c.rope_layout != "normal"
        self.group = c.n_head // c.n_head_kv
        wide = (backend.isa is None or backend.isa is VNNI) and self.group % 4 == 0 and c.head_dim % 8 == 0 \
            and c.head_dim_v % 16 == 0 and has_avx512_pairs()  # as `attend_paged` picks
        self.attend = attend_kernel(wide, has_single_heads(self.group, c.head_dim, c.head_dim_v))
        self.gelu_table = gelu_table() if c.activation != "silu" else None
        # outputs and scratch, reused by every step (`decode` returns a copy of its result)
        self.x = (np.empty((1, c.n_embd), np.float32), np.empty((1, c.n_embd), np.float32))  # in turn
        self.h = np.empty((1, c.n_embd), np.float32)
        self.q_out = np.empty((1, c.n_head, c.head_dim), np.float32)
        self.k_out = np.empty((1, c.n_head_kv, c.head_dim), np.float32)
        self.scratch_q, self.scratch_k = np.empty_like(self.q_out), np.empty_like(self.k_out)
        self.attn = np.empty((1, c.n_head, c.head_dim_v), np.float32)
        self.act = np.empty((1, blocks[0].gate.shape[0]), np.float32)
        self.row_seq = np.zeros(1, np.int64)
        self.row_tiled = np.zeros(1, np.uint8)  # a decoded token: ggml_vec_dot_f16's order
        self.busy = threading.Lock()  # the buffers are one step's: a second thread takes the generic blocks
        self._pools: tuple = (lambda: None, [])  # (weakref of the cache, per-layer views of its pools)

    @classmethod
    def build(cls, backend, layers: list) -> RowDecoder | None:
        """`layers`: the Transformer's `LayerPlan`s."""
        isa = host_isa() if backend.isa is None else backend.isa
        blocks = [_bind_block(backend, plan, isa) for plan in layers]
        if not blocks or None in blocks or len({b.gate.shape[0] for b in blocks}) > 1:
            return None
        return cls(backend, blocks, isa)

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
        xs, attn_rows = self.x, self.attn.reshape(1, -1)
        np.copyto(xs[0], x)
        np.copyto(self.h, h)
        at = 0  # xs[at]: the residual stream
        for layer, block in enumerate(self.blocks):
            cos, sin = rope_tables(block.rope_base)
            k_bits, v_bits, k_bytes, v_bytes = pools[layer]
            _run(block.qkv, self.h, self.isa)
            norm_rope_rows(block.q, block.k, block.q_norm, block.k_norm, cos, sin, block.q_scale, self.scratch_q,
                           self.scratch_k, self.q_out, self.k_out, self.neox, self.eps, 0, 1)
            write_key_value_rows(k_bits, v_bits, cells, self.k_out.reshape(1, -1), block.v)
            self.attend(self.q_out, k_bytes, v_bytes, tables, self.row_seq, block_size, positions, block.window,
                        self.group, block.kq_scale, self.row_tiled, NO_PAIRS, NO_CELLS, self.attn)
            _run(block.attn_output, attn_rows, self.isa)
            add_norm_rows(xs[at], block.attn_output[0].out, block.post_attention_norm, block.ffn_norm, self.eps,
                          xs[1 - at], self.h)
            at = 1 - at
            _run(block.gate_up, self.h, self.isa)
            self._activate(block)
            _run(block.ffn_down, self.act, self.isa)
            add_norm_rows(xs[at], block.ffn_down[0].out, block.post_ffw_norm, block.next_norm, self.eps,
                          xs[1 - at], self.h)
            at = 1 - at
        return xs[at].copy()

    def _activate(self, block: _Block) -> None:
        if self.gelu_table is not None:
            gelu_rows(block.gate, self.gelu_table, self.act.reshape(-1), block.up)
            return
        gate = block.gate
        self.act[0] = gate / (np.float32(1) + np.exp(-gate)) * block.up  # as `CpuBackend.activate`


def _bind_block(backend, plan, isa) -> _Block | None:
    """`plan`'s calls bound to `backend`'s packed weights, or None when a weight is multiplied
    unpacked or has a bias."""
    c = backend.config
    names = (*plan.qkv, plan.attn_output, *plan.gate_up, plan.ffn_down)
    if any(not backend.is_packed(n) or f"{n}.bias" in backend.tensors for n in names):
        return None
    qkv, (q, k, v) = _bind_matmuls(backend, plan.qkv, isa)
    o, _ = _bind_matmuls(backend, (plan.attn_output,), isa)
    gate_up, (gate, up) = _bind_matmuls(backend, plan.gate_up, isa)
    down, _ = _bind_matmuls(backend, (plan.ffn_down,), isa)

    def vector(name):
        return NO_WEIGHT if name is None else backend._vector(name)

    return _Block(qkv=qkv, q=q.reshape(1, c.n_head, c.head_dim), k=k.reshape(1, c.n_head_kv, c.head_dim),
                  v=v.reshape(1, -1), q_norm=vector(plan.qk_norms[0]), k_norm=vector(plan.qk_norms[1]),
                  attn_output=o, gate_up=gate_up, gate=gate, up=up, ffn_down=down,
                  post_attention_norm=vector(plan.post_attention_norm), ffn_norm=vector(plan.ffn_norm),
                  post_ffw_norm=vector(plan.post_ffw_norm), next_norm=vector(plan.next_norm),
                  rope_base=plan.rope_base, window=plan.window or 0,
                  q_scale=np.float32(1 if plan.q_scale is None else plan.q_scale), kq_scale=np.float32(plan.kq_scale))


def _bind_matmuls(backend, names: tuple[str, ...], isa) -> tuple[tuple[_Matmul, ...], list[np.ndarray]]:
    """The steps that multiply one row by `names`' weights (stacks whole, as `linears` runs
    them), and each weight's output as a flat view [m_i] of its step's output."""
    steps, outputs = [], []
    for step in backend._linears_plan(names):
        if isinstance(step, Stack):
            first, qtype, packed, bounds = step.names[0], step.qtype, step.packed, step.bounds
        else:
            (first, qtype), packed = step, backend._packed(f"{step[0]}.weight")
            bounds = (0, backend.tensors[f"{first}.weight"].shape[1])
        k = backend.tensors[f"{first}.weight"].shape[0]
        k_quant = qtype in PACKED_K_KERNELS
        kernel = packed_k_kernel(qtype, isa) if k_quant else packed_kernel(qtype, isa)
        out = np.empty((1, bounds[-1]), np.float32)
        steps.append(_Matmul(activation_quantizer(qtype), kernel, packed, k // (256 if k_quant else 32), k_quant,
                             bounds[-1], out))
        flat = out.reshape(-1)  # (a view: out is one contiguous row)
        outputs += [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return tuple(steps), outputs
