"""KL divergence of a model against saved base log-probabilities, as llama-perplexity's
`--kl-divergence-base FILE` (save) and `--kl-divergence` (compare) do.

The base file holds, per chunk, its token ids and the log-softmax of every scored position
(llama-perplexity's chunks: second half of each) as float16:
    b"LLMXKLD1", uint32 ctx, uint32 n_vocab, uint32 n_chunks, padding to 64 bytes,
    then n_chunks x (int32 ids [ctx], float16 log_probs [n_scored, n_vocab]).
The compared model's log-probabilities go through the same float16 rounding, and both sides
are renormalised, so a model compared against itself gives exactly 0.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmx.engine.model import Model
from llmx.engine.perplexity import chunk_log_probs, log_softmax
from llmx.errors import LlmxError, UsageError
from llmx.formats.atomic import partial_path

MAGIC = b"LLMXKLD1"
HEADER = struct.Struct("<8sIII")
HEADER_BYTES = 64


def n_scored(ctx: int) -> int:
    return ctx - 1 - ctx // 2


class BaseWriter:
    """Writes a base file to a hidden partial file, renamed onto `path` only when every chunk is in."""

    def __init__(self, path: Path, ctx: int, n_vocab: int):
        self.path, self.ctx, self.n_vocab = Path(path), ctx, n_vocab
        self.partial = partial_path(self.path)
        self.n_chunks = 0
        try:
            self.file = open(self.partial, "wb")  # noqa: SIM115 - closed in finish/abort
        except OSError as e:
            raise UsageError(f"cannot write {self.path}: {e.strerror}") from None
        self.file.write(bytes(HEADER_BYTES))

    def add(self, ids: list[int], log_probs: np.ndarray) -> None:
        self.file.write(np.asarray(ids, np.int32).tobytes())
        self.file.write(log_probs.astype(np.float16).tobytes())
        self.n_chunks += 1

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(HEADER.pack(MAGIC, self.ctx, self.n_vocab, self.n_chunks))
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


class Base:
    """A base file, memory-mapped."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        if len(head) < HEADER.size or head[:8] != MAGIC:
            raise LlmxError(f"{path} is not an llmx KL-divergence base file (write one with --kl-divergence-base)")
        _, self.ctx, self.n_vocab, self.n_chunks = HEADER.unpack(head)
        record = 4 * self.ctx + 2 * n_scored(self.ctx) * self.n_vocab
        if os.path.getsize(path) != HEADER_BYTES + self.n_chunks * record or self.n_chunks == 0:
            raise LlmxError(f"{path} is truncated or damaged")
        self.data = np.memmap(path, np.uint8, mode="r", offset=HEADER_BYTES, shape=(self.n_chunks, record))

    def chunks(self) -> Iterator[tuple[list[int], np.ndarray]]:
        ids_bytes = 4 * self.ctx
        for c in range(self.n_chunks):
            ids = self.data[c, :ids_bytes].view(np.int32).tolist()
            yield ids, self.data[c, ids_bytes:].view(np.float16).reshape(n_scored(self.ctx), self.n_vocab)


@dataclass
class TokenStats:
    """Per scored token: the two NLLs, KLD(base || model), same top-1, and the target's probabilities."""

    nll_q: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray
    p_q: np.ndarray
    p_base: np.ndarray


def compare_chunk(model: Model, ids: list[int], base_log_probs: np.ndarray) -> TokenStats:
    ours, targets = chunk_log_probs(model, ids)
    lp_q = log_softmax(ours.astype(np.float16))  # renormalised after the base file's rounding
    lp_b = log_softmax(base_log_probs)
    rows = np.arange(len(targets))
    p_b = np.exp(lp_b)
    return TokenStats(
        nll_q=-lp_q[rows, targets], nll_base=-lp_b[rows, targets],
        kld=np.maximum((p_b * (lp_b - lp_q)).sum(axis=1), 0.0),  # >= 0 up to rounding
        same_top=lp_q.argmax(axis=1) == lp_b.argmax(axis=1),
        p_q=np.exp(lp_q[rows, targets]), p_base=p_b[rows, targets])


