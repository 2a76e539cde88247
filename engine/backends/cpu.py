"""The CPU backend: today's Numba kernels, on numpy arrays in host memory.

Weights stay in their GGUF form (on the mmap or a private copy) and every matmul goes through
`quant.cpu.linear.matmul`, which quantizes activations the way llama.cpp's CPU backend does;
most matrices are repacked at load, 16 rows per vector (`linear.pack`). The elementwise parts
follow llama.cpp too: float32 math, RMSNorm sums in float64, keys and values stored as float16
(llama.cpp's default cache type), queries and attention probabilities rounded to float16 where
ggml's float16 matmuls round them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from llmx.engine.attention import attend_paged
from llmx.engine.config import ModelConfig
from llmx.engine.elementwise import add_rms_norm, gelu_tanh_f16, norm_rope, rms_norm
from llmx.engine.kv_cache import KVCache
from llmx.errors import LlmxError
from llmx.formats.gguf_file import GGUFTensor
from llmx.quant.cpu.dequantize import dequantize
from llmx.quant.cpu.linear import activation_quantizer, matmul, matmul_packed, pack, packable, quantize_activations
from llmx.quant.cpu.repacked import Q8_0_BLOCK_BYTES, q8_0_rows
from llmx.quant.cpu.simd import VNNI
from llmx.quant.qtypes import QType

# Weights that multiply one input, in the order the forward asks for them: consecutive ones that
# are packed alike are packed as one matrix, one kernel call (the per-call cost is most of a small
# model's decode matmul time).
STACKABLE = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))
BACKGROUND_PACK_BYTES = 64 << 20  # larger matrices are packed on a thread (`CpuBackend._pack`)


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
class CpuBackend:
    config: ModelConfig
    tensors: dict[str, GGUFTensor]
    threads: int | None = None
    isa: Any = None  # a `simd` instruction-set marker (None: the host's best)
    name: str = field(init=False, default="cpu")
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
    _plans: dict = field(init=False, default_factory=dict)  # names -> `linears`' steps for them
    _vectors: dict = field(init=False, default_factory=dict)  # name -> float32 weights (`_vector`)
    # the single-token decoder (`cpu_decode.RowDecoder`), bound on the first such step; False: the
    # model has weights it does not cover
    _row_decoder: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        for layer in range(self.config.n_layer):
            for group in STACKABLE:
                names = [f"blk.{layer}.{role}" for role in group]
                for run in stackable_runs(self.tensors, names, lambda t: packable(t.qtype, t.data.shape[0])):
                    self._stack(run)
        for name, tensor in self.tensors.items():
            if name[: -len(".weight")] not in self.stacks and will_pack(name, tensor, self.config):
                self.packed[name] = self._pack(tensor)

    # -- weights ------------------------------------------------------------------------

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

    def _stack(self, names: tuple[str, ...]) -> None:
        tensors = [self.tensors[f"{name}.weight"] for name in names]
        rows = np.concatenate([t.data.view(np.uint8) for t in tensors])
        bounds = tuple(np.cumsum([0] + [t.data.view(np.uint8).shape[0] for t in tensors]).tolist())
        stack = Stack(tuple(names), tensors[0].qtype, pack(rows, tensors[0].qtype), bounds)
        for name in names:
            self.stacks[name] = stack

    def is_packed(self, name: str) -> bool:
        """Whether weight `name` (without ".weight") is multiplied repacked, alone or in a stack."""
        return f"{name}.weight" in self.packed or name in self.stacks

    def _tensor(self, name: str) -> GGUFTensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise LlmxError(f"the model file has no tensor {name!r}; it does not fit its architecture")
        return tensor

    def _vector(self, name: str) -> np.ndarray:
        """A norm's (or bias's) weights as float32, converted once."""
        vector = self._vectors.get(name)
        if vector is None:
            vector = self._vectors[name] = np.ascontiguousarray(self._tensor(name).data, dtype=np.float32)
        return vector

    # -- matmuls ------------------------------------------------------------------------

    def linear(self, x: np.ndarray, name: str, quantized: tuple | None = None) -> np.ndarray:
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
        out = matmul(x, tensor.data.view(np.uint8), tensor.qtype, isa=self.isa,
                     quantized=quantized, packed=self._packed(tensor.name))
        bias = f"{name}.bias"
        return out + self._vector(bias) if bias in self.tensors else out

    def _stacked(self, x: np.ndarray, stack: Stack, quantized: tuple | None) -> list[np.ndarray]:
        out = matmul_packed(x, stack.packed, stack.qtype, stack.bounds[-1], isa=self.isa, quantized=quantized)
        return stack.split(out)

    def linears(self, x: np.ndarray, *names: str) -> list[np.ndarray]:
        """`linear` of one input with several weights, the input quantized once per activation type,
        and the weights of a stack in one call."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        wait = self.await_kernels  # a local: the last wait sets the attribute to None
        if wait is not None:
            for name in names:  # before quantizing x: the quantizers are the helper's too
                wait(len(x), name)
        if self.stub_matmuls:
            return [self.linear(x, name) for name in names]
        quantized: dict = {}
        outs: list[np.ndarray] = []
        for step in self._linears_plan(names):
            if isinstance(step, Stack):
                if self.observe_matmul is not None:
                    for member in step.names:
                        self.observe_matmul(f"{member}.weight", x)
                kind = activation_quantizer(step.qtype)
                if kind is not None and kind not in quantized:
                    quantized[kind] = quantize_activations(x, step.qtype)
                outs += self._stacked(x, step, quantized.get(kind))
                continue
            name, qtype = step
            kind = activation_quantizer(qtype)
            if kind is not None and kind not in quantized:
                quantized[kind] = quantize_activations(x, qtype)
            outs.append(self.linear(x, name, quantized.get(kind)))
        return outs

    def _linears_plan(self, names: tuple[str, ...]) -> list[Stack | tuple[str, QType]]:
        """`linears`' steps for `names`, worked out once: each stack whose weights come in a row,
        or a weight alone with its type."""
        plan = self._plans.get(names)
        if plan is None:
            plan, at = [], 0
            while at < len(names):
                stack = self.stacks.get(names[at])
                if stack is not None and names[at:at + len(stack.names)] == stack.names:
                    plan.append(stack)
                    at += len(stack.names)
                    continue
                plan.append((names[at], self._tensor(f"{names[at]}.weight").qtype))
                at += 1
            self._plans[names] = plan
        return plan

    # -- the other operations of a forward ------------------------------------------------

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """float32 [n_tok, n_embd]: the embedding rows of `tokens`, times the config's scale."""
        if self.threads is not None:  # once per forward, for every kernel in it (`linear` passes none)
            numba.set_num_threads(self.threads)
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

    def rms_norm(self, x: np.ndarray, weight: str) -> np.ndarray:
        """RMSNorm over the last axis of x (any leading shape), times the vector `weight`."""
        return rms_norm(x, self._vector(weight), self.config.rms_eps)

    def norm_rope(self, q: np.ndarray, k: np.ndarray, q_norm: str | None, k_norm: str | None, cos: np.ndarray,
                  sin: np.ndarray, q_scale: np.float32 | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Queries [n, n_head, head_dim] and keys [n, n_head_kv, head_dim]: each RMS-normed per
        head (when its norm names a weight), rotated by cos, sin float32 [n, rope_dim / 2] (host
        arrays); the queries then times `q_scale` (when given). One kernel call."""
        return norm_rope(q, k, None if q_norm is None else self._vector(q_norm),
                         None if k_norm is None else self._vector(k_norm), cos, sin, q_scale, self.config.rope_layout,
                         self.config.rms_eps)

    def add_rms_norm(self, x: np.ndarray, y: np.ndarray, norm: str | None,
                     pre_norm: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The residual add: x + y (y RMS-normed first when `pre_norm` names a weight), and that
        sum RMS-normed with `norm` (None: not wanted). One kernel call."""
        return add_rms_norm(x, y, None if norm is None else self._vector(norm),
                            None if pre_norm is None else self._vector(pre_norm), self.config.rms_eps)

    def activate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The gate's activation (the config's) times the up projection."""
        if self.config.activation == "silu":
            return gate / (np.float32(1) + np.exp(-gate)) * up
        return gelu_tanh_f16(gate, up)

    def kv_write(self, cache: KVCache, layer: int, layout, k: np.ndarray, v: np.ndarray) -> None:
        """k [n, n_head_kv, head_dim], v [n, n_head_kv, head_dim_v] into the layout's cells."""
        cache.write(layer, layout.cells, k, v)

    def attend(self, q: np.ndarray, cache: KVCache, layer: int, layout, window: int | None,
               kq_scale: np.float32) -> np.ndarray:
        """q [n, n_head, head_dim] -> [n, n_head, head_dim_v] over the cache's layer `layer`."""
        c = self.config
        keys, values, tables = cache.layer_f16(layer, layout.tables)
        # Each row's float order comes from its own role (prompt or decoded token), as llama.cpp
        # orders one stream; never from the batch, so a row's bits do not depend on its neighbours.
        return attend_paged(q, keys, values, tables, layout.row_seq, layout.positions, window, c.n_head // c.n_head_kv,
                            kq_scale, tiled=layout.prompt_rows, wide=self.wide_attention)

    @property
    def wide_attention(self) -> bool:
        """Whether attention may take its AVX-512 paths (`attend_paged`'s `wide`): not when an
        older instruction set is asked for."""
        return self.isa is None or self.isa is VNNI

    def decode_row(self, layers: list, x: np.ndarray, h: np.ndarray, layout, cache: KVCache,
                   rope: Callable) -> np.ndarray | None:
        """Every block of a step that decodes one token of one sequence, with each kernel call bound
        once (`cpu_decode`): x, h float32 [1, n_embd] (the embedding, its attn_norm) -> the last
        block's output; None for a step it does not cover (then the generic blocks run).
        `layers`: the Transformer's `LayerPlan`s; `rope(base, positions)` -> cos, sin."""
        if len(x) != 1 or layout.prompt_rows[0] or cache.cache_types != ("f16", "f16") or self.stub_matmuls \
                or self.await_kernels is not None or self.observe_matmul is not None:
            return None
        if self._row_decoder is None:
            from llmx.engine.backends.cpu_decode import RowDecoder

            self._row_decoder = RowDecoder.bind(self, layers, rope) or False
        if self._row_decoder is False:
            return None
        return self._row_decoder.decode(x, h, layout, cache)

    def rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return x[rows]

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x


