"""One `Transformer` for every supported family, driven by `ModelConfig` flags.

Weights stay in their GGUF form on the mmap (`GGUFTensor`s, named as in the file) and every
matmul goes through `quant.cpu.linear.matmul`, which quantizes activations the way llama.cpp's
CPU backend does. The elementwise parts follow llama.cpp too: float32 math, RMSNorm sums in
float64, keys and values stored as float16 (llama.cpp's default cache type), queries and
attention probabilities rounded to float16 where ggml's float16 matmuls round them.

A forward pass takes tokens of one or more sequences at once: their matmuls run as one batch,
and attention reads each sequence's keys and values through its block table in the paged
`KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmx.engine.attention import attend_paged
from llmx.engine.config import ModelConfig
from llmx.engine.elementwise import apply_rope, gelu_tanh_f16, rms_norm
from llmx.engine.kv_cache import KVCache, SequenceHandle, prompt_order
from llmx.engine.weights_check import check_weights
from llmx.errors import LlmxError
from llmx.formats.gguf_file import GGUFFile, GGUFTensor
from llmx.quant.cpu.dequantize import dequantize
from llmx.quant.cpu.linear import activation_quantizer, matmul, matmul_packed, pack, packable, quantize_activations
from llmx.quant.cpu.repacked import Q8_0_BLOCK_BYTES, q8_0_rows
from llmx.quant.cpu.simd import VNNI
from llmx.quant.qtypes import QType

# Weights that multiply one input, in the order the forward asks for them: consecutive ones that
# are packed alike are packed as one matrix, one kernel call (the per-call cost is most of a small
# model's decode matmul time).
STACKABLE = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))
BACKGROUND_PACK_BYTES = 64 << 20  # larger matrices are packed on a thread (`Transformer._pack`)


@dataclass(frozen=True)
class BatchLayout:
    """Where one forward call's rows live in the cache, worked out once for all layers."""

    lengths: list[int]  # new tokens per sequence
    positions: np.ndarray  # int64 [n]
    cells: np.ndarray  # int64 [n]: flat cache cell of each row
    row_seq: np.ndarray  # int64 [n]: index of each row's sequence
    tables: np.ndarray  # int32 [n_seqs, blocks]
    prompt_rows: np.ndarray  # bool [n]: rows in their prompt's float order (`kv_cache.prompt_order`)
    # rope's cos/sin per rope base, computed by the first layer that needs them
    rope_tables: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def build(cls, batch: Sequence[tuple[SequenceHandle, np.ndarray]], cache: KVCache) -> BatchLayout:
        positions = [cache.reserve(seq, len(tokens)) for seq, tokens in batch]
        seqs = [seq for seq, _ in batch]
        return cls(lengths=[len(p) for p in positions], positions=np.concatenate(positions),
                   cells=np.concatenate([cache.cells(s, p) for s, p in zip(seqs, positions, strict=True)]),
                   row_seq=np.repeat(np.arange(len(seqs)), [len(p) for p in positions]),
                   tables=cache.block_tables(seqs),
                   prompt_rows=np.concatenate([prompt_order(p, s.prompt_length) for s, p in zip(seqs, positions,
                                                                                                strict=True)]))


@dataclass(frozen=True)
class Stack:
    """Several weights' rows packed as one matrix (`STACKABLE`)."""

    names: tuple[str, ...]  # without ".weight"
    qtype: QType
    packed: np.ndarray
    bounds: tuple[int, ...]  # the output column where each weight's rows start, then the total

    def split(self, out: np.ndarray) -> list[np.ndarray]:
        """out [n, total] -> each weight's [n, m_i], contiguous (what the next kernels take)."""
        return [np.ascontiguousarray(out[:, a:b]) for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]


