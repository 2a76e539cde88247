"""One `Transformer` for every supported family, driven by `ModelConfig` flags.

The forward pass is written once, as calls on a backend (`engine.backends`: "cpu" computes on
numpy arrays with Numba kernels, "cuda" on device arrays with numba.cuda kernels); its arrays live
where the backend computes and only the logits come back to the host. Weights keep their GGUF
names and form; the backend decides how to hold them (repacked on the CPU, uploaded on a GPU).

A forward pass takes tokens of one or more sequences at once: their matmuls run as one batch,
and attention reads each sequence's keys and values through its block table in the paged
`KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmx.engine.backends import make_backend, will_pack
from llmx.engine.config import ModelConfig
from llmx.engine.kv_cache import KVCache, SequenceHandle, prompt_order
from llmx.engine.weights_check import check_weights
from llmx.formats.gguf_file import GGUFFile, GGUFTensor


@dataclass(frozen=True)
class BatchLayout:
    """Where one forward call's rows live in the cache, worked out once for all layers."""

    lengths: list[int]  # new tokens per sequence
    positions: np.ndarray  # int64 [n]
    cells: np.ndarray  # int64 [n]: flat cache cell of each row
    row_seq: np.ndarray  # int64 [n]: index of each row's sequence
    tables: np.ndarray  # int32 [n_seqs, blocks]
    prompt_rows: np.ndarray  # uint8 [n]: 1 for rows in their prompt's float order (`kv_cache.prompt_order`)
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
                                                                                                strict=True)]).view(np.uint8))


@dataclass(frozen=True)
class LayerPlan:
    """One block's weight names and constants, worked out once: a decode step runs 18 blocks of
    gemma, and building names and scales in every call was a visible share of its Python time."""

    qkv: tuple[str, str, str]
    attn_output: str
    qk_norms: tuple[str | None, str | None]
    rope_base: float
    window: int | None
    q_scale: np.float32 | None
    kq_scale: np.float32
    ffn_norm: str
    post_attention_norm: str | None
    gate_up: tuple[str, str]
    ffn_down: str
    post_ffw_norm: str | None
    next_norm: str | None  # the next block's attn_norm (None after the last)

    @classmethod
    def of(cls, c: ModelConfig, layer: int) -> LayerPlan:
        p = f"blk.{layer}."
        sliding = bool(c.sliding_layers and c.sliding_layers[layer])
        # llama.cpp computes 1/sqrt(head_dim) in float32; gemma3 applies it to q, the others to the scores.
        scale = np.float32(1.0) / np.sqrt(np.float32(c.head_dim))
        post_norms = (p + "post_attention_norm.weight", p + "post_ffw_norm.weight") if c.post_norms else (None, None)
        return cls(qkv=(p + "attn_q", p + "attn_k", p + "attn_v"), attn_output=p + "attn_output",
                   qk_norms=(p + "attn_q_norm.weight", p + "attn_k_norm.weight") if c.qk_norm else (None, None),
                   rope_base=c.rope_base_local if sliding and c.rope_base_local else c.rope_base,
                   window=c.sliding_window if sliding else None,
                   q_scale=scale if c.scale_queries else None,
                   kq_scale=np.float32(1.0) if c.scale_queries else scale,
                   ffn_norm=p + "ffn_norm.weight", post_attention_norm=post_norms[0],
                   gate_up=(p + "ffn_gate", p + "ffn_up"), ffn_down=p + "ffn_down", post_ffw_norm=post_norms[1],
                   next_norm=f"blk.{layer + 1}.attn_norm.weight" if layer + 1 < c.n_layer else None)


