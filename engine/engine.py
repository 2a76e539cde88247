"""`Engine`: continuous batching over one model, its loop in a background thread.

    eng = llmx.Engine(model, max_seqs=16, max_batched_tokens=512, kv_cache_tokens=32768)
    req = eng.submit("prompt", max_tokens=64, temperature=0.0)   # from any thread
    for piece in req: ...                                         # or `async for piece in req.stream()`

Each step the loop takes what other threads posted (new requests, cancels), asks the `Scheduler`
what to compute, runs it as one `forward_batch` (`ModelRunner`; Numba kernels release the GIL, so
an event loop elsewhere stays responsive), samples each finished chunk's next token and streams
the text. `Model.generate` is this engine with one request.

A request may be constrained to a grammar (`response_format`, `engine.grammar`): its allowed-token
mask is computed while the forward runs and applied before sampling. With `speculative=...` the
engine proposes tokens after each decoding sequence (`engine.speculative`), the next step computes
them with it, and the verification keeps what the target model agrees with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llmx.engine.grammar import Constraint, GrammarError, compile_format
from llmx.engine.kv_cache import KVCache
from llmx.engine.runner import ModelRunner
from llmx.engine.sampling import (
    SamplingParams,
    StopMatcher,
    dense,
    is_greedy,
    logprob_of,
    make_distribution,
    make_rng,
    make_sampler,
    top_logprobs,
)
from llmx.engine.scheduler import ScheduledChunk, Scheduler, Status
from llmx.engine.scheduler import Sequence as SchedSequence
from llmx.engine.speculative import (
    Pacing,
    SpeculativeConfig,
    accept_greedy,
    accept_rejection,
    check_same_vocabulary,
    make_proposer,
)
from llmx.errors import LlmxError, UsageError

if TYPE_CHECKING:
    from llmx.engine.model import Model

_END = object()  # the last item of a request's stream


class Request:
    """One generation: iterate it (or `stream()` it) for text pieces; once finished, `text`,
    `token_ids`, `finish_reason` ("stop", "length", "cancelled", "error") and `usage` hold."""

    def __init__(self, engine: Engine, request_id: int, prompt_ids: list[int], params: SamplingParams,
                 stop: Sequence[str], logprobs: int | None, keep_logits: bool, constraint: Constraint | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: LlmxError | None = None
        self.logprobs: list[dict[str, Any]] | None = [] if logprobs is not None else None
        self.step_logits: list[np.ndarray] | None = [] if keep_logits else None  # debug: every sampled row
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.token_times: list[float] = []  # when each generated token was sampled
        self.finished_at: float | None = None
        self._engine = engine
        self._n_logprobs = logprobs
        self._sample, self._rng = make_sampler(params), make_rng(params.seed)
        self._distribution = make_distribution(params)
        self._n_vocab = engine.model.config.n_vocab
        self._decoder = engine.model.tokenizer.decoder()
        self._stops = StopMatcher(stop)
        self._row_logits: deque[np.ndarray] = deque()  # the logits each token of this step was sampled from
        self.constraint = constraint
        self._grammar_done = False
        self.pacing = Pacing(engine.speculative.k if engine.speculative else 1)  # how much to propose
        self.draft_dists: list[np.ndarray | None] = []  # a draft model's q for each proposed token
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._done = threading.Event()

    # -- the caller's side -------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        while (item := self._events.get()) is not _END:
            yield item
        self._raise_error()

    async def stream(self) -> AsyncIterator[str]:
        """The pieces from asyncio, without blocking the event loop."""
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._async = (asyncio.get_running_loop(), events)
            while True:  # what came before this call
                try:
                    events.put_nowait(self._events.get_nowait())
                except queue.Empty:
                    break
        while (item := await events.get()) is not _END:
            yield item
        self._raise_error()

    def cancel(self) -> None:
        """Stop generating; the request's KV blocks are free after the engine's next step."""
        self._engine._post("cancel", self)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def usage(self) -> dict[str, int]:
        n_prompt, n_out = len(self.prompt_ids), len(self.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    # -- the engine's side -------------------------------------------------------------

    def _emit(self, item: Any) -> None:
        with self._lock:
            if self._async is None:
                self._events.put(item)
                return
            loop, events = self._async
        with contextlib.suppress(RuntimeError):  # the consumer's event loop is closed: nobody listens
            loop.call_soon_threadsafe(events.put_nowait, item)

    def _sample_rows(self, rows: np.ndarray, draft: Sequence[int], history: list[int]) -> list[int]:
        """The tokens of one step from its logits rows [len(draft) + 1, n_vocab]: the proposals
        the target model accepts, then one of its own (just one token without proposals)."""
        self._row_logits.clear()
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.constraint is not None:  # (a constrained request gets no proposals)
            token = self._sample_from(self.constraint.mask(rows[0]), history, rows[0])
            self._grammar_done = self.constraint.advance(token)
            return [token]
        dists = self.draft_dists[:len(draft)]
        if draft and not is_greedy(self.params) and len(dists) == len(draft) and all(q is not None for q in dists):
            tokens = accept_rejection(lambda i, out: dense(self._distribution(rows[i], history + out), self._n_vocab),
                                      draft, dists, self._rng)
            for i in range(len(tokens)):
                self._keep_row(rows[i])
        else:
            # (the history is copied only when proposals were accepted: a plain step samples on it as it is)
            tokens = accept_greedy(len(draft) + 1, draft,
                                   lambda i, out: self._sample_from(rows[i], history + out if out else history))
        self.pacing.check_shadow(tokens[0])
        self.pacing.record(len(draft), len(tokens) - 1)
        self.draft_dists = []
        return tokens

    def _sample_from(self, logits: np.ndarray, history: Sequence[int], raw: np.ndarray | None = None) -> int:
        self._keep_row(logits if raw is None else raw)
        return self._sample(logits, history, self._rng)

    def _keep_row(self, logits: np.ndarray) -> None:
        if self.step_logits is not None:
            self.step_logits.append(logits.copy())
        self._row_logits.append(logits)

    def draft_sampler(self, logits: np.ndarray, history: Sequence[int]) -> tuple[int, np.ndarray | None]:
        """How a draft model proposes for this request: its token, and the distribution it was
        drawn from (None when greedy: the verification then only compares tokens)."""
        if is_greedy(self.params):
            return self._sample(logits, history, self._rng), None
        ids, probs = self._distribution(logits, history)
        return int(ids[self._rng.choice(len(ids), p=probs)]), dense((ids, probs), self._n_vocab)

    def _on_token(self, token: int) -> bool:
        """A generated token: stream its text; True when a stop string or a complete grammar ends the request."""
        self.token_ids.append(token)
        self.token_times.append(time.perf_counter())
        logits = self._row_logits.popleft() if self._row_logits else None
        if self.logprobs is not None and logits is not None:
            self.logprobs.append(_logprob_entry(logits, token, self._n_logprobs or 0))
        self._push_text(self._stops.push(self._decoder.push(token)))
        return self._stops.stopped or self._grammar_done

    def _push_text(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._emit(piece)

    def _finish(self, reason: str, error: LlmxError | None = None) -> None:
        if self._done.is_set():
            return
        if error is None:
            self._push_text(self._stops.push(self._decoder.flush()) + self._stops.flush())
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()
        self._engine._finished_one()
        self._done.set()
        self._emit(_END)


class Engine:
    def __init__(self, model: Model, max_seqs: int = 16, max_batched_tokens: int = 512, kv_cache_tokens: int = 32768,
                 prefix_caching: bool = True, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 speculative: SpeculativeConfig | Mapping[str, Any] | None = None):
        """`speculative`: {"method": "ngram", "k": K} (prompt lookup) or {"method": "draft",
        "model": draft_model, "k": K}; see `engine.speculative`."""
        if kv_cache_tokens < 1:
            raise UsageError("kv_cache_tokens must be at least 1")
        self.speculative = SpeculativeConfig.parse(speculative)
        if self.speculative is not None and self.speculative.draft is not None:
            check_same_vocabulary(model, self.speculative.draft)
        self.model = model
        self.cache = KVCache(model.config, kv_cache_tokens, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                             prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.cache.pool, max_seqs, max_batched_tokens)
        self._runner = ModelRunner(model.transformer, self.cache)
        self._proposer = make_proposer(self.speculative, kv_cache_tokens) if self.speculative else None
        self._eos = frozenset(model.tokenizer.vocab.eog_ids())
        self._ids = itertools.count()
        self._live: dict[int, tuple[Request, SchedSequence]] = {}  # the loop thread's own
        self._inbox: list[tuple[str, Request, SchedSequence | None]] = []
        self._wake = threading.Condition()
        self._closing = False
        self._unfinished = 0  # requests submitted and not finished (any thread)
        self._count_lock = threading.Lock()
        self.check_invariants = False  # tests: assert the scheduler's invariants every step
        self._thread = threading.Thread(target=self._loop, name="llmx-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], max_tokens: int = 256, stop: Sequence[str] = (),
               logprobs: int | None = None, keep_logits: bool = False, ignore_eos: bool = False,
               response_format: Mapping[str, Any] | None = None, **sampling: Any) -> Request:
        """Queue a generation (text: special tokens parsed, BOS added; or token ids). Sampling
        keywords as `SamplingParams`; `logprobs=N` records each token's log-probability and the N
        most likely; `keep_logits` keeps every row of logits sampled from (`step_logits`);
        `ignore_eos` generates past end-of-generation tokens (benchmarks, as llama-bench);
        `response_format` constrains the output (`engine.grammar`: JSON schema, JSON, GBNF, Lark,
        regex; an invalid one raises `GrammarError`)."""
        if self._closing:
            raise LlmxError("the engine is closed")
        ids = self.model.tokenize(prompt, special=True) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._check_prompt(ids)
        if max_tokens < 0:
            raise UsageError(f"max_tokens must be 0 or more, not {max_tokens}")
        grammar = compile_format(response_format)
        constraint = Constraint(grammar, self.model.tokenizer) if grammar is not None else None
        try:
            params = SamplingParams(**sampling)
            request = Request(self, next(self._ids), ids, params, stop, logprobs, keep_logits, constraint)
        except (TypeError, ValueError) as e:
            raise UsageError(f"invalid sampling parameters: {e}") from None
        with self._count_lock:
            self._unfinished += 1
        if max_tokens == 0:
            request._finish("length")
            return request
        eos = frozenset() if ignore_eos else self._eos
        seq = SchedSequence(request.id, list(ids), max_tokens, self.model.ctx, eos, request._on_token)
        self._post("submit", request, seq)
        return request

    def queued(self, extra: int = 0) -> int:
        """Requests submitted beyond the running slots (waiting ones), counting `extra` more."""
        with self._count_lock:
            return max(0, self._unfinished + extra - self.scheduler.max_seqs)

    def _finished_one(self) -> None:
        with self._count_lock:
            self._unfinished -= 1

    def stats(self) -> dict[str, float]:
        s, pool = self.scheduler.stats, self.cache.pool
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": pool.num_used, "kv_blocks_total": pool.n_blocks,
                "kv_blocks_referenced": pool.num_referenced,
                "kv_blocks_cached": pool.num_cached, "kv_bytes_per_token": self.cache.bytes_per_token,
                "prefix_hit_tokens": s.prefix_hit_tokens, "prompt_tokens_computed": s.prompt_tokens_computed,
                "generated_tokens": s.generated_tokens, "preemptions": s.preemptions, "steps": s.steps,
                **speculation_stats(s)}

    def close(self) -> None:
        """Cancel what is left and stop the loop thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop thread ---------------------------------------------------------------------

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise UsageError("the prompt is empty")
        self.model._check_fits(len(ids))  # the context
        self.scheduler.check_fits(len(ids))  # the KV pool
        n_vocab = self.model.config.n_vocab
        if any(not 0 <= t < n_vocab for t in ids):
            raise UsageError(f"token ids must be in 0..{n_vocab - 1}")

    def _post(self, kind: str, request: Request, seq: SchedSequence | None = None) -> None:
        with self._wake:
            if not self._closing:
                self._inbox.append((kind, request, seq))
                self._wake.notify()
                return
        request._finish("cancelled")  # the loop has stopped (or is stopping): nothing will run it

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.scheduler.has_work and not self._closing:
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                closing = self._closing
            self._take(inbox)
            if closing:
                self._cancel_all()
                return
            if self.scheduler.has_work:
                try:
                    self._step()
                except Exception as e:  # a bug in the loop itself: fail what is live rather than hang it
                    self._fail_all(LlmxError(f"the engine failed: {type(e).__name__}: {e}"))

    def _take(self, inbox: list[tuple[str, Request, SchedSequence | None]]) -> None:
        for kind, request, seq in inbox:
            if kind == "submit":
                try:
                    self.scheduler.add(seq)
                except LlmxError as e:
                    request._finish("error", e)
                    continue
                self._live[request.id] = (request, seq)
            elif request.id in self._live:
                self._end(request.id, "cancelled")
            else:
                request._finish("cancelled")  # (finished already, or never queued: no change then)

    def _step(self) -> None:
        self._propose()
        output = self.scheduler.schedule()
        if self.check_invariants:
            self.scheduler.check(output)
        failed: dict[int, LlmxError] = {}
        try:
            forward = self.model.compute.submit(self._runner.run, output)
            self._prepare_masks(output.chunks)  # while the forward runs (both release the GIL)
            logits = forward.result()
            sampled = {c.seq_id: self._sample(c, logits[c.seq_id], failed) for c in output.chunks if c.wants_logits}
        except Exception as e:  # a failed step fails its requests, not the engine
            error = e if isinstance(e, LlmxError) else LlmxError(f"generation failed: {type(e).__name__}: {e}")
            for seq_id in [c.seq_id for c in output.chunks] + [s.seq_id for s in output.finished]:
                if seq_id in self._live:
                    self._end(seq_id, "error", error)
            return
        for seq in self.scheduler.update(output, sampled):
            self._end(seq.seq_id, seq.finish_reason or "stop")
        for seq_id, error in failed.items():
            if seq_id in self._live:
                self._end(seq_id, "error", error)
        if self._proposer is not None:  # a draft model's cache keeps only what the verification accepted
            for chunk in output.chunks:
                if chunk.seq_id in self._live:
                    self._proposer.rollback(chunk.seq_id, self._live[chunk.seq_id][1].token_ids)

    def _prepare_masks(self, chunks: Sequence[ScheduledChunk]) -> None:
        for chunk in chunks:
            constraint = self._live[chunk.seq_id][0].constraint if chunk.wants_logits else None
            if constraint is not None:
                constraint.prepare()

    def _sample(self, chunk: ScheduledChunk, rows: np.ndarray, failed: dict[int, LlmxError]) -> list[int]:
        """One chunk's tokens; a request whose grammar fails gets none and ends with its error."""
        request, seq = self._live[chunk.seq_id]
        draft = list(chunk.tokens[len(chunk.tokens) - chunk.n_draft:]) if chunk.n_draft else []
        try:
            return request._sample_rows(rows, draft, seq.token_ids)
        except GrammarError as e:
            failed[chunk.seq_id] = e
            return []

    def _propose(self) -> None:
        """Proposals for this step (speculative decoding): after each decoding sequence's last
        token, and after a new request's prompt (so its first token is verified too)."""
        if self._proposer is None:
            return
        items, shadows = [], []
        for seq in itertools.chain(self.scheduler.running, self.scheduler.waiting):
            request = self._live[seq.seq_id][0]
            k = self._proposal_size(request, seq)
            if k and request.pacing.ready():
                items.append((seq.seq_id, seq.token_ids, min(k, request.pacing.size), request.draft_sampler))
            elif k and self._proposer.cheap:
                shadows.append((seq.seq_id, seq.token_ids, 1, request.draft_sampler))
        for seq_id, (tokens, _) in self._proposer.propose(shadows).items():
            self._live[seq_id][0].pacing.shadow = tokens[0] if tokens else None
        if not items:
            return
        # a draft model's forwards run on the compute thread; prompt lookup is cheap enough to run here
        proposals = (self._proposer.propose(items) if self._proposer.cheap
                     else self.model.compute.call(self._proposer.propose, items))
        for seq_id, (tokens, dists) in proposals.items():
            request, seq = self._live[seq_id]
            seq.draft, request.draft_dists = tokens, dists

    def _proposal_size(self, request: Request, seq: SchedSequence) -> int:
        """How many tokens to propose after seq (0: none, e.g. in the middle of its prompt)."""
        decoding = seq.n_computed + 1 == len(seq.token_ids)
        fresh = seq.n_computed == 0 and seq.n_generated == 0
        if not (decoding or fresh) or seq.draft or request.constraint is not None:
            return 0
        return max(0, min(self.speculative.k, seq.max_tokens - seq.n_generated - 1,
                          seq.max_len - len(seq.token_ids) - 1))

    def _end(self, seq_id: int, reason: str, error: LlmxError | None = None) -> None:
        request, seq = self._live.pop(seq_id)
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, reason)
        if self._proposer is not None:
            self._proposer.release(seq_id)
        request._finish(reason, error)

    def _fail_all(self, error: LlmxError) -> None:
        for request, seq in list(self._live.values()):
            with contextlib.suppress(Exception):
                self.scheduler.finish(seq, "error")
            request._finish("error", error)
        self._live.clear()

    def _cancel_all(self) -> None:
        for seq_id in list(self._live):
            self._end(seq_id, "cancelled")


def speculation_stats(s: Any) -> dict[str, float]:
    """Speculative decoding's figures: proposals accepted, and tokens per verify step."""
    rate = s.accepted_tokens / s.draft_tokens if s.draft_tokens else 0.0
    per_step = (s.accepted_tokens + s.spec_steps) / s.spec_steps if s.spec_steps else 0.0
    return {"spec_steps": s.spec_steps, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
            "acceptance_rate": rate, "tokens_per_step": per_step}


def _logprob_entry(logits: np.ndarray, token: int, n: int) -> dict[str, Any]:
    """The chosen token's log-probability under the raw logits, and the n most likely tokens."""
    return {"token": token, "logprob": logprob_of(logits, token), "top_logprobs": top_logprobs(logits, n) if n else []}
