"""Speculative decoding: cheap proposals for a sequence's next tokens, verified in one forward.

A proposer suggests up to k tokens after a running sequence's last one; the scheduler computes
them with it (k + 1 rows), and the verification keeps the longest prefix the target model agrees
with, plus one token of its own. Two proposers, as llama.cpp and vLLM offer:

- `NgramProposer` (prompt lookup): the tokens that followed the latest earlier occurrence of the
  sequence's last n tokens, in its prompt or output. Free to compute; it backs off while its
  proposals keep failing, so open-ended text decodes at plain speed.
- `DraftProposer`: a small model with the same vocabulary decodes k tokens ahead, in its own KV
  cache, batched over the sequences.

The verification rules (`accept_greedy`, `accept_rejection`) keep the target's output exact: at
temperature 0 the same tokens as plain decoding, above it the same distribution (Leviathan et al.
2023; Chen et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llmx.engine.kv_cache import KVCache, SequenceHandle
from llmx.errors import UsageError

if TYPE_CHECKING:
    from llmx.engine.model import Model

METHODS = ("ngram", "draft")
MAX_K = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "ngram" (prompt lookup) or "draft" (a draft model)
    k: int = 4  # tokens proposed per step, at most
    max_n: int = 6  # ngram: the longest suffix matched
    min_n: int = 4  # ngram: the shortest
    draft: Model | None = None  # the draft model

    @classmethod
    def parse(cls, spec: SpeculativeConfig | dict[str, Any] | None) -> SpeculativeConfig | None:
        """From the engine's `speculative={"method": "ngram", "k": 4}` or
        `{"method": "draft", "model": model, "k": 4}`; a bad one is a UsageError."""
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        spec = dict(spec)
        method = spec.pop("method", None)
        if method not in METHODS:
            raise UsageError(f"speculative method {method!r} is unknown; use one of {', '.join(METHODS)}")
        draft = spec.pop("model", None)
        unknown = set(spec) - {"k", "max_n", "min_n"}
        if unknown:
            raise UsageError(f"unknown speculative settings: {', '.join(sorted(unknown))}")
        config = cls(method, draft=draft, **spec)
        config.check()
        return config

    def check(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise UsageError(f"speculative k must be 1 to {MAX_K}, not {self.k}")
        if not 1 <= self.min_n <= self.max_n:
            raise UsageError("speculative n-gram sizes need 1 <= min_n <= max_n")
        if self.method == "draft" and self.draft is None:
            raise UsageError("speculative method 'draft' needs a draft model ('model')")


def check_same_vocabulary(target: Model, draft: Model) -> None:
    """A draft must propose the target's token ids: the same vocabulary, token for token."""
    a, b = target.tokenizer.vocab, draft.tokenizer.vocab
    if a.n_vocab != b.n_vocab or a.tokens != b.tokens:
        raise UsageError(f"the draft model's vocabulary ({b.n_vocab} tokens, {draft.path.name}) is not the "
                         f"target's ({a.n_vocab} tokens, {target.path.name}); a draft needs the same tokenizer")


# -- prompt lookup -----------------------------------------------------------------------------


