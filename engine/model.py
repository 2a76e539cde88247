"""`Model`: the public Python API (`llmx.load`): tokenize, detokenize, logits, generate, chat."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmx.engine.archs import config_from_gguf
from llmx.engine.compute import ComputeThread
from llmx.engine.kv_cache import KVCache
from llmx.engine.transformer import Transformer
from llmx.errors import LlmxError, UsageError
from llmx.formats.chat_template import ChatTemplate, chat_template_for
from llmx.formats.gguf_file import GGUFFile
from llmx.formats.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmx.engine.engine import Engine, Request

DEFAULT_CTX = 4096


@dataclass
class GenerationStats:
    """What one `generate` call did, filled in as it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    first_token_seconds: float = 0.0
    finish_reason: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # with generate(logprobs=N)


def max_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= max_threads():
        raise UsageError(f"{threads} threads: this machine runs 1 to {max_threads()} "
                         "(set NUMBA_NUM_THREADS to allow more)")


class Model:
    def __init__(self, path: Path, threads: int | None = None, ctx: int = DEFAULT_CTX, device: str = "cpu",
                 use_mmap: bool = False, isa: str | None = None, compute: ComputeThread | None = None):
        """`use_mmap`: compute on the file's mmap instead of a private copy of the weights (less
        memory when several processes share one file; decoding is slower, see `load_into_memory`).
        `isa`: "avx2", "vnni" or "portable" kernels instead of the best this CPU runs. `compute`:
        the thread that runs the kernels (see `engine.compute`; models served together share one)."""
        from llmx.engine.backends import resolve_device

        self.device = resolve_device(device)  # "auto" -> "cuda" or "cpu"; a missing GPU fails here
        check_threads(threads)
        from llmx.quant.cpu.simd import isa_named

        isa_marker = isa_named(isa)
        self.isa_requested, self.use_mmap = isa, use_mmap  # as asked: a compile helper gets the same
        started = time.perf_counter()
        self.path = Path(path)
        self.gguf = GGUFFile.open(self.path)
        self.config = config_from_gguf(self.gguf)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        if not use_mmap and self.device == "cpu":  # (a GPU's copy is uploaded from the mmap)
            self.gguf.load_into_memory(keep_mapped=Transformer.packed_weights(self.config, self.gguf.tensors))
        self.transformer = Transformer.from_gguf(self.gguf, self.config, threads, isa_marker, self.device)
        self.ctx = min(ctx, self.config.n_ctx_train) if ctx > 0 else self.config.n_ctx_train
        self._engine: Engine | None = None
        # `generate` and `chat` decode speculatively with this (`Engine(speculative=...)`), set before the first call
        self.speculative: dict[str, Any] | None = None
        self.compute = compute if compute is not None else ComputeThread()
        if compute is None:  # its own thread ends with the model
            weakref.finalize(self, self.compute.close)
        self.load_seconds = time.perf_counter() - started

    def warm_up(self, parallel: bool = False, helper=None) -> float:
        """Run a prompt through the model so the kernels it needs are compiled (first run) or
        loaded from Numba's cache; returns the seconds it took. `parallel`: on a cold cache, compile
        on two processes (`precompile`), the matmul kernels then arriving while the model runs;
        `helper`: that process, when the caller started it before loading the model."""
        started = time.perf_counter()
        parallel = parallel and self.device == "cpu"  # (the helper compiles CPU kernels)
        if parallel and helper is None:
            from llmx.engine.precompile import start_helper

            helper = start_helper(self.path, self.isa_requested, self.transformer.threads, self.use_mmap)
        if helper is not None:
            from llmx.engine.precompile import compile_in_parallel

            compile_in_parallel(self, helper)
            return time.perf_counter() - started
        # Two tokens: a prompt's kernels, which every prompt of two or more tokens runs. A single
        # token's step (`cpu_decode`) loads its own at the first decode, which `-n 1` never takes.
        cache = KVCache(self.config, 2)
        ids = np.array([self.tokenizer.vocab.bos_id or 0] * 2)
        self.compute.call(self.transformer.forward, ids, cache.new_sequence(), cache, "last")
        return time.perf_counter() - started

    # -- text <-> ids ---------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return self.tokenizer.detokenize(ids, special=special)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab]: the next-token logits after each prefix of `ids`."""
        ids = np.asarray(ids, dtype=np.int64)
        self._check_fits(len(ids))
        cache = KVCache(self.config, len(ids))
        return self.compute.call(self.transformer.forward, ids, cache.new_sequence(), cache)

    def embedding(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [n_embd]: the final (normed) hidden states of `ids`, mean-pooled, L2-normalized."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            raise UsageError("nothing to embed: the input is empty")
        if ids.min() < 0 or ids.max() >= self.config.n_vocab:
            raise UsageError(f"token ids must be in 0..{self.config.n_vocab - 1}")
        self._check_fits(len(ids))
        cache = KVCache(self.config, len(ids))
        hidden = self.compute.call(self.transformer.hidden_states, ids, cache.new_sequence(), cache)
        mean = hidden.astype(np.float64).mean(axis=0)
        norm = np.linalg.norm(mean)
        return (mean / norm if norm else mean).astype(np.float32)

    # -- generation -------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, stop: Sequence[str] = (),
                 stats: GenerationStats | None = None, logprobs: int | None = None,
                 response_format: Mapping[str, Any] | None = None, **sampling: Any) -> Iterator[str]:
        """Stream the continuation of `prompt` (text, special tokens parsed, BOS added; or ids)
        as text pieces. Sampling keywords as `SamplingParams` (temperature=0 is greedy). With
        `logprobs=N`, `stats.logprobs` gets each token's log-probability and the N most likely;
        `response_format` constrains the text (`engine.grammar`: JSON schema, GBNF, regex ...).
        One request on the model's own `Engine`: the same path as many in `llmx serve`."""
        stats = stats if stats is not None else GenerationStats()
        request = self.engine.submit(prompt, max_tokens, stop, logprobs, response_format=response_format, **sampling)
        return self._stream(request, stats)

    @property
    def engine(self) -> Engine:
        """This model's engine for `generate` and `chat`, started on first use."""
        if self._engine is None:
            from llmx.engine.engine import Engine

            self._engine = Engine(self, max_seqs=4, kv_cache_tokens=self.ctx, speculative=self.speculative)
        return self._engine

    def _stream(self, request: Request, stats: GenerationStats) -> Iterator[str]:
        try:
            yield from request
        finally:
            request.cancel()  # (no change when it finished: a consumer that stops early frees it)
            request.wait()
            _fill_stats(stats, request)

    def _check_fits(self, n_tokens: int) -> None:
        if n_tokens >= self.ctx:
            raise LlmxError(f"the prompt is {n_tokens} tokens but the context holds {self.ctx}; "
                            "shorten it or raise the context size (-c)")

    # -- chat ---------------------------------------------------------------------------

    @property
    def chat_template(self) -> ChatTemplate:
        vocab = self.tokenizer.vocab
        bos = vocab.tokens[vocab.bos_id] if vocab.bos_id is not None else ""
        eos = vocab.tokens[vocab.eos_id] if vocab.eos_id is not None else ""
        return chat_template_for(self.gguf.metadata, self.gguf.architecture, vocab.tokens, bos, eos)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt ids for a conversation: the template's text, special tokens parsed. A BOS the
        template writes itself is not added a second time."""
        template = self.chat_template
        text = template.render(messages, add_generation_prompt=True)
        add_bos = not (template.bos_token and text.startswith(template.bos_token))
        return self.tokenize(text, add_bos=add_bos, special=True)

    def chat(self, messages: Sequence[Mapping[str, Any]], max_tokens: int = 256, stop: Sequence[str] = (),
             stats: GenerationStats | None = None, logprobs: int | None = None,
             response_format: Mapping[str, Any] | None = None, **sampling: Any) -> Iterator[str]:
        """Stream the assistant's reply to `messages` (OpenAI-style role/content dicts)."""
        return self.generate(self.chat_prompt(messages), max_tokens, stop, stats, logprobs, response_format,
                             **sampling)


def _fill_stats(stats: GenerationStats, request: Request) -> None:
    first = request.first_token_at or request.finished_at or request.submitted_at
    stats.prompt_tokens = len(request.prompt_ids)
    stats.completion_tokens = len(request.token_ids)
    stats.tokens = list(request.token_ids)
    stats.logprobs = list(request.logprobs or [])
    stats.prompt_seconds = stats.first_token_seconds = first - request.submitted_at
    stats.generation_seconds = (request.finished_at or first) - first
    stats.finish_reason = request.finish_reason or "stop"
