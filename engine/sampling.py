"""Sampling as a chain of small pure functions, built by `make_sampler(params)` (mlx-lm's shape).

Semantics and defaults follow llama.cpp's common sampler: penalties over the last
`repeat_last_n` tokens, then top-k, top-p, min-p, temperature, and a draw from what is left.
Temperature 0 (or below) is greedy. Per-request state (the token history and the random
generator) lives with the request, not in the sampler.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Candidates: (token ids int64 [n], logits float64 [n]) still in the running.
Candidates = tuple[np.ndarray, np.ndarray]
Step = Callable[[Candidates], Candidates]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


def apply_penalties(logits: np.ndarray, history: Sequence[int], params: SamplingParams) -> np.ndarray:
    """llama.cpp's penalties: repeated tokens' logits divided (if positive) or multiplied by
    `repeat_penalty`, minus `frequency_penalty` per repeat and `presence_penalty` once."""
    recent = history[-params.repeat_last_n:] if params.repeat_last_n > 0 else []
    if not recent or (params.repeat_penalty == 1.0 and not params.presence_penalty
                      and not params.frequency_penalty):
        return logits
    out = logits.copy()
    for token, count in Counter(recent).items():
        value = out[token]
        value = value / params.repeat_penalty if value > 0 else value * params.repeat_penalty
        out[token] = value - count * params.frequency_penalty - params.presence_penalty
    return out


def top_k(k: int) -> Step:
    def step(c: Candidates) -> Candidates:
        ids, logits = c
        if k <= 0 or k >= len(ids):
            return c
        keep = np.argpartition(-logits, k - 1)[:k]
        return ids[keep], logits[keep]
    return step


def _sorted_probs(c: Candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, logits = c
    order = np.argsort(-logits, kind="stable")
    ids, logits = ids[order], logits[order]
    probs = np.exp(logits - logits[0])
    return ids, logits, probs / probs.sum()


def top_p(p: float) -> Step:
    def step(c: Candidates) -> Candidates:
        if p >= 1.0:
            return c
        ids, logits, probs = _sorted_probs(c)
        keep = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix reaching p
        return ids[:keep], logits[:keep]
    return step


def min_p(p: float) -> Step:
    def step(c: Candidates) -> Candidates:
        if p <= 0.0:
            return c
        ids, logits = c
        keep = logits >= logits.max() + np.log(p)  # prob >= p * max prob
        return ids[keep], logits[keep]
    return step


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature <= 0


def make_distribution(params: SamplingParams) -> Callable[[np.ndarray, Sequence[int]], Candidates]:
    """A function (logits [n_vocab], history) -> (token ids, probabilities): what the sampler
    draws from, after penalties, top-k, top-p, min-p and temperature (one id when greedy)."""
    chain = [top_k(params.top_k), top_p(params.top_p), min_p(params.min_p)]

    def distribution(logits: np.ndarray, history: Sequence[int]) -> Candidates:
        logits = apply_penalties(np.asarray(logits, np.float64), history, params)
        if is_greedy(params):
            return np.array([int(np.argmax(logits))]), np.ones(1)
        candidates: Candidates = (np.arange(len(logits)), logits)
        for step in chain:
            candidates = step(candidates)
        ids, kept = candidates
        probs = np.exp((kept - kept.max()) / params.temperature)
        return ids, probs / probs.sum()

    return distribution


def make_sampler(params: SamplingParams) -> Callable[[np.ndarray, Sequence[int], np.random.Generator], int]:
    """A function (logits [n_vocab], history, rng) -> token id."""
    penalized = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
    if is_greedy(params) and not penalized:
        # greedy on the float32 row itself: the same argmax as on its float64 copy, without the copy
        return lambda logits, history, rng: int(np.argmax(logits))
    distribution = make_distribution(params)

    def sample(logits: np.ndarray, history: Sequence[int], rng: np.random.Generator) -> int:
        ids, probs = distribution(logits, history)
        return int(ids[0]) if is_greedy(params) else int(ids[rng.choice(len(ids), p=probs)])

    return sample


def dense(candidates: Candidates, n_vocab: int) -> np.ndarray:
    """float64 [n_vocab]: a distribution over the whole vocabulary."""
    ids, probs = candidates
    out = np.zeros(n_vocab)
    out[ids] = probs
    return out


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def _log_norm(logits: np.ndarray) -> float:
    return float(logits.max() + np.log(np.exp(logits - logits.max()).sum()))


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens with their log-probabilities under the raw logits."""
    logits = np.asarray(logits, np.float64)
    log_norm = _log_norm(logits)
    best = np.argpartition(-logits, n - 1)[:n]
    best = best[np.argsort(-logits[best], kind="stable")]
    return [(int(i), float(logits[i] - log_norm)) for i in best]


def logprob_of(logits: np.ndarray, token: int) -> float:
    logits = np.asarray(logits, np.float64)
    return float(logits[token] - _log_norm(logits))


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is never
    emitted, even when it arrives split over several tokens."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is safe to emit now; sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = max((_overlap(self._pending, s) for s in self.stops), default=0)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
