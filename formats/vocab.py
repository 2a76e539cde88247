"""The tokenizer section of a GGUF file as plain data (`tokenizer.ggml.*` keys)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from gguf import Keys

from llmx.errors import TokenizerError
from llmx.formats.gguf_file import GGUFFile


class TokenType(IntEnum):
    """llama.cpp's token types; SentencePiece numbers its piece types the same way."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts llama.cpp also treats as end-of-generation when the file does not name them.
_EOG_TEXTS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<|eom_id|>")


@dataclass(frozen=True)
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # pre-tokenizer name for BPE vocabularies
    tokens: list[str]
    scores: np.ndarray  # float32 [n_vocab]
    types: np.ndarray  # int32 [n_vocab], TokenType values
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def ids_of_type(self, *types: TokenType) -> np.ndarray:
        return np.flatnonzero(np.isin(self.types, [int(t) for t in types]))

    def eog_ids(self) -> frozenset[int]:
        """Tokens that end generation: EOS, EOT and the usual end-of-turn markers."""
        ids = {self.eos_id} - {None}
        control = set(self.ids_of_type(TokenType.CONTROL, TokenType.USER_DEFINED).tolist())
        ids |= {i for i in control if self.tokens[i] in _EOG_TEXTS}
        return frozenset(int(i) for i in ids)


def describe_tokenizer(model: str | None, pre: str | None) -> str:
    """How `llmx info` names a tokenizer: 'SentencePiece (llama)' or 'BPE (gpt2, pre=qwen2)'."""
    if model == "llama":
        return "SentencePiece (llama)"
    if model == "gpt2":
        return f"BPE (gpt2, pre={pre or 'default'})"
    return str(model)


def vocab_from_gguf(gguf: GGUFFile) -> Vocab:
    meta = gguf.metadata
    model = meta.get(Keys.Tokenizer.MODEL)
    if model is None:
        raise TokenizerError(f"{gguf.path}: the file has no tokenizer ({Keys.Tokenizer.MODEL} is missing)")
    tokens = _token_list(gguf)
    n = len(tokens)
    scores = _per_token_array(gguf, Keys.Tokenizer.SCORES, n, np.float32, default=0.0)
    types = _per_token_array(gguf, Keys.Tokenizer.TOKEN_TYPE, n, np.int32, default=TokenType.NORMAL)
    is_spm = model == "llama"
    return Vocab(
        model=model,
        pre=str(meta.get(Keys.Tokenizer.PRE, "default")),
        tokens=tokens,
        scores=scores,
        types=types,
        merges=list(meta.get(Keys.Tokenizer.MERGES, [])),
        bos_id=_token_id(gguf, Keys.Tokenizer.BOS_ID, n),
        eos_id=_token_id(gguf, Keys.Tokenizer.EOS_ID, n),
        unk_id=_token_id(gguf, Keys.Tokenizer.UNK_ID, n),
        add_bos=bool(meta.get(Keys.Tokenizer.ADD_BOS, is_spm)),
        add_eos=bool(meta.get(Keys.Tokenizer.ADD_EOS, False)),
        add_space_prefix=bool(meta.get(Keys.Tokenizer.ADD_PREFIX, is_spm)),
    )


def _token_list(gguf: GGUFFile) -> list[str]:
    tokens = gguf.metadata.get(Keys.Tokenizer.LIST)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens[:1]):
        raise TokenizerError(f"{gguf.path}: {Keys.Tokenizer.LIST} is missing or not a list of strings")
    return tokens


def _per_token_array(gguf: GGUFFile, key: str, n: int, dtype, default) -> np.ndarray:
    values = gguf.metadata.get(key)
    if values is None:
        return np.full(n, default, dtype=dtype)
    if not isinstance(values, np.ndarray) or values.shape != (n,):
        raise TokenizerError(f"{gguf.path}: {key} must be a numeric array with one entry per token ({n})")
    return values.astype(dtype, copy=False)


def _token_id(gguf: GGUFFile, key: str, n: int) -> int | None:
    value = gguf.metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TokenizerError(f"{gguf.path}: {key} = {value!r} is not a token id")
    # llama.cpp ignores an id outside the vocabulary (some converters write -1 as uint32).
    return value if 0 <= value < n else None
