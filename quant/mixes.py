"""Which type each tensor gets in a quantization mix: llama.cpp's `llama_tensor_get_type` rules
for the mixes llmx offers (numpy-free; the plan is data).

A mix has a default type for 2-D weights; _M/_L mixes raise `attn_v`, `ffn_down` and
`attn_output` in chosen layers; the output matrix (or the token embedding when the output is
tied to it) gets Q6_K; a row length that is not a whole number of blocks falls back to a type
whose blocks fit (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16), as the
llama.cpp of the reference files (llama-cpp-python 0.3.36) does.
Norms, biases and other 1-D tensors stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import LlamaFileType

from llmx.quant.qtypes import QType, block_size


@dataclass(frozen=True)
class Mix:
    name: str
    file_type: LlamaFileType
    default: QType


MIXES = {m.name: m for m in [
    Mix("F32", LlamaFileType.ALL_F32, QType.F32),
    Mix("F16", LlamaFileType.MOSTLY_F16, QType.F16),
    Mix("BF16", LlamaFileType.MOSTLY_BF16, QType.BF16),
    Mix("Q8_0", LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
    Mix("Q4_0", LlamaFileType.MOSTLY_Q4_0, QType.Q4_0),
    Mix("Q4_1", LlamaFileType.MOSTLY_Q4_1, QType.Q4_1),
    Mix("Q5_0", LlamaFileType.MOSTLY_Q5_0, QType.Q5_0),
    Mix("Q5_1", LlamaFileType.MOSTLY_Q5_1, QType.Q5_1),
    Mix("Q2_K", LlamaFileType.MOSTLY_Q2_K, QType.Q2_K),
    Mix("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, QType.Q3_K),
    Mix("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, QType.Q3_K),
    Mix("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, QType.Q3_K),
    Mix("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, QType.Q4_K),
    Mix("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, QType.Q4_K),
    Mix("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, QType.Q5_K),
    Mix("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, QType.Q5_K),
    Mix("Q6_K", LlamaFileType.MOSTLY_Q6_K, QType.Q6_K),
]}

FALLBACK = {QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0, QType.Q4_K: QType.Q5_0,
            QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0}
FLOATS = (QType.F32, QType.F16, QType.BF16)


@dataclass(frozen=True)
class TensorSpec:
    """What the planner needs to know of a tensor: name, GGML shape."""

    name: str
    shape: tuple[int, ...]


def should_quantize(spec: TensorSpec) -> bool:
    """llama.cpp quantizes 2-D+ `*.weight` tensors except norms and a few special ones."""
    name = spec.name
    return (name.endswith("weight") and len(spec.shape) >= 2 and "_norm.weight" not in name
            and not any(s in name for s in ("ffn_gate_inp.weight", "pos_embd", "token_types", "attn_rel_b")))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers _M mixes favour: the first and last eighth, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class Planner:
    """Walks the tensors in file order, counting attn_v / ffn_down as llama.cpp does."""

    def __init__(self, mix: Mix, tensors: list[TensorSpec], n_gqa: int):
        self.mix, self.n_gqa = mix, n_gqa
        names = [t.name for t in tensors]
        self.has_output = "output.weight" in names
        self.n_attention_wv = sum("attn_v.weight" in n for n in names)
        # llama.cpp takes n_ffn_down from n_layer (not from names, which would count biases too)
        self.n_ffn_down = len({n.split(".")[1] for n in names if n.startswith("blk.")})
        self.i_attention_wv = self.i_ffn_down = 0

    def type_for(self, spec: TensorSpec) -> QType | None:
        """The tensor's new type; None keeps it as it is (norms, biases, other 1-D tensors)."""
        if not should_quantize(spec):
            return None
        new = self.mix.default
        if new in FLOATS:
            return new
        new = self._rules(spec.name, new, spec.shape[0])
        return self._fit(new, spec.shape[0])

    def _rules(self, name: str, new: QType, row: int) -> QType:
        m = self.mix.name
        if name == "output.weight" or (not self.has_output and name == "token_embd.weight"):
            if row % block_size(new) != 0:
                return QType.Q8_0
            return new if new == QType.Q8_0 else QType.Q6_K
        if "attn_v.weight" in name:
            i, self.i_attention_wv = self.i_attention_wv, self.i_attention_wv + 1
            return self._attn_v(m, new, i)
        if "ffn_down" in name:
            i, self.i_ffn_down = self.i_ffn_down, self.i_ffn_down + 1
            return self._ffn_down(m, new, i, self.n_ffn_down)
        if "attn_output.weight" in name:
            return {"Q2_K": QType.Q3_K, "Q3_K_M": QType.Q4_K, "Q3_K_L": QType.Q5_K}.get(m, new)
        return new

    def _attn_v(self, m: str, new: QType, i: int) -> QType:
        if m == "Q2_K":
            return QType.Q4_K if self.n_gqa >= 4 else QType.Q3_K
        if m == "Q3_K_M":
            return QType.Q5_K if i < 2 else QType.Q4_K
        if m == "Q3_K_L":
            return QType.Q5_K
        if m in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, self.n_attention_wv):
            return QType.Q6_K
        if m == "Q4_K_S" and i < 4:
            return QType.Q5_K
        return new

    def _ffn_down(self, m: str, new: QType, i: int, n: int) -> QType:
        if m == "Q2_K":
            return QType.Q3_K
        if m == "Q3_K_M":
            return QType.Q5_K if i < n // 16 else QType.Q4_K
        if m == "Q3_K_L":
            return QType.Q5_K
        if m in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            return QType.Q6_K
        if m == "Q4_K_S" and i < n // 8:
            return QType.Q5_K
        return new

    @staticmethod
    def _fit(new: QType, row: int) -> QType:
        if row % block_size(new) == 0:
            return new
        new = FALLBACK.get(new, QType.F16)
        return new if row % block_size(new) == 0 else QType.F16


def plan(mix: Mix, tensors: list[TensorSpec], n_gqa: int) -> list[QType | None]:
    """Per tensor, in file order: its new type, or None to copy it unchanged."""
    planner = Planner(mix, tensors, n_gqa)
    return [planner.type_for(t) for t in tensors]