@dataclass
class Transformer:
    config: ModelConfig
    tensors: dict[str, GGUFTensor]
    threads: int | None = None
    isa: Any = None  # the CPU backend's `simd` instruction-set marker (None: the host's best)
    device: str = "cpu"  # "cpu" or "cuda" (`engine.backends`)
    backend: Any = field(init=False)
    layers: list[LayerPlan] = field(init=False)

    def __post_init__(self) -> None:
        check_weights(self.config, self.tensors)
        self.backend = make_backend(self.device, self.config, self.tensors, self.threads, self.isa)
        self.layers = [LayerPlan.of(self.config, layer) for layer in range(self.config.n_layer)]

    @staticmethod
    def packed_weights(config: ModelConfig, tensors: dict[str, GGUFTensor]) -> set[str]:
        """The weights the CPU backend multiplies packed, and never reads as stored after packing
        them: a private copy of the file need not hold them (`load_into_memory`)."""
        return {name for name, tensor in tensors.items() if will_pack(name, tensor, config)}

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, config: ModelConfig, threads: int | None = None, isa: Any = None,
                  device: str = "cpu") -> Transformer:
        return cls(config, gguf.tensors, threads, isa, device)

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
        logits = self._logits(x, np.concatenate(rows))
        bounds = np.cumsum([0] + [len(r) for r in rows])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def hidden_states(self, tokens: np.ndarray, seq: SequenceHandle, cache: KVCache) -> np.ndarray:
        """float32 [n, n_embd]: the final hidden states (after the output norm) of one sequence."""
        x, _ = self._blocks([(seq, tokens)], cache)
        return self.backend.to_host(self.backend.rms_norm(x, "output_norm.weight"))

    def _blocks(self, batch: Sequence[tuple[SequenceHandle, np.ndarray]], cache: KVCache) -> tuple[Any, BatchLayout]:
        """The embeddings through every block: x [n_tok, n_embd] (the backend's array), and where
        the rows live."""
        layout = BatchLayout.build(batch, cache)
        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in batch])
        x = self.backend.embed(tokens)  # [n_tok, n_embd]
        h = self.backend.rms_norm(x, "blk.0.attn_norm.weight")  # each block's normed input
        decoded = self.backend.decode_row(self.layers, x, h, layout, cache, self._rope)
        if decoded is not None:  # one token of one sequence: every block in one bound pass
            x = decoded
        else:
            for layer in range(self.config.n_layer):
                x, h = self._block(layer, x, h, layout, cache)
        for (seq, _), n in zip(batch, layout.lengths, strict=True):
            cache.commit(seq, n)
        return x, layout

    def _logits(self, x, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), n_vocab] on the host: the logits of x's `rows`."""
        if not len(rows):
            return np.empty((0, self.config.n_vocab), np.float32)
        b = self.backend
        x = b.rms_norm(b.rows(x, rows), "output_norm.weight")
        return b.to_host(b.linear(x, "token_embd" if self.config.tied_output else "output"))

    def _block(self, layer: int, x, h, layout: BatchLayout, cache: KVCache):
        """x: the residual stream, h: its attn_norm -> this block's x, and the next block's h
        (None after the last). Each residual add comes with the norms around it (`add_rms_norm`):
        one kernel on a GPU."""
        b, plan = self.backend, self.layers[layer]
        attn = b.linear(self._attention(layer, plan, h, layout, cache), plan.attn_output)
        x, h = b.add_rms_norm(x, attn, plan.ffn_norm, plan.post_attention_norm)
        gate, up = b.linears(h, *plan.gate_up)
        ffn = b.linear(b.activate(gate, up), plan.ffn_down)
        return b.add_rms_norm(x, ffn, plan.next_norm, plan.post_ffw_norm)

    def _attention(self, layer: int, plan: LayerPlan, h, layout: BatchLayout, cache: KVCache):
        b, c = self.backend, self.config
        n = h.shape[0]
        q, k, v = b.linears(h, *plan.qkv)
        q, k, v = q.reshape(n, c.n_head, c.head_dim), k.reshape(n, c.n_head_kv, c.head_dim), \
            v.reshape(n, c.n_head_kv, c.head_dim_v)
        cos, sin = self._rope_tables(plan.rope_base, layout)
        q, k = b.norm_rope(q, k, *plan.qk_norms, cos, sin, plan.q_scale)
        b.kv_write(cache, layer, layout, k, v)
        out = b.attend(q, cache, layer, layout, plan.window, plan.kq_scale)  # [n, n_head, head_dim_v]
        return out.reshape(n, c.n_head * c.head_dim_v)

    def _rope_tables(self, base: float, layout: BatchLayout) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin float32 [n, rope_dim / 2] of rope base `base`, shared by the layers using it."""
        tables = layout.rope_tables.get(base)
        if tables is None:
            tables = layout.rope_tables[base] = self._rope(base, layout.positions)
        return tables

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