def ngram_lookup(tokens: Sequence[int], k: int, max_n: int = 6, min_n: int = 4) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (the
    longest n from max_n down to min_n that occurs earlier); [] when none does."""
    ids = np.asarray(tokens, dtype=np.int64)
    last = len(ids) - 1
    ends = np.flatnonzero(ids[:-1] == ids[last])  # earlier positions holding the last token: where a match can end
    for n in range(min(max_n, last), min_n - 1, -1):
        matched = ends[ends >= n - 1]
        for back in range(1, n):  # the tokens before it must match too
            matched = matched[ids[matched - back] == ids[last - back]]
        if len(matched):
            follow = matched[-1] + 1
            return ids[follow:follow + k].tolist()
    return []


@dataclass
class Pacing:
    """How much to propose for one request, from how its proposals fared (a verify step of k + 1
    rows costs more than a plain one, so failing proposals must cost little):

    - the size: 3 (at most `limit`) at first; +2 after a proposal accepted whole, -1 after one
      accepted in part (Hugging Face's assisted-generation heuristic, from a small start: a first
      proposal in text with nothing to copy usually fails, and a small one fails cheaply);
    - pauses: after a proposal accepted not at all, skip 1, 2, 4 ... (at most `longest`) steps;
      any accepted token ends them. While paused, a cheap proposer still proposes in the shadow
      (`shadow`): when the model then writes the shadow's first token, the text may have turned
      predictable again (a copy resumed), and the pause is halved."""

    limit: int
    size: int = 0
    longest: int = 16
    skip: int = 0
    wait: int = 0
    shadow: int | None = None  # the first token a paused proposal would have offered

    def __post_init__(self) -> None:
        self.size = self.size or min(self.limit, 3)

    def ready(self) -> bool:
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def record(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        if accepted == proposed:
            self.size = min(self.limit, self.size + 2)
        else:
            self.size = max(1, self.size - 1)
        if accepted:
            self.skip = 0
        else:
            self.skip = min(self.longest, max(1, 2 * self.skip))
            self.wait = self.skip

    def check_shadow(self, token: int) -> None:
        if self.shadow is not None and self.shadow == token:
            self.skip //= 2
            self.wait = min(self.wait, self.skip)
        self.shadow = None


class NgramProposer:
    cheap = True  # proposals cost nothing: shadow ones while backing off

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, items: Sequence[tuple[int, list[int], int, Callable]]) -> dict[int, tuple[list[int], list]]:
        """(seq_id, token ids, k, draft sampler) -> seq_id -> (proposed tokens, [])."""
        c = self.config
        return {seq_id: (ngram_lookup(tokens, k, c.max_n, c.min_n), []) for seq_id, tokens, k, _ in items}

    def rollback(self, seq_id: int, tokens: Sequence[int]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass


# -- a draft model -----------------------------------------------------------------------------


@dataclass
class _DraftState:
    handle: SequenceHandle
    tokens: list[int] = field(default_factory=list)  # what the draft's cache holds, position by position


class DraftProposer:
    """A draft model decoding ahead of each sequence in its own paged KV cache."""

    cheap = False

    def __init__(self, draft: Model, kv_cache_tokens: int):
        self.model = draft
        self.cache = KVCache(draft.config, kv_cache_tokens)
        self._states: dict[int, _DraftState] = {}

    def propose(self, items: Sequence[tuple[int, list[int], int, Callable]]) -> dict[int, tuple[list[int], list]]:
        """(seq_id, token ids, k, sampler) -> seq_id -> (proposed tokens, the distribution each was
        drawn from). `sampler(logits, history)` returns (token, distribution)."""
        items = self._fitting(items)
        if not items:
            return {}
        out: dict[int, tuple[list[int], list]] = {seq_id: ([], []) for seq_id, *_ in items}
        # the first forward catches the draft up on what it has not seen (a prompt, the accepted tokens)
        batch = [tokens[len(self._states[seq_id].tokens):] for seq_id, tokens, _, _ in items]
        while items:
            rows = self._forward([(item[0], new) for item, new in zip(items, batch, strict=True)])
            for (seq_id, tokens, _, sampler), logits in zip(items, rows, strict=True):
                proposed, dists = out[seq_id]
                token, dist = sampler(logits, tokens + proposed)
                proposed.append(token)
                dists.append(dist)
            items = [item for item in items if len(out[item[0]][0]) < item[2]]
            batch = [[out[item[0]][0][-1]] for item in items]
        return out

    def _fitting(self, items):
        """The items whose catch-up and k proposals fit in the draft's free blocks (others propose
        nothing this step), each given a cache state."""
        pool, free, kept = self.cache.pool, self.cache.pool.num_free, []
        for item in items:
            seq_id, tokens, k, _ = item
            state = self._states.get(seq_id) or _DraftState(self.cache.new_sequence())
            needed = pool.blocks_for(len(tokens) + k) - len(state.handle.blocks)
            if needed > free:
                continue
            free -= max(0, needed)
            self._states[seq_id] = state
            kept.append(item)
        return kept

    def _forward(self, batch: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """One draft forward over the batch (seq_id, new tokens): the last row's logits of each."""
        pairs = [(self._states[seq_id].handle, np.asarray(tokens, np.int64)) for seq_id, tokens in batch]
        logits = self.model.transformer.forward_batch(pairs, self.cache, "last")
        for seq_id, tokens in batch:
            self._states[seq_id].tokens.extend(tokens)
        return [rows[-1] for rows in logits]

    def rollback(self, seq_id: int, tokens: Sequence[int]) -> None:
        """After verification: keep the draft's cache only as far as it agrees with `tokens`."""
        state = self._states.get(seq_id)
        if state is None:
            return
        held = state.tokens
        same = 0
        limit = min(len(held), len(tokens))
        while same < limit and held[same] == tokens[same]:
            same += 1
        del held[same:]
        state.handle.length = same

    def release(self, seq_id: int) -> None:
        state = self._states.pop(seq_id, None)
        if state is not None:
            self.cache.release(state.handle)


def make_proposer(config: SpeculativeConfig, kv_cache_tokens: int) -> NgramProposer | DraftProposer:
    if config.method == "ngram":
        return NgramProposer(config)
    return DraftProposer(config.draft, kv_cache_tokens)


# -- verification --------------------------------------------------------------------------------


def accept_greedy(n_rows: int, draft: Sequence[int], sample_row: Callable[[int, list[int]], int]) -> list[int]:
    """Sample each row from the target (`sample_row(i, tokens so far)`) and keep going while it
    picks the proposed token: exact for greedy decoding and for deterministic proposals (a
    proposal is accepted exactly when the target would have drawn it)."""
    out: list[int] = []
    for i in range(n_rows):
        token = sample_row(i, out)
        out.append(token)
        if i >= len(draft) or token != draft[i]:
            break
    return out


def accept_rejection(target: Sequence[np.ndarray] | Callable[[int, list[int]], np.ndarray],
                     draft: Sequence[int], draft_dists: Sequence[np.ndarray], rng: np.random.Generator) -> list[int]:
    """Speculative sampling: accept proposal x drawn from q with probability min(1, p(x) / q(x));
    at the first rejection draw from the residual max(0, p - q) (normalized) and stop; if all
    are accepted, draw one more from the last row's p. `target(i, tokens so far)` gives p of row i
    (dense, float64 [n_vocab]); the tokens then come from p exactly."""
    p_of = target if callable(target) else (lambda i, _: target[i])
    out: list[int] = []
    for i, (x, q) in enumerate(zip(draft, draft_dists, strict=True)):
        p = p_of(i, out)
        if q[x] > 0 and rng.random() * q[x] < p[x]:
            out.append(int(x))
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        dist = residual / total if total > 0 else p
        out.append(int(rng.choice(len(dist), p=dist)))
        return out
    p = p_of(len(draft), out)
    out.append(int(rng.choice(len(p), p=p)))
    return out
