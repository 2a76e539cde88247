"""One `Transformer` for every supported family, driven by `ModelConfig` flags.

Weights stay in their GGUF form on the mmap (`GGUFTensor`s, named as in the file) and every
matmul goes through `quant.cpu.linear.matmul`, which quantizes activations the way llama.cpp's
CPU backend does. The elementwise parts follow llama.cpp too: float32 math, RMSNorm sums in
float64, keys and values stored as float16 (llama.cpp's default cache type), queries and
attention probabilities rounded to float16 where ggml's float16 matmuls round them.

This first version keeps each sequence's cache in contiguous arrays (`SequenceCache`); the
paged cache of DESIGN.md replaces it when the scheduler lands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llmx.engine.config import ModelConfig
from llmx.errors import LlmxError
from llmx.formats.gguf_file import GGUFFile, GGUFTensor
from llmx.quant.cpu.dequantize import dequantize
from llmx.quant.cpu.linear import matmul


@dataclass
class SequenceCache:
    """Keys and values of one sequence, per layer: float16 [n_ctx, n_head_kv, head_dim]."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, n_ctx: int) -> SequenceCache:
        shape_k = (n_ctx, config.n_head_kv, config.head_dim)
        shape_v = (n_ctx, config.n_head_kv, config.head_dim_v)
        return cls([np.zeros(shape_k, np.float16) for _ in range(config.n_layer)],
                   [np.zeros(shape_v, np.float16) for _ in range(config.n_layer)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class Transformer:
    config: ModelConfig
    tensors: dict[str, GGUFTensor]
    threads: int | None = None
    _rope_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, config: ModelConfig, threads: int | None = None) -> Transformer:
        return cls(config, gguf.tensors, threads)

    # -- weights ------------------------------------------------------------------------

    def _tensor(self, name: str) -> GGUFTensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise LlmxError(f"the model file has no tensor {name!r}; it does not fit its architecture")
        return tensor

    def _vector(self, name: str) -> np.ndarray:
        return self._tensor(name).data.astype(np.float32, copy=False)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """x [n, k] @ W[name].T -> [n, m], plus the bias when the file has one."""
        tensor = self._tensor(f"{name}.weight")
        out = matmul(x, tensor.data.view(np.uint8), tensor.qtype, threads=self.threads)
        bias = self.tensors.get(f"{name}.bias")
        return out if bias is None else out + bias.data.astype(np.float32)

    def _embed(self, tokens: np.ndarray) -> np.ndarray:
        table = self._tensor("token_embd.weight")
        rows = np.ascontiguousarray(table.data[tokens]).view(np.uint8)
        x = dequantize(rows, table.qtype).reshape(len(tokens), -1)  # [n_tok, n_embd]
        if self.config.embed_scale != 1.0:
            x = x * np.float32(self.config.embed_scale)
        return x

    # -- forward ------------------------------------------------------------------------

    def forward(self, tokens: np.ndarray, cache: SequenceCache, logits_for: str = "all") -> np.ndarray:
        """Run `tokens` (continuing `cache`) and return float32 logits [n, n_vocab] for all
        positions, or [1, n_vocab] for the last one with `logits_for="last"`."""
        tokens = np.asarray(tokens, dtype=np.int64)
        start = cache.length
        if start + len(tokens) > cache.capacity:
            raise LlmxError(f"context full: {start + len(tokens)} tokens do not fit in {cache.capacity}")
        positions = np.arange(start, start + len(tokens))
        x = self._embed(tokens)  # [n_tok, n_embd]
        for layer in range(self.config.n_layer):
            x = self._block(layer, x, positions, cache)
        cache.length = start + len(tokens)
        if logits_for == "last":
            x = x[-1:]
        x = rms_norm(x, self._vector("output_norm.weight"), self.config.rms_eps)
        head = "token_embd" if self.config.tied_output else "output"
        return self._linear(x, head)

    def _block(self, layer: int, x: np.ndarray, positions: np.ndarray, cache: SequenceCache) -> np.ndarray:
        c, p = self.config, f"blk.{layer}."
        h = rms_norm(x, self._vector(p + "attn_norm.weight"), c.rms_eps)
        attn = self._linear(self._attention(layer, h, positions, cache), p + "attn_output")
        if c.post_norms:
            attn = rms_norm(attn, self._vector(p + "post_attention_norm.weight"), c.rms_eps)
        x = x + attn
        h = rms_norm(x, self._vector(p + "ffn_norm.weight"), c.rms_eps)
        gate, up = self._linear(h, p + "ffn_gate"), self._linear(h, p + "ffn_up")
        ffn = self._linear(activate(gate, c.activation) * up, p + "ffn_down")
        if c.post_norms:
            ffn = rms_norm(ffn, self._vector(p + "post_ffw_norm.weight"), c.rms_eps)
        return x + ffn

    def _attention(self, layer: int, h: np.ndarray, positions: np.ndarray, cache: SequenceCache) -> np.ndarray:
        c, p = self.config, f"blk.{layer}."
        n = len(positions)
        q = self._linear(h, p + "attn_q").reshape(n, c.n_head, c.head_dim)
        k = self._linear(h, p + "attn_k").reshape(n, c.n_head_kv, c.head_dim)
        v = self._linear(h, p + "attn_v").reshape(n, c.n_head_kv, c.head_dim_v)
        if c.qk_norm:
            q = rms_norm(q, self._vector(p + "attn_q_norm.weight"), c.rms_eps)
            k = rms_norm(k, self._vector(p + "attn_k_norm.weight"), c.rms_eps)
        cos, sin = self._rope(layer, positions)
        q, k = apply_rope(q, cos, sin, c.rope_layout), apply_rope(k, cos, sin, c.rope_layout)
        start = positions[0]
        cache.keys[layer][start:start + n] = k
        cache.values[layer][start:start + n] = v
        keys = cache.keys[layer][: start + n].astype(np.float32)  # [n_kv, n_head_kv, head_dim]
        values = cache.values[layer][: start + n].astype(np.float32)
        window = c.sliding_window if c.sliding_layers and c.sliding_layers[layer] else None
        out = attend(q, keys, values, positions, window, c.n_head // c.n_head_kv)
        return out.reshape(n, c.n_head * c.head_dim_v)

    def _rope(self, layer: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        local = bool(c.sliding_layers and c.sliding_layers[layer] and c.rope_base_local)
        base = c.rope_base_local if local else c.rope_base
        freq_scale = 1.0 / c.rope_scale_factor if c.rope_scaling == "linear" else 1.0
        # theta_i = pos * base^(-2i / rope_dim). (Emulating ggml's float32 running product
        # instead moved gemma's logits no closer to llama.cpp's, so the angles are exact.)
        inv_freq = base ** (-np.arange(0, c.rope_dim, 2, dtype=np.float64) / c.rope_dim)
        angles = (positions[:, None] * freq_scale) * inv_freq[None, :]
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis; the mean of squares in float64 as ggml sums it."""
    mean_sq = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(mean_sq + eps)).astype(np.float32)) * weight


def activate(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "silu":
        return x / (np.float32(1) + np.exp(-x))
    return gelu_tanh_f16(x)


def gelu_tanh_f16(x: np.ndarray) -> np.ndarray:
    """GELU (tanh approximation) as ggml's CPU backend computes it: a float16 lookup table
    indexed by the input rounded to float16, and the identity / zero beyond +-10."""
    h = x.astype(np.float16).astype(np.float32)
    inner = np.float32(math.sqrt(2 / math.pi)) * (h + np.float32(0.044715) * h * h * h)
    table = (np.float32(0.5) * h * (np.float32(1) + np.tanh(inner))).astype(np.float16).astype(np.float32)
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, table))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
    """x [n, heads, head_dim]; rotates the first 2 * cos.shape[1] dims, keeps the rest."""
    half = cos.shape[1]
    rot = x[..., : 2 * half]
    if layout == "normal":  # adjacent pairs (x0, x1), (x2, x3), ...
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:  # neox: (x_i, x_{i + half})
        a, b = rot[..., :half], rot[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    ra, rb = a * c - b * s, a * s + b * c
    out = x.copy()
    if layout == "normal":
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = ra, rb
    else:
        out[..., :half], out[..., half : 2 * half] = ra, rb
    return out


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, positions: np.ndarray,
           window: int | None, group: int) -> np.ndarray:
    """Causal (optionally sliding-window) attention with grouped KV heads.

    q [n, n_head, d], keys [n_kv, n_head_kv, d], values [n_kv, n_head_kv, dv] -> [n, n_head, dv].
    """
    n, n_head, d = q.shape
    q16 = q.astype(np.float16).astype(np.float32)  # ggml's f16 matmul rounds the queries
    kv_pos = np.arange(keys.shape[0])
    allowed = kv_pos[None, :] <= positions[:, None]  # [n, n_kv]
    if window:
        allowed &= positions[:, None] - kv_pos[None, :] < window
    out = np.empty((n, n_head, values.shape[2]), np.float32)
    scale = np.float32(1.0 / math.sqrt(d))
    for head in range(n_head):
        kv_head = head // group
        scores = (q16[:, head, :] @ keys[:, kv_head, :].T) * scale  # [n, n_kv]
        scores = np.where(allowed, scores, -np.inf)
        scores -= scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=1, keepdims=True)
        probs = probs.astype(np.float16).astype(np.float32)  # rounded again for the f16 V matmul
        out[:, head, :] = probs @ values[:, kv_head, :]
    return out
