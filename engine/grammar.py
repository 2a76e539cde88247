"""Structured output: constrained sampling through llguidance (the grammar engine of llama.cpp and vLLM).

A `response_format` names what the output must be (OpenAI's and llama.cpp's spellings):

    {"type": "json_object"}                        any JSON object
    {"type": "json_schema", "json_schema": {"schema": {...}}}  or {"type": "json_schema", "schema": {...}}
    {"type": "gbnf", "grammar": "root ::= ..."}   a llama.cpp GBNF grammar (Lark is read too)
    {"type": "lark", "grammar": "start: ..."}
    {"type": "regex", "regex": "[0-9]+"}

`compile_format` turns it into an llguidance grammar and checks it (an invalid one is a one-line
`GrammarError`); `Constraint` follows one request: `prepare()` computes the allowed-token bitmask
of the next step (the engine calls it while the forward runs; llguidance releases the GIL),
`mask(logits)` applies it, `advance(token)` consumes the sampled token and says when the grammar
is complete.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from llmx.errors import LlmxError, UsageError
from llmx.formats.tokenizer import Tokenizer
from llmx.formats.vocab import TokenType


class GrammarError(UsageError):
    """An invalid schema or grammar (the CLI exits 2, the server answers 400)."""


FORMAT_TYPES = ("json_object", "json_schema", "gbnf", "grammar", "lark", "regex", "text")


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a run-time dependency: only a broken install lacks it
        raise LlmxError("structured output needs llguidance: pip install llguidance") from e
    return llguidance


def compile_format(response_format: Mapping[str, Any] | None) -> str | None:
    """The llguidance grammar for a response format (None: unconstrained text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise GrammarError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    try:
        grammar = _grammar_of(kind, response_format)
    except (ValueError, TypeError) as e:  # what llguidance's converters raise on malformed input
        raise GrammarError(f"invalid {kind}: {_one_line(str(e))}") from None
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"invalid {kind.replace('_', ' ')}: {_one_line(error)}")
    return grammar


def _grammar_of(kind: Any, fmt: Mapping[str, Any]) -> str:
    llg = _llguidance()
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema(_schema_text({"type": "object"}))
    if kind == "json_schema":
        return llg.LLMatcher.grammar_from_json_schema(_schema_text(_schema_of(fmt)))
    if kind in ("gbnf", "grammar", "lark"):
        text = fmt.get("grammar")
        if not isinstance(text, str) or not text.strip():
            raise GrammarError(f"response_format type {kind!r} needs a non-empty 'grammar' string")
        try:  # llguidance reads GBNF by translating it to Lark; Lark passes through unchanged
            return llg.grammar_from("lark" if kind == "lark" else "gbnf", text)
        except ValueError as e:
            raise GrammarError(f"invalid grammar: {_one_line(str(e))}") from None
    if kind == "regex":
        regex = fmt.get("regex", fmt.get("pattern"))
        if not isinstance(regex, str):
            raise GrammarError("response_format type 'regex' needs a 'regex' string")
        return llg.LLMatcher.grammar_from_regex(regex)
    raise GrammarError(f"response_format type {kind!r} is unknown; use one of {', '.join(FORMAT_TYPES)}")


def _schema_of(fmt: Mapping[str, Any]) -> Any:
    """The schema of {"type": "json_schema", "json_schema": {"name", "schema"}} (OpenAI) or
    {"type": "json_schema", "schema": {...}}."""
    inner = fmt.get("json_schema", fmt)
    schema = inner.get("schema") if isinstance(inner, Mapping) else None
    if schema is None:
        raise GrammarError("response_format type 'json_schema' needs json_schema.schema")
    return schema


def _schema_text(schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError("a JSON schema must be an object")
    # compact separators: a base model left to pick whitespace freely can ramble in it forever
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    if isinstance(schema, Mapping):
        own = schema.get("x-guidance", {})
        if not isinstance(own, Mapping):
            raise GrammarError("a schema's x-guidance must be an object")
        schema = {**schema, "x-guidance": {**options, **own}}
    return json.dumps(schema)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


# -- the tokenizer view ----------------------------------------------------------------------------

_views: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()  # lives as long as its tokenizer
_views_lock = threading.Lock()


class _TokenizerSource:
    """What llguidance's `TokenizerWrapper` reads: each token's bytes (control tokens marked with
    0xFF, as llama.cpp's integration does), EOS and BOS, and a tokenize function."""

    def __init__(self, tokenizer: Tokenizer):
        vocab = tokenizer.vocab
        self._tokenizer = weakref.ref(tokenizer)  # the view must not keep its tokenizer (its cache's key) alive
        self.eos_token_id = vocab.eos_id if vocab.eos_id is not None else 0
        self.bos_token_id = vocab.bos_id
        types = vocab.types.tolist()
        special = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN)}
        self.special_token_ids = [i for i, t in enumerate(types) if t == int(TokenType.CONTROL)]
        self.tokens = [b"\xff" + text.encode() if kind in special and _looks_special(text) else raw
                       for text, kind, raw in zip(vocab.tokens, types, tokenizer.all_token_bytes(), strict=True)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        tokenizer = self._tokenizer()
        return tokenizer.tokenize(text, add_bos=False) if tokenizer is not None else []


def _looks_special(text: str) -> bool:
    return text.startswith("<") and text.endswith(">") and len(text) > 2


def tokenizer_view(tokenizer: Tokenizer) -> Any:
    """llguidance's `LLTokenizer` of our vocabulary (byte-level or SentencePiece), built once per
    tokenizer (about a second for 262k tokens)."""
    with _views_lock:
        view = _views.get(tokenizer)
        if view is None:
            llg = _llguidance()
            eos = sorted(tokenizer.vocab.eog_ids()) or None
            view = llg.LLTokenizer(llg.TokenizerWrapper(_TokenizerSource(tokenizer)), n_vocab=tokenizer.n_vocab,
                                   eos_token=eos)
            _views[tokenizer] = view
        return view


# -- one request's constraint --------------------------------------------------------------------------


class Constraint:
    def __init__(self, grammar: str, tokenizer: Tokenizer):
        llg = _llguidance()
        self._n_vocab = tokenizer.n_vocab
        self._matcher = llg.LLMatcher(tokenizer_view(tokenizer), grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"invalid grammar: {_one_line(self._matcher.get_error())}")
        self._words = np.zeros((self._n_vocab + 31) // 32, np.int32)
        self._ready = False

    def prepare(self) -> None:
        """Compute the next step's allowed tokens (bitmask) now."""
        if not self._ready:
            self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            self._ready = True

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits [n_vocab] with every token the grammar forbids at -inf."""
        self.prepare()
        out = np.empty(len(logits), np.float32)
        _apply_bitmask(np.asarray(logits, np.float32), self._words, out)
        return out

    def advance(self, token: int) -> bool:
        """Consume the sampled token; True when the grammar is complete (nothing more may follow)."""
        self._ready = False
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused a token: {_one_line(self._matcher.get_error())}")
        return self._matcher.is_stopped()


@njit(cache=True, nogil=True)
def _apply_bitmask(logits, words, out):
    """out[i] = logits[i] where bit i of words (int32, little-endian bit order) is set, else -inf."""
    for i in range(len(logits)):
        allowed = (words[i >> 5] >> (i & 31)) & 1
        out[i] = logits[i] if allowed else -np.inf
