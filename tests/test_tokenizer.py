"""Tokenizers against llama.cpp's ids (gemma) and against HF tokenizers (byte-level BPE)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest
from conftest import MODELS_DIR, require_reference
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmx.errors import TokenizerError
from llmx.formats.gguf_file import GGUFFile
from llmx.formats.tokenizer import Tokenizer
from llmx.formats.vocab import TokenType


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile.open(gemma_path))


@pytest.mark.parametrize("mode", ["plain", "special"])
def test_gemma_ids_equal_llama_cpp(gemma_tokenizer, reference, mode):
    cases = reference["gemma"]["tokenize"]
    assert len(cases) >= 13
    for text, expected in cases.items():
        ids = gemma_tokenizer.tokenize(text, add_bos=True, special=(mode == "special"))
        assert ids == expected[mode], text


@pytest.mark.parametrize("mode", ["plain", "special"])
def test_gemma_round_trip(gemma_tokenizer, reference, mode):
    special = mode == "special"
    for text in reference["gemma"]["tokenize"]:
        ids = gemma_tokenizer.tokenize(text, add_bos=True, special=special)
        assert ids[0] == gemma_tokenizer.vocab.bos_id
        assert gemma_tokenizer.detokenize(ids[1:], special=special) == text


def test_control_tokens_hidden_unless_special(gemma_tokenizer):
    ids = gemma_tokenizer.tokenize("<start_of_turn>user\nHi<end_of_turn>", add_bos=False, special=True)
    assert gemma_tokenizer.detokenize(ids) == "user\nHi"
    assert gemma_tokenizer.detokenize(ids, special=True) == "<start_of_turn>user\nHi<end_of_turn>"


def test_streaming_never_breaks_utf8(gemma_tokenizer):
    emoji = "🙂"
    byte_ids = [gemma_tokenizer.vocab.tokens.index(f"<0x{b:02X}>") for b in emoji.encode()]
    decoder = gemma_tokenizer.decoder()
    pieces = [decoder.push(i) for i in byte_ids]
    assert pieces == ["", "", "", emoji]
    assert decoder.flush() == ""


def test_streaming_equals_detokenize(gemma_tokenizer, reference):
    for text in reference["gemma"]["tokenize"]:
        ids = gemma_tokenizer.tokenize(text, add_bos=False)
        decoder = gemma_tokenizer.decoder()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_unfinished_character_is_replaced_at_the_end(gemma_tokenizer):
    first_byte = gemma_tokenizer.vocab.tokens.index("<0xF0>")
    decoder = gemma_tokenizer.decoder()
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == "\ufffd"


@pytest.fixture(scope="module")
def tiny_llama_tokenizer() -> Tokenizer:
    require_reference()
    return Tokenizer.from_gguf(GGUFFile.open(MODELS_DIR / "tiny-llama-f16.gguf"))


def test_space_prefix(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    assert tok.vocab.add_space_prefix
    ids = tok.tokenize("the cat", add_bos=False)
    assert tok.vocab.tokens[ids[0]].startswith("▁")  # SentencePiece's dummy prefix
    assert tok.detokenize(ids) == "the cat"
    # Streaming from the start of a text drops the prefix; continuing a text keeps spaces.
    start = tok.decoder(strip_space_prefix=True)
    assert "".join([start.push(i) for i in ids] + [start.flush()]) == "the cat"
    more = tok.decoder()
    assert "".join([more.push(i) for i in ids] + [more.flush()]) == " the cat"


def test_space_prefix_after_special_token(tiny_llama_tokenizer):
    # llama.cpp adds the space prefix to the text after every special token.
    tok = tiny_llama_tokenizer
    ids = tok.tokenize("</s>the", add_bos=False, special=True)
    assert ids[0] == tok.vocab.eos_id
    assert ids[1:] == tok.tokenize("the", add_bos=False)


def test_out_of_range_id(tiny_llama_tokenizer):
    with pytest.raises(TokenizerError):
        tiny_llama_tokenizer.detokenize([10**6])


# -- byte-level BPE: a trained HF tokenizer written into a GGUF ---------------

# The pre-tokenizer regexes as the models' own tokenizer.json files carry them.
HF_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = [
    'the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'Hello', 'World', "I'm",
    "you're", "we'll", "they've", "she'd", "it's", "DON'T", "CAN'T", 'naïve', 'café', 'résumé',
    'Zürich', '日本語', 'テキスト', '中文', 'русский', 'язык', 'Ελληνικά', 'emoji', '🙂', '👍🏽', 'def',
    'return', 'import', 'numpy', 'np', 'x**2', '==', '!=', '<=', '>=', '->', '=>', '{}', '[]',
    '()', '#include', '<stdio.h>', 'https://example.com/a?b=c&d=e', 'user@mail.org', '3.14159',
    '1234567', '42', '2024-11-24', '$100', '50%', 'tab\there', 'new\nline', '', 'two', '',
    'spaces\r\nwindows',
]


def training_corpus() -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(3000)]


def varied_strings(n: int = 240) -> list[str]:
    rng = random.Random(11)
    out = ["", " ", "  ", "\n", "\n\n\n", "a", "I'M HERE", "x  y   z", "  lead", "trail  ", "1234567890",
           "🙂🙂", "\t\tindent", "<|im_start|>user\nhi<|im_end|>", "a<|endoftext|>b"]
    seps = [" ", "  ", "\n", "\t", "", " \n ", "\r\n"]
    while len(out) < n:
        out.append("".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(rng.randint(1, 12))))
    return out


def train_bpe(pre: str) -> HFTokenizer:
    model = models.BPE(ignore_merges=(pre == "llama-bpe"))
    tok = HFTokenizer(model)
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(HF_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    return tok


def write_bpe_gguf(tok: HFTokenizer, pre: str, path: Path) -> None:
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [TokenType.CONTROL if t in SPECIAL else TokenType.NORMAL for t in tokens]
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_bpe_equals_trained_tokenizer(tmp_path, pre):
    hf = train_bpe(pre)
    path = tmp_path / f"bpe-{pre}.gguf"
    write_bpe_gguf(hf, pre, path)
    ours = Tokenizer.from_gguf(GGUFFile.open(path))
    strings = varied_strings()
    assert len(strings) >= 200
    for text in strings:
        expected = hf.encode(text, add_special_tokens=False).ids
        # HF always matches its special added tokens; llama.cpp does with parse_special.
        assert ours.tokenize(text, add_bos=False, special=True) == expected, repr(text)
        assert ours.detokenize(expected, special=True) == hf.decode(expected, skip_special_tokens=False)
        assert ours.detokenize(expected, special=True) == text


def test_bpe_default_pre_tokenizer_round_trips(tmp_path):
    hf = train_bpe("gpt2")
    path = tmp_path / "bpe-default.gguf"
    write_bpe_gguf(hf, "default", path)
    ours = Tokenizer.from_gguf(GGUFFile.open(path))
    for text in varied_strings():
        ids = ours.tokenize(text, add_bos=False, special=True)
        assert ours.detokenize(ids, special=True) == text
    # llama.cpp's default pre-tokenizer cuts digit runs into groups of three; GPT-2's does not.
    def cuts(pieces: list[str]) -> set[int]:
        return {sum(map(len, pieces[:k])) for k in range(1, len(pieces))}

    ours_pieces = [ours.piece(i) for i in ours.tokenize("1234567", add_bos=False)]
    assert "".join(ours_pieces) == "1234567" and {3, 6} <= cuts(ours_pieces)
    gpt2_pieces = [hf.id_to_token(i) for i in hf.encode("1234567").ids]
    assert not {3, 6} <= cuts(gpt2_pieces)


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path):
    hf = train_bpe("gpt2")
    path = tmp_path / "bpe-unknown.gguf"
    write_bpe_gguf(hf, "no-such-pre", path)
    with pytest.raises(TokenizerError, match="no-such-pre"):
        Tokenizer.from_gguf(GGUFFile.open(path))


def test_the_sentencepiece_model_is_kept_for_the_next_load_and_rebuilt_when_damaged(gemma_path, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("LLMX_CACHE_DIR", str(tmp_path))
    text = "Hello world, the cat sat\n\n  on a mat: 123 ünïcödé <start_of_turn>"
    gguf_file = GGUFFile.open(gemma_path)
    built = Tokenizer.from_gguf(gguf_file)
    kept = list((tmp_path / "tokenizers").glob("*.model"))
    assert len(kept) == 1 and kept[0].stat().st_size > 1_000_000
    assert Tokenizer.from_gguf(gguf_file).tokenize(text, special=True) == built.tokenize(text, special=True)
    kept[0].write_bytes(b"damaged")
    assert Tokenizer.from_gguf(gguf_file).tokenize(text, special=True) == built.tokenize(text, special=True)
    assert kept[0].read_bytes() != b"damaged"