def compare(model: Model, base: Base, max_chunks: int | None = None,
            on_chunk: Callable[[int, TokenStats], None] = lambda i, s: None) -> TokenStats:
    if base.n_vocab != model.config.n_vocab:
        raise UsageError(f"the base file has a vocabulary of {base.n_vocab} tokens, the model {model.config.n_vocab}")
    parts = []
    for index, (ids, log_probs) in enumerate(base.chunks()):
        if max_chunks is not None and index >= max_chunks:
            break
        parts.append(compare_chunk(model, ids, log_probs))
        on_chunk(index, parts[-1])
    return TokenStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in TokenStats.__dataclass_fields__))


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std() / np.sqrt(len(x) - 1)) if len(x) > 1 else 0.0


def report(stats: TokenStats) -> str:
    """llama-perplexity's summary blocks."""
    n = len(stats.kld)
    mean_q, err_q = _mean_err(stats.nll_q)
    mean_b, err_b = _mean_err(stats.nll_base)
    ln_ratio, ln_err = _mean_err(stats.nll_q - stats.nll_base)
    kld, kld_err = _mean_err(stats.kld)
    same = float(stats.same_top.mean())
    same_err = float(np.sqrt(same * (1 - same) / (n - 1))) if n > 1 else 0.0
    dp, dp_err = _mean_err(stats.p_q - stats.p_base)
    ppl_q, ppl_b = np.exp(mean_q), np.exp(mean_b)
    pct = np.percentile(stats.kld, [99.9, 99.0, 50.0, 1.0])
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {ppl_q:10.6f} ± {ppl_q * err_q:10.6f}",
        f"Mean PPL(base)                : {ppl_b:10.6f} ± {ppl_b * err_b:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * np.corrcoef(stats.nll_q, stats.nll_base)[0, 1]:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {ln_ratio:10.6f} ± {ln_err:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {np.exp(ln_ratio):10.6f} ± {np.exp(ln_ratio) * ln_err:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {kld:10.6f} ± {kld_err:10.6f}",
        f"Maximum KLD: {stats.kld.max():10.6f}",
        f"99.9%   KLD: {pct[0]:10.6f}",
        f"99.0%   KLD: {pct[1]:10.6f}",
        f"Median  KLD: {pct[2]:10.6f}",
        f" 1.0%   KLD: {pct[3]:10.6f}",
        f"Minimum KLD: {stats.kld.min():10.6f}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {100 * dp:7.3f} ± {100 * dp_err:5.3f} %",
        f"RMS Δp    : {100 * np.sqrt(np.mean((stats.p_q - stats.p_base) ** 2)):7.3f} %",
        f"Same top p: {100 * same:7.3f} ± {100 * same_err:5.3f} %",
    ]
    return "\n".join(lines)


def reference_kl(model, path: Path, cache_type: str = "f16") -> tuple[float, float]:
    """Mean KL(llama.cpp || model) over the positions of `path` (`gemma_kld_gpl3.npz` in
    ../shared/reference: llama.cpp's top 64 log-probabilities per position, the BOS position left
    out), its top 64 tokens plus one bucket for the rest, as that folder's README defines it; and
    top-1 agreement. For the tests and for `scripts/gpu_check.sh`."""
    from llmx.engine.kv_cache import KVCache

    ref = np.load(path)
    log_q = []
    for chunk in ref["chunks"]:
        cache = KVCache(model.config, len(chunk), cache_type_k=cache_type, cache_type_v=cache_type)
        logits = model.transformer.forward(np.asarray(chunk, np.int64), cache.new_sequence(), cache, "all")
        z = logits[1:].astype(np.float64)  # the BOS position left out
        z -= z.max(axis=1, keepdims=True)
        log_q.append(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))
    q = np.concatenate(log_q)
    ids, log_p = ref["ids"], ref["logp"].astype(np.float64)
    p, q_top = np.exp(log_p), np.take_along_axis(q, ids, axis=1)
    p_rest = np.clip(1 - p.sum(axis=1), 1e-12, None)
    q_rest = np.clip(1 - np.exp(q_top).sum(axis=1), 1e-12, None)
    kl = (p * (log_p - q_top)).sum(axis=1) + p_rest * (np.log(p_rest) - np.log(q_rest))
    return float(kl.mean()), float((q.argmax(axis=1) == ids[:, 0]).mean())