@dataclass
class Transformer:
    config: ModelConfig
    tensors: dict[str, GGUFTensor]
    threads: int | None = None
    isa: Any = None  # a `simd` instruction-set marker (None: the host's best)
    # Called with (weight name, float32 input [n, k]) before each matmul: `llmx imatrix` listens here.
    observe_matmul: Callable[[str, np.ndarray], None] | None = None
    # weight name -> its packed copy (`linear.pack`, `will_pack`), or a Future of it while a thread
    # packs it: read through `_packed`
    packed: dict[str, np.ndarray | Future] = field(init=False, default_factory=dict)
    # weight name (without ".weight") -> the stack it is packed in, for the weights in one
    stacks: dict[str, Stack] = field(init=False, default_factory=dict)
    # A first run compiles the matmul kernels in a helper process (`precompile`) while this one
    # compiles the rest with the matmuls stubbed out (zeros), then waits, per number of rows, until
    # the helper has them in the cache: `await_kernels(n_rows, weight name)`.
    stub_matmuls: bool = field(init=False, default=False)
    await_kernels: Callable[[int, str], None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        check_weights(self.config, self.tensors)
        for layer in range(self.config.n_layer):
            for group in STACKABLE:
                for names in self._stackable_runs([f"blk.{layer}.{role}" for role in group]):
                    self._stack(names)
        for name, tensor in self.tensors.items():
            if name[: -len(".weight")] not in self.stacks and will_pack(name, tensor, self.config):
                self.packed[name] = self._pack(tensor)

    @staticmethod
    def _pack(tensor: GGUFTensor) -> np.ndarray | Future:
        """`pack`, or for a matrix of over 64 MB (a tied output table) a Future of it: packed on a
        thread (the packer releases the GIL) while the load goes on; `_packed` waits for it."""
        rows = tensor.data.view(np.uint8)
        if rows.nbytes <= BACKGROUND_PACK_BYTES:
            return pack(rows, tensor.qtype)
        pool = ThreadPoolExecutor(1, thread_name_prefix="llmx-pack")
        future = pool.submit(pack, rows, tensor.qtype)
        pool.shutdown(wait=False)  # the thread ends with the job
        return future

    def _packed(self, name: str) -> np.ndarray | None:
        """Weight `name`'s packed copy (None: multiplied as stored)."""
        packed = self.packed.get(name)
        if isinstance(packed, Future):
            packed = self.packed[name] = packed.result()
        return packed

    @staticmethod
    def packed_weights(config: ModelConfig, tensors: dict[str, GGUFTensor]) -> set[str]:
        """The weights a Transformer of these tensors multiplies packed, and never reads as stored
        after packing them: a private copy of the file need not hold them (`load_into_memory`)."""
        return {name for name, tensor in tensors.items() if will_pack(name, tensor, config)}

    def _stackable_runs(self, names: list[str]) -> list[list[str]]:
        """Maximal runs of two or more consecutive weights, each of a type `pack` packs, of one type
        and row length, without a bias."""
        def key(name: str):
            tensor = self.tensors.get(f"{name}.weight")
            if tensor is None or tensor.data.ndim != 2 or f"{name}.bias" in self.tensors:
                return None
            rows = tensor.data.view(np.uint8)
            return (tensor.qtype, rows.shape[1]) if packable(tensor.qtype, len(rows)) else None

        runs: list[list[str]] = []
        for name in names:
            if key(name) is not None and runs and key(runs[-1][-1]) == key(name):
                runs[-1].append(name)
            else:
                runs.append([name])
        return [run for run in runs if len(run) > 1 and key(run[0]) is not None]

    def _stack(self, names: list[str]) -> None:
        tensors = [self.tensors[f"{name}.weight"] for name in names]
        rows = np.concatenate([t.data.view(np.uint8) for t in tensors])
        bounds = tuple(np.cumsum([0] + [t.data.view(np.uint8).shape[0] for t in tensors]).tolist())
        stack = Stack(tuple(names), tensors[0].qtype, pack(rows, tensors[0].qtype), bounds)
        for name in names:
            self.stacks[name] = stack

    def is_packed(self, name: str) -> bool:
        """Whether weight `name` (without ".weight") is multiplied repacked, alone or in a stack."""
        return f"{name}.weight" in self.packed or name in self.stacks

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, config: ModelConfig, threads: int | None = None, isa: Any = None) -> Transformer:
        return cls(config, gguf.tensors, threads, isa)

    # -- weights ------------------------------------------------------------------------

    def _tensor(self, name: str) -> GGUFTensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise LlmxError(f"the model file has no tensor {name!r}; it does not fit its architecture")
        return tensor

    def _vector(self, name: str) -> np.ndarray:
        return self._tensor(name).data.astype(np.float32, copy=False)

    def _linear(self, x: np.ndarray, name: str, quantized: tuple | None = None) -> np.ndarray:
        """x [n, k] @ W[name].T -> [n, m], plus the bias when the file has one."""
        tensor = self._tensor(f"{name}.weight")
        if self.observe_matmul is not None:
            self.observe_matmul(tensor.name, x)
        wait = self.await_kernels  # a local: the wait may set the attribute to None
        if wait is not None:
            wait(len(x), name)
        if self.stub_matmuls:
            return np.zeros((len(x), tensor.shape[1]), np.float32)
        stack = self.stacks.get(name)
        if stack is not None:  # alone (the compile helper asks so): the whole stack, then its part
            return self._stacked(x, stack, quantized)[stack.names.index(name)]
        out = matmul(x, tensor.data.view(np.uint8), tensor.qtype, threads=self.threads, isa=self.isa,
                     quantized=quantized, packed=self._packed(tensor.name))
        bias = self.tensors.get(f"{name}.bias")
        return out if bias is None else out + bias.data.astype(np.float32)

    def _stacked(self, x: np.ndarray, stack: Stack, quantized: tuple | None) -> list[np.ndarray]:
        out = matmul_packed(x, stack.packed, stack.qtype, stack.bounds[-1], threads=self.threads, isa=self.isa,
                            quantized=quantized)
        return stack.split(out)

    def _linears(self, x: np.ndarray, *names: str) -> list[np.ndarray]:
        """`_linear` of one input with several weights, the input quantized once per activation type,
        and the weights of a stack in one call."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        wait = self.await_kernels  # a local: the last wait sets the attribute to None
        if wait is not None:
            for name in names:  # before quantizing x: the quantizers are the helper's too
                wait(len(x), name)
        if self.stub_matmuls:
            return [self._linear(x, name) for name in names]
        quantized: dict = {}
        outs: list[np.ndarray] = []
        while len(outs) < len(names):
            name = names[len(outs)]
            qtype = self._tensor(f"{name}.weight").qtype
            kind = activation_quantizer(qtype)
            if kind is not None and kind not in quantized:
                quantized[kind] = quantize_activations(x, qtype)
            stack = self.stacks.get(name)
            if stack is not None and names[len(outs):len(outs) + len(stack.names)] == stack.names:
                if self.observe_matmul is not None:
                    for member in stack.names:
                        self.observe_matmul(f"{member}.weight", x)
                outs += self._stacked(x, stack, quantized.get(kind))
            else:
                outs.append(self._linear(x, name, quantized.get(kind)))
        return outs

    def _embed(self, tokens: np.ndarray) -> np.ndarray:
        table = self._tensor("token_embd.weight")
        packed = self._packed(table.name)
        if packed is None:
            rows = np.ascontiguousarray(table.data[tokens]).view(np.uint8)
        else:  # a tied Q8_0 table, read from its packed copy (the stored one may not be in memory)
            nb = table.data.view(np.uint8).shape[1] // Q8_0_BLOCK_BYTES
            rows = q8_0_rows(packed, np.asarray(tokens, np.int64), nb)
        x = dequantize(rows, table.qtype).reshape(len(tokens), -1)  # [n_tok, n_embd]
        if self.config.embed_scale != 1.0:
            x = x * np.float32(self.config.embed_scale)
        return x

    # -- forward ------------------------------------------------------------------------

    def forward(self, tokens: np.ndarray, seq: SequenceHandle, cache: KVCache, logits_for: str = "all") -> np.ndarray:
        """One sequence: float32 logits [n, n_vocab] (`logits_for="all"`) or [1, n_vocab] ("last")."""
        return self.forward_batch([(seq, tokens)], cache, logits_for)[0]

    def forward_batch(self, batch: Sequence[tuple[SequenceHandle, np.ndarray]], cache: KVCache,
                      logits_for: str | Sequence[int] = "last") -> list[np.ndarray]:
        """Continue several sequences at once; per sequence, logits for every new position
        ("all"), for its last one ("last"), or per sequence for its last n (ints, bools as 0 or 1;
        none is an empty [0, n_vocab])."""
        x, layout = self._blocks(batch, cache)
        rows = _logit_rows(layout.lengths, logits_for)
        logits = self._logits(x[np.concatenate(rows)])
        bounds = np.cumsum([0] + [len(r) for r in rows])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def hidden_states(self, tokens: np.ndarray, seq: SequenceHandle, cache: KVCache) -> np.ndarray:
        """float32 [n, n_embd]: the final hidden states (after the output norm) of one sequence."""
        x, _ = self._blocks([(seq, tokens)], cache)
        return rms_norm(x, self._vector("output_norm.weight"), self.config.rms_eps)

    def _blocks(self, batch: Sequence[tuple[SequenceHandle, np.ndarray]],
                cache: KVCache) -> tuple[np.ndarray, BatchLayout]:
        """The embeddings through every block: x [n_tok, n_embd], and where the rows live."""
        layout = BatchLayout.build(batch, cache)
        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in batch])
        x = self._embed(tokens)  # [n_tok, n_embd]
        for layer in range(self.config.n_layer):
            x = self._block(layer, x, layout, cache)
        for (seq, _), n in zip(batch, layout.lengths, strict=True):
            cache.commit(seq, n)
        return x, layout

    def _logits(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.empty((0, self.config.n_vocab), np.float32)
        x = rms_norm(x, self._vector("output_norm.weight"), self.config.rms_eps)
        return self._linear(x, "token_embd" if self.config.tied_output else "output")

    def _block(self, layer: int, x: np.ndarray, layout: BatchLayout, cache: KVCache) -> np.ndarray:
        c, p = self.config, f"blk.{layer}."
        h = rms_norm(x, self._vector(p + "attn_norm.weight"), c.rms_eps)
        attn = self._linear(self._attention(layer, h, layout, cache), p + "attn_output")
        if c.post_norms:
            attn = rms_norm(attn, self._vector(p + "post_attention_norm.weight"), c.rms_eps)
        x = x + attn
        h = rms_norm(x, self._vector(p + "ffn_norm.weight"), c.rms_eps)
        gate, up = self._linears(h, p + "ffn_gate", p + "ffn_up")
        ffn = self._linear(activate(gate, c.activation, up), p + "ffn_down")
        if c.post_norms:
            ffn = rms_norm(ffn, self._vector(p + "post_ffw_norm.weight"), c.rms_eps)
        return x + ffn

    def _attention(self, layer: int, h: np.ndarray, layout: BatchLayout, cache: KVCache) -> np.ndarray:
        c, p = self.config, f"blk.{layer}."
        n = len(h)
        q, k, v = self._linears(h, p + "attn_q", p + "attn_k", p + "attn_v")
        q, k, v = q.reshape(n, c.n_head, c.head_dim), k.reshape(n, c.n_head_kv, c.head_dim), \
            v.reshape(n, c.n_head_kv, c.head_dim_v)
        if c.qk_norm:
            q = rms_norm(q, self._vector(p + "attn_q_norm.weight"), c.rms_eps)
            k = rms_norm(k, self._vector(p + "attn_k_norm.weight"), c.rms_eps)
        cos, sin = self._rope_tables(layer, layout)
        q, k = apply_rope(q, cos, sin, c.rope_layout), apply_rope(k, cos, sin, c.rope_layout)
        window = c.sliding_window if c.sliding_layers and c.sliding_layers[layer] else None
        # llama.cpp computes 1/sqrt(head_dim) in float32; gemma3 applies it to q, the others to the scores.
        scale = np.float32(1.0) / np.sqrt(np.float32(c.head_dim))
        if c.scale_queries:
            q, kq_scale = q * scale, np.float32(1.0)
        else:
            kq_scale = scale
        cache.write(layer, layout.cells, k, v)
        keys, values, tables = cache.layer_f16(layer, layout.tables)
        # Each row's float order comes from its own role (prompt or decoded token), as llama.cpp
        # orders one stream; never from the batch, so a row's bits do not depend on its neighbours.
        out = attend_paged(q, keys, values, tables, layout.row_seq, layout.positions, window, c.n_head // c.n_head_kv,
                           kq_scale, tiled=layout.prompt_rows, wide=self.isa is None or self.isa is VNNI)
        return out.reshape(n, c.n_head * c.head_dim_v)

    def _rope_tables(self, layer: int, layout: BatchLayout) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin float32 [n, rope_dim / 2] of this layer's rope base, shared by its layers."""
        c = self.config
        local = bool(c.sliding_layers and c.sliding_layers[layer] and c.rope_base_local)
        base = c.rope_base_local if local else c.rope_base
        if base not in layout.rope_tables:
            layout.rope_tables[base] = self._rope(base, layout.positions)
        return layout.rope_tables[base]

    def _rope(self, base: float, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        # theta_i = pos * base^(-2i / rope_dim). (Emulating ggml's float32 running product
        # instead moved gemma's logits no closer to llama.cpp's, so the angles are exact.)
        inv_freq = base ** (-np.arange(0, c.rope_dim, 2, dtype=np.float64) / c.rope_dim)
        theta = positions[:, None] * inv_freq[None, :]  # [n, rope_dim / 2]
        scale = 1.0 / c.rope_scale_factor if c.rope_scaling in ("linear", "yarn") else 1.0
        if c.rope_scaling != "yarn":
            return np.cos(theta * scale).astype(np.float32), np.sin(theta * scale).astype(np.float32)
        mix, mscale = yarn_mix(c.rope_dim, c.rope_orig_ctx, base, scale)
        theta = theta * scale * (1 - mix) + theta * mix
        return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


def will_pack(name: str, tensor: GGUFTensor, config: ModelConfig) -> bool:
    """Whether the model multiplies weight `name` packed (`linear.pack`). The embedding table is
    read by rows; packed only when it is also the output and Q8_0 (`repacked.q8_0_rows` reads
    its rows back), llama.cpp's other types staying as stored."""
    if not name.endswith(".weight") or tensor.data.ndim != 2:
        return False
    if name == "token_embd.weight":
        return config.tied_output and tensor.qtype == QType.Q8_0
    return packable(tensor.qtype, tensor.data.shape[0])


def _logit_rows(lengths: list[int], logits_for: str | Sequence[int]) -> list[np.ndarray]:
    """Per sequence, the rows of the batch whose logits are wanted."""
    ends = np.cumsum(lengths)
    if logits_for == "all":
        wanted = lengths
    else:
        wanted = [1] * len(lengths) if logits_for == "last" else [min(int(w), n) for w, n in
                                                                  zip(logits_for, lengths, strict=True)]
    return [np.arange(e - w, e, dtype=np.int64) for e, w in zip(ends, wanted, strict=True)]


def yarn_mix(rope_dim: int, orig_ctx: int, base: float, freq_scale: float,
             beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[np.ndarray, float]:
    """YaRN as ggml's rope_yarn (ext_factor 1, attn_factor 1): per rotated pair, how much of the
    unscaled (extrapolated) angle to keep, ramping from 1 for fast dims to 0 for slow ones, and
    the magnitude correction 1 + 0.1 ln(1 / freq_scale)."""
    def corr_dim(n_rot: float) -> float:
        return rope_dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(rope_dim - 1.0, math.ceil(corr_dim(beta_slow)))
    pair = np.arange(rope_dim // 2, dtype=np.float64)  # ggml's i0 / 2
    ramp = 1 - np.clip((pair - low) / max(0.001, high - low), 0, 1)
    return ramp[None, :], 1.0 + 0.1 * math.log(1.0 / freq_scale)


def activate(x: np.ndarray, kind: str, times: np.ndarray) -> np.ndarray:
    """The gate's activation times `times` (the up projection)."""
    if kind == "silu":
        return x / (np.float32(1) + np.exp(-x)) * times
    return gelu_tanh_f16(x, times)
