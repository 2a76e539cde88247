"""Tokenizers built from a GGUF vocabulary, matching llama.cpp's ids.

Like llama.cpp, text is first partitioned on the literal text of special tokens (user-defined
tokens always, control tokens only when `special=True`), longest token first; each remaining
fragment is encoded by a backend:
- `llama` vocabularies: SentencePiece, from a ModelProto serialized in memory (BPE with scores
  and byte fallback, exactly llama.cpp's SPM merge order);
- `gpt2` vocabularies: HF `tokenizers` byte-level BPE with the pre-tokenizer regexes llama.cpp
  selects by `tokenizer.ggml.pre`.
Decoding is ours: each token maps to bytes, joined, then decoded once, so a character split over
byte tokens is never broken.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from llmx.errors import TokenizerError
from llmx.formats.atomic import atomic_output
from llmx.formats.gguf_file import GGUFFile
from llmx.formats.vocab import TokenType, Vocab, vocab_from_gguf

SPM_SPACE = "\u2581"  # SentencePiece's escaped space "▁"

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`; several regexes split in sequence.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2_REGEX,),
    "llama-bpe": (_LLAMA3_REGEX,),
    "llama3": (_LLAMA3_REGEX,),
    "llama-v3": (_LLAMA3_REGEX,),
    "smaug-bpe": (_LLAMA3_REGEX,),
    "dbrx": (_LLAMA3_REGEX,),
    "qwen2": (_QWEN2_REGEX,),
    "qwen2.5": (_QWEN2_REGEX,),
    "stablelm2": (_QWEN2_REGEX,),
    "deepseek-r1-qwen": (_QWEN2_REGEX,),
}
# Pre-tokenizers whose words are looked up whole before any merge (llama.cpp's LLAMA3 type).
_IGNORE_MERGES_PRE = {"llama-bpe", "llama3", "llama-v3"}


class Tokenizer:
    """Text <-> token ids for one vocabulary, with llama.cpp's special-token handling."""

    def __init__(self, vocab: Vocab, cache_key: str | None = None):
        """`cache_key`: names the vocabulary's file (see `from_gguf`), so that what is slow to build
        from it (a SentencePiece model) is kept in the cache dir for the next load."""
        self.vocab = vocab
        if vocab.model == "llama":
            self._backend = _SentencePieceBackend(vocab, cache_key)
        elif vocab.model == "gpt2":
            self._backend = _BPEBackend(vocab)
        else:
            raise TokenizerError(
                f"tokenizer model {vocab.model!r} is not supported (llmx reads 'llama' and 'gpt2')"
            )

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        from llmx.paths import file_identity

        return cls(vocab_from_gguf(gguf), file_identity(gguf.path))

    @property
    def n_vocab(self) -> int:
        return self.vocab.n_vocab

    # -- encoding ---------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids as llama.cpp's `llama_tokenize(text, add_special=add_bos, parse_special=special)`."""
        ids: list[int] = []
        if add_bos and self.vocab.add_bos and self.vocab.bos_id is not None:
            ids.append(self.vocab.bos_id)
        for fragment in self._partition(text, special):
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids.extend(self._backend.encode(fragment))
        if add_bos and self.vocab.add_eos and self.vocab.eos_id is not None:
            ids.append(self.vocab.eos_id)
        return ids

    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Split `text` on special-token texts, longest first, as llama.cpp does."""
        fragments: list[str | int] = [text] if text else []
        splitters = self._user_defined if not special else self._user_defined_and_control
        for token_text, token_id in splitters:
            if not any(isinstance(f, str) and token_text in f for f in fragments):
                continue
            fragments = _split_fragments(fragments, token_text, token_id)
        return fragments

    @cached_property
    def _user_defined(self) -> list[tuple[str, int]]:
        return self._splitters(TokenType.USER_DEFINED)

    @cached_property
    def _user_defined_and_control(self) -> list[tuple[str, int]]:
        return self._splitters(TokenType.USER_DEFINED, TokenType.CONTROL, TokenType.UNKNOWN)

    def _splitters(self, *types: TokenType) -> list[tuple[str, int]]:
        ids = self.vocab.ids_of_type(*types).tolist()
        pairs = [(self.vocab.tokens[i], i) for i in ids if self.vocab.tokens[i]]
        return sorted(pairs, key=lambda p: -len(p[0]))  # stable: equal lengths keep id order

    # -- decoding ---------------------------------------------------------

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token stands for; control tokens only when `special`."""
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")
        if not special and self.vocab.types[token_id] == TokenType.CONTROL:
            return b""
        cached = self._token_texts.get(token_id)
        if cached is None:  # filled on demand: building all 262,144 up front costs a second
            cached = self._token_texts[token_id] = self._backend.token_bytes(token_id, int(self.vocab.types[token_id]))
        return cached

    @cached_property
    def _token_texts(self) -> dict[int, bytes]:
        return {}

    def all_token_bytes(self) -> list[bytes]:
        """Every token's bytes, control tokens' texts included (`token_bytes(i, special=True)` for
        all i, built in one pass: a structured-output grammar needs the whole vocabulary)."""
        types = self.vocab.types.tolist()
        return [self._backend.token_bytes(i, kind) for i, kind in enumerate(types)]

    def piece(self, token_id: int) -> str:
        """A token's text for display (`llmx tokenize --pieces`), control tokens included."""
        return self.token_bytes(token_id, special=True).decode("utf-8", errors="replace")

    def detokenize(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of `ids`; `special=True` also renders control tokens such as `<start_of_turn>`."""
        raw = b"".join(self.token_bytes(int(i), special) for i in ids)
        text = raw.decode("utf-8", errors="replace")
        return self._strip_space_prefix(text)

    def _strip_space_prefix(self, text: str) -> str:
        # SentencePiece adds one space before the text when encoding; take that one back.
        if self.vocab.model == "llama" and self.vocab.add_space_prefix and text.startswith(" "):
            return text[1:]
        return text

    def decoder(self, special: bool = False, strip_space_prefix: bool = False) -> IncrementalDetokenizer:
        """A streaming decoder; strip the space prefix only when decoding from the start of a text."""
        return IncrementalDetokenizer(self, special, strip_space_prefix)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that are always whole UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False, strip_space_prefix: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = strip_space_prefix

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still split)."""
        return self._emit(self._utf8.decode(self._tokenizer.token_bytes(token_id, self._special)))

    def flush(self) -> str:
        """Whatever is left at the end of the stream; an unfinished character becomes U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            return self._tokenizer._strip_space_prefix(text)
        return text


def _split_fragments(fragments: list[str | int], token_text: str, token_id: int) -> list[str | int]:
    out: list[str | int] = []
    for fragment in fragments:
        if isinstance(fragment, int) or token_text not in fragment:
            out.append(fragment)
            continue
        for j, part in enumerate(fragment.split(token_text)):
            if j:
                out.append(token_id)
            if part:
                out.append(part)
    return out


# -- SentencePiece ------------------------------------------------------------


class _SentencePieceBackend:
    def __init__(self, vocab: Vocab, cache_key: str | None = None):
        import sentencepiece

        self._vocab = vocab
        self._sp = sentencepiece.SentencePieceProcessor()
        cached = _cached_proto(cache_key)
        if cached is not None and self._loads(cached):
            return
        proto = spm_model_proto(vocab)  # ~0.3 s for gemma's 262,144 pieces: kept for the next load
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"the SentencePiece vocabulary is invalid: {e}") from e
        _keep_proto(cache_key, proto)

    def _loads(self, proto: bytes) -> bool:
        try:
            self._sp.LoadFromSerializedProto(proto)
            return True
        except (RuntimeError, OSError):  # a damaged cache file: build it again
            return False

    def encode(self, fragment: str) -> list[int]:
        return self._sp.EncodeAsIds(fragment)

    def token_bytes(self, token_id: int, token_type: int) -> bytes:
        text = self._vocab.tokens[token_id]
        if token_type == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])  # "<0x0A>"
        if token_type == TokenType.UNKNOWN:
            return "\u2585".encode()  # llama.cpp renders <unk> as "▅"
        if token_type == TokenType.UNUSED:
            return b""
        return text.replace(SPM_SPACE, " ").encode("utf-8")


SPM_PROTO_FORMAT = 1  # bump when spm_model_proto's output changes: cached protos then miss


def _proto_path(cache_key: str) -> Path:
    from llmx.paths import cache_dir

    digest = hashlib.blake2b(f"{SPM_PROTO_FORMAT}:{cache_key}".encode(), digest_size=16).hexdigest()
    return cache_dir() / "tokenizers" / f"{digest}.model"


def _cached_proto(cache_key: str | None) -> bytes | None:
    if cache_key is None:
        return None
    try:
        return _proto_path(cache_key).read_bytes()
    except OSError:
        return None


def _keep_proto(cache_key: str | None, proto: bytes) -> None:
    """A cache that cannot be written only costs the next load the time to build it again."""
    if cache_key is None:
        return
    path = _proto_path(cache_key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as partial:
            partial.write_bytes(proto)
    except OSError:
        pass


def spm_model_proto(vocab: Vocab) -> bytes:
    """A serialized sentencepiece ModelProto (BPE, byte fallback) for `vocab`.

    Written by hand in protobuf's wire format so we need no protobuf runtime. Field numbers are
    those of sentencepiece_model.proto.
    """
    types = vocab.types.copy()
    if vocab.unk_id is not None and not (types == TokenType.UNKNOWN).any():
        types[vocab.unk_id] = TokenType.UNKNOWN  # sentencepiece insists on one; gemma marks <unk> CONTROL
    _check_spm_types(types)
    pieces = _spm_pieces(vocab, types)
    trainer = (
        _pb_varint_field(3, 2)  # model_type = BPE
        + _pb_varint_field(4, vocab.n_vocab)
        + _pb_varint_field(35, 1)  # byte_fallback
        + _pb_varint_field(40, vocab.unk_id if vocab.unk_id is not None else 0)
    )
    normalizer = (
        _pb_bytes(1, b"identity")
        + _pb_varint_field(3, int(vocab.add_space_prefix))  # add_dummy_prefix
        + _pb_varint_field(4, 0)  # remove_extra_whitespaces: llama.cpp keeps every space
        + _pb_varint_field(5, 1)  # escape_whitespaces
    )
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def _spm_pieces(vocab: Vocab, types: np.ndarray) -> bytes:
    """The repeated `pieces` field: {1: text, 2: score (fixed32), 3: type} per token.

    The hot loop of loading a SentencePiece vocabulary, so lengths' varints come from a table.
    """
    # sentencepiece escapes spaces before it matches user-defined pieces, so theirs must be escaped too
    texts = [
        (t.replace(" ", SPM_SPACE) if ty == TokenType.USER_DEFINED else t).encode("utf-8")
        for t, ty in zip(vocab.tokens, types.tolist(), strict=True)
    ]
    varint = [_pb_varint(n) for n in range(max(map(len, texts)) + 16)]
    scores = vocab.scores.astype("<f4").tobytes()
    out = []
    for i, (text, token_type) in enumerate(zip(texts, types.tolist(), strict=True)):
        score = scores[4 * i : 4 * i + 4]
        body = b"\x0a" + varint[len(text)] + text + b"\x15" + score + b"\x18" + varint[token_type]
        out.append(b"\x0a" + varint[len(body)] + body)
    return b"".join(out)


def _check_spm_types(types: np.ndarray) -> None:
    known = [int(t) for t in TokenType]
    if not np.isin(types, known).all():
        raise TokenizerError("the vocabulary has token types outside llama.cpp's 1..6")
    if (types == TokenType.UNKNOWN).sum() != 1:
        raise TokenizerError("a SentencePiece vocabulary needs exactly one unknown token (<unk>)")


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pb_varint_field(field: int, value: int) -> bytes:
    return _pb_varint(field << 3) + _pb_varint(value)


def _pb_bytes(field: int, payload: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(payload)) + payload


# -- byte-level BPE -----------------------------------------------------------


class _BPEBackend:
    def __init__(self, vocab: Vocab):
        self._vocab = vocab
        self._tok = _build_hf_bpe(vocab)
        self._byte_of_char = {c: b for b, c in enumerate(gpt2_byte_chars())}

    def encode(self, fragment: str) -> list[int]:
        return self._tok.encode(fragment, add_special_tokens=False).ids

    def token_bytes(self, token_id: int, token_type: int) -> bytes:
        text = self._vocab.tokens[token_id]
        if token_type in (TokenType.NORMAL, TokenType.BYTE):
            try:
                return bytes(self._byte_of_char[c] for c in text)
            except KeyError:
                pass  # not byte-level text (some added tokens): fall through to plain UTF-8
        if token_type == TokenType.UNUSED:
            return b""
        return text.encode("utf-8")


def _build_hf_bpe(vocab: Vocab):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    regexes = BPE_PRE_TOKENIZER_REGEXES.get(vocab.pre)
    if regexes is None:
        known = ", ".join(sorted(BPE_PRE_TOKENIZER_REGEXES))
        raise TokenizerError(f"BPE pre-tokenizer {vocab.pre!r} is not supported (known: {known})")
    merges = [_split_merge(m) for m in vocab.merges]
    model = models.BPE(
        vocab={t: i for i, t in enumerate(vocab.tokens)},
        merges=merges,
        ignore_merges=vocab.pre in _IGNORE_MERGES_PRE,
    )
    tok = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after the first character.
    pos = merge.find(" ", 1)
    if pos < 0:
        raise TokenizerError(f"BPE merge {merge!r} is not two tokens separated by a space")
    return merge[:pos], merge[pos + 1 :]


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (index = byte value)."""
    ranges = (("!", "~"), ("\u00a1", "\u00ac"), ("\u00ae", "\u00ff"))
    printable = [b for lo, hi in ranges for b in range(ord(lo), ord(hi) + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]

