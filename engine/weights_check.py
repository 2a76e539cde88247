"""Every tensor a forward reads, checked against the model config before any kernel runs: it is
present, its type has a CPU kernel (matmuls) or is a float (norms, biases), and its shape is the
one the config implies. A file whose metadata disagrees with its tensors (a wrong head count, a
mangled dimension) is then one UnsupportedModelError, not a reshape error deep in a forward."""

from __future__ import annotations

import math
from collections.abc import Mapping

from llmx.engine.config import ModelConfig
from llmx.errors import UnsupportedModelError
from llmx.formats.gguf_file import GGUFTensor
from llmx.quant.cpu.linear import SUPPORTED
from llmx.quant.qtypes import QType

VECTOR_TYPES = frozenset({QType.F32, QType.F16})  # norms and biases, read as float32 arrays


def expected_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape in GGML order, row length first; is it a matmul weight)."""
    q_out, kv_out, v_out = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
    shapes = {"token_embd.weight": ((c.n_embd, c.n_vocab), True), "output_norm.weight": ((c.n_embd,), False)}
    if not c.tied_output:
        shapes["output.weight"] = ((c.n_embd, c.n_vocab), True)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": ((c.n_embd,), False), p + "ffn_norm.weight": ((c.n_embd,), False),
            p + "attn_q.weight": ((c.n_embd, q_out), True), p + "attn_k.weight": ((c.n_embd, kv_out), True),
            p + "attn_v.weight": ((c.n_embd, v_out), True),
            p + "attn_output.weight": ((c.n_head * c.head_dim_v, c.n_embd), True),
            p + "ffn_gate.weight": ((c.n_embd, c.n_ff), True), p + "ffn_up.weight": ((c.n_embd, c.n_ff), True),
            p + "ffn_down.weight": ((c.n_ff, c.n_embd), True),
        }
        if c.qk_norm:
            shapes |= {p + "attn_q_norm.weight": ((c.head_dim,), False),
                       p + "attn_k_norm.weight": ((c.head_dim,), False)}
        if c.post_norms:
            shapes |= {p + "post_attention_norm.weight": ((c.n_embd,), False),
                       p + "post_ffw_norm.weight": ((c.n_embd,), False)}
        if c.qkv_bias:
            shapes |= {p + "attn_q.bias": ((q_out,), False), p + "attn_k.bias": ((kv_out,), False),
                       p + "attn_v.bias": ((v_out,), False)}
    return shapes


def check_config(c: ModelConfig) -> None:
    """The numbers that size work and memory without a tensor to check them against."""
    if c.n_head_kv <= 0 or c.n_head % c.n_head_kv or c.head_dim <= 0 or c.head_dim_v <= 0:
        raise UnsupportedModelError(f"the model's attention metadata does not add up: {c.n_head} heads, "
                                    f"{c.n_head_kv} KV heads, head size {c.head_dim}")
    if not (0 < c.rope_dim <= c.head_dim and c.rope_dim % 2 == 0):
        raise UnsupportedModelError(f"rope dimension {c.rope_dim} does not fit head size {c.head_dim}")
    numbers = {"rms epsilon": c.rms_eps, "rope base": c.rope_base, "rope scale": c.rope_scale_factor,
               "embedding scale": c.embed_scale, "rope base (local)": c.rope_base_local or 1.0}
    for what, value in numbers.items():
        if not (math.isfinite(value) and value > 0):
            raise UnsupportedModelError(f"the model's {what} is {value}; it must be a positive number")
    if c.n_ctx_train <= 0 or (c.sliding_window is not None and c.sliding_window < 0):
        raise UnsupportedModelError(f"the model's context ({c.n_ctx_train}) or window ({c.sliding_window}) is invalid")


def check_weights(config: ModelConfig, tensors: Mapping[str, GGUFTensor]) -> None:
    check_config(config)
    for name, (shape, is_matmul) in expected_shapes(config).items():
        tensor = tensors.get(name)
        if tensor is None:
            raise UnsupportedModelError(f"the model file has no tensor {name!r}; it does not fit its architecture")
        if tuple(tensor.shape) != shape:
            raise UnsupportedModelError(f"tensor {name!r} has shape {list(tensor.shape)} but the model's metadata "
                                        f"implies {list(shape)}; the file is inconsistent")
        allowed = SUPPORTED if is_matmul else VECTOR_TYPES
        if tensor.qtype not in allowed:
            raise UnsupportedModelError(f"tensor {name!r} is {tensor.qtype.name}, which llmx cannot compute with here")