def stackable_runs(tensors: dict[str, GGUFTensor], names: list[str],
                   stackable: Callable[[GGUFTensor], bool]) -> list[tuple[str, ...]]:
    """Maximal runs of two or more consecutive weights of `names` (without ".weight"), each
    present, without a bias, `stackable`, and of one type and row length: the weights a backend
    multiplies as one matrix."""
    def key(name: str):
        tensor = tensors.get(f"{name}.weight")
        if tensor is None or tensor.data.ndim != 2 or f"{name}.bias" in tensors or not stackable(tensor):
            return None
        return tensor.qtype, tensor.data.view(np.uint8).shape[1]

    runs: list[list[str]] = []
    for name in names:
        if key(name) is not None and runs and key(runs[-1][-1]) == key(name):
            runs[-1].append(name)
        else:
            runs.append([name])
    return [tuple(run) for run in runs if len(run) > 1 and key(run[0]) is not None]


def will_pack(name: str, tensor: GGUFTensor, config: ModelConfig) -> bool:
    """Whether the model multiplies weight `name` packed (`linear.pack`). The embedding table is
    read by rows; packed only when it is also the output and Q8_0 (`repacked.q8_0_rows` reads
    its rows back), llama.cpp's other types staying as stored."""
    if not name.endswith(".weight") or tensor.data.ndim != 2:
        return False
    if name == "token_embd.weight":
        return config.tied_output and tensor.qtype == QType.Q8_0
    return packable(tensor.qtype, tensor.data.shape[0])
