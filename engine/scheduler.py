"""The continuous-batching scheduler: plain data in, plain data out (vLLM v1's shape).

Each sequence knows its token ids and how many of them are computed; there are no prefill and
decode phases. `schedule()` picks, under a token budget and a sequence cap, how many tokens each
sequence computes this step (running sequences first, then waiting ones, FIFO), and gives each
the KV blocks it needs; `update(output, sampled)` counts them computed, appends the sampled tokens
and finishes sequences. Speculative decoding adds a sequence's proposed tokens (`draft`) after its
known ones: they are computed like any other, their logits verify them, and `update` keeps what
the verification accepted. When the pool runs out of blocks, the most recently admitted sequence is
preempted: its blocks go back and it waits at the head of the queue to recompute.

Imports neither numba nor the model: tests drive it with a fake runner.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from llmx.engine.block_pool import BlockKey, BlockPool
from llmx.errors import LlmxError


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it."""

    seq_id: int
    token_ids: list[int]  # prompt, then generated tokens
    max_tokens: int
    max_len: int  # the context: positions this sequence may hold
    eos_ids: frozenset[int] = frozenset()
    # Called with each generated token (not end-of-generation ones); True ends the sequence (a stop string).
    on_token: Callable[[int], bool] | None = None
    n_prompt: int = field(init=False)
    n_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    block_keys: list[BlockKey] = field(default_factory=list)  # prefix-cache keys of its full blocks
    status: Status = Status.WAITING
    finish_reason: str | None = None
    draft: list[int] = field(default_factory=list)  # proposed tokens after the known ones (speculation)

    def __post_init__(self) -> None:
        self.n_prompt = len(self.token_ids)

    @property
    def n_generated(self) -> int:
        return len(self.token_ids) - self.n_prompt

    @property
    def n_uncomputed(self) -> int:
        """Tokens to compute: the known ones not computed yet, then the draft's."""
        return len(self.token_ids) + len(self.draft) - self.n_computed


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute `tokens` of sequence `seq_id` at positions start.. into its blocks `block_table`."""

    seq_id: int
    tokens: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    n_prompt: int  # its sequence's prompt length (positions from here on are generated tokens)
    wants_logits: bool  # the chunk reaches the last known token: sample the next one from it
    n_draft: int = 0  # its last n_draft tokens are proposals: logits of the last n_draft + 1 rows verify them

    @property
    def n_logit_rows(self) -> int:
        return self.n_draft + 1 if self.wants_logits else 0


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[int, ...] = ()
    finished: tuple[Sequence, ...] = ()  # ended while scheduling (the pool cannot hold them)

    @property
    def n_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


@dataclass
class SchedulerStats:
    prefix_hit_tokens: int = 0
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    # speculative decoding: verify steps (chunks with proposals), tokens proposed, proposals accepted
    spec_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class Scheduler:
    def __init__(self, pool: BlockPool, max_seqs: int = 16, max_batched_tokens: int = 512):
        if max_seqs < 1 or max_batched_tokens < 1:
            raise LlmxError("max_seqs and max_batched_tokens must be at least 1")
        self.pool = pool
        self.max_seqs = max_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.stats = SchedulerStats()

    # -- requests in and out ---------------------------------------------------------------

    def check_fits(self, n_prompt: int) -> None:
        """Refuse a prompt the whole pool cannot hold (with the next token's position)."""
        if self.pool.blocks_for(n_prompt + 1) > self.pool.n_blocks:
            raise LlmxError(f"the prompt is {n_prompt} tokens but the KV cache holds "
                            f"{self.pool.n_blocks * self.pool.block_size}; shorten it or raise the KV cache size")

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; one whose prompt the whole pool cannot hold is refused."""
        self.check_fits(len(seq.token_ids))
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (a cancel, a stop string), wherever it is, and free its blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[int] = []
        finished: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue  # preempted for an earlier sequence this step
            n = self._make_room(seq, min(seq.n_uncomputed, budget), preempted, finished)
            if n:
                chunks.append(self._chunk(seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_seqs and budget > 0 and not preempted:
            n = self._admit(self.waiting[0], budget)
            if not n:
                break
            chunks.append(self._chunk(self.running[-1], n))
            budget -= n
        self.stats.steps += 1
        return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(finished))

    def update(self, output: SchedulerOutput, sampled: Mapping[int, Sequence[int]]) -> list[Sequence]:
        """Count the chunks computed and append the sampled tokens (seq_id -> tokens, for the chunks
        that wanted logits: the draft's accepted prefix, then one token sampled after it); returns
        the sequences that finished."""
        by_id = {seq.seq_id: seq for seq in self.running}
        finished = list(output.finished)
        for chunk in output.chunks:
            seq = by_id.get(chunk.seq_id)
            if seq is None:
                continue  # finished meanwhile (cancelled)
            tokens = sampled[chunk.seq_id] if chunk.wants_logits else ()
            reason = self._take(seq, chunk, tokens)
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _take(self, seq: Sequence, chunk: ScheduledChunk, tokens: Sequence[int]) -> str | None:
        """Append a chunk's sampled tokens and count what it computed: its known tokens and the
        accepted drafts (a rejected draft's KV is overwritten later). The finish reason, if any."""
        accepted = max(0, len(tokens) - 1)
        proposed = list(chunk.tokens[len(chunk.tokens) - chunk.n_draft:])
        assert list(tokens[:accepted]) == proposed[:accepted], "accepted tokens that were not proposed"
        seq.draft = []
        if chunk.n_draft:
            self.stats.spec_steps += 1
            self.stats.draft_tokens += chunk.n_draft
            self.stats.accepted_tokens += accepted
        reason = None
        for token in tokens:
            reason = self._append(seq, token)
            if reason:
                break
        # (an accepted end-of-generation token is not appended: count only positions of known tokens)
        computed = min(seq.n_computed + len(chunk.tokens) - chunk.n_draft + accepted, len(seq.token_ids))
        self._count_computed(seq, computed - seq.n_computed)
        return reason

    # -- helpers -------------------------------------------------------------------------------

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start, n_known = seq.n_computed, len(seq.token_ids)
        tokens = seq.token_ids[start:start + n] + seq.draft[:max(0, start + n - n_known)]
        n_draft = max(0, start + n - n_known)
        return ScheduledChunk(seq.seq_id, tuple(tokens), start, tuple(seq.blocks), seq.n_prompt,
                              start + n >= n_known, n_draft)

    def _fits(self, seq: Sequence, n: int) -> int:
        """How many of n more tokens fit in seq's blocks plus the free ones."""
        room = (len(seq.blocks) + self.pool.num_free) * self.pool.block_size - seq.n_computed
        return max(0, min(n, room))

    def _grow(self, seq: Sequence, n: int) -> None:
        needed = self.pool.blocks_for(seq.n_computed + n) - len(seq.blocks)
        if needed > 0:
            seq.blocks.extend(self.pool.allocate(needed))

    def _make_room(self, seq: Sequence, n: int, preempted: list[int], finished: list[Sequence]) -> int:
        """Blocks for n tokens of a running sequence, preempting the latest admitted ones while
        none fit; returns how many tokens it computes this step (0: it was preempted or ended).
        Proposals never cost another sequence its place: they go first when the pool is short."""
        if seq.draft and self._fits(seq, n) < n:
            seq.draft = []
            n = min(n, seq.n_uncomputed)
        while not self._fits(seq, n):
            if len(self.running) == 1:  # alone and still too long for the pool: the context is full
                self.finish(seq, "length")
                finished.append(seq)
                return 0
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return 0
        n = self._fits(seq, n)
        self._grow(seq, n)
        return n

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Move the queue's head to running with blocks for its first chunk (its cached prefix
        taken first); 0 and no change when its first chunk does not fit."""
        if not seq.blocks:
            # the last known token is always computed: its logits give the next token
            seq.blocks, seq.block_keys = self.pool.cached_prefix(seq.token_ids[:-1], seq.n_prompt)
            seq.n_computed = len(seq.blocks) * self.pool.block_size
        n = self._fits(seq, min(seq.n_uncomputed, budget))
        if not n:
            self._free(seq)
            return 0
        self.stats.prefix_hit_tokens += seq.n_computed
        self._grow(seq, n)
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.block_keys, seq.n_computed, seq.draft = [], [], 0, []

    def _count_computed(self, seq: Sequence, n: int) -> None:
        self.stats.prompt_tokens_computed += max(0, min(seq.n_computed + n, seq.n_prompt) - seq.n_computed)
        seq.n_computed += n
        self.pool.cache_full_blocks(seq.blocks, seq.token_ids, seq.n_prompt, seq.n_computed, seq.block_keys)

    def _append(self, seq: Sequence, token: int) -> str | None:
        """Append a sampled token; the finish reason when the sequence ends with it."""
        if token in seq.eos_ids:
            return "stop"
        seq.token_ids.append(token)
        self.stats.generated_tokens += 1
        if seq.on_token is not None and seq.on_token(token):
            return "stop"
        if seq.n_generated >= seq.max_tokens or len(seq.token_ids) >= seq.max_len:
            return "length"
        return None

    # -- invariants (tests assert them every step) ----------------------------------------

    def check(self, output: SchedulerOutput) -> None:
        assert output.n_tokens <= self.max_batched_tokens, "token budget exceeded"
        assert len(output.chunks) <= self.max_seqs and len(self.running) <= self.max_seqs
        assert len({c.seq_id for c in output.chunks}) == len(output.chunks), "a sequence scheduled twice"
        by_id = {seq.seq_id: seq for seq in self.running}
        for chunk in output.chunks:
            seq = by_id[chunk.seq_id]
            assert chunk.start == seq.n_computed and tuple(seq.blocks) == chunk.block_table
            assert len(chunk.block_table) * self.pool.block_size >= chunk.start + len(chunk.tokens)
        assert all(not seq.blocks and seq.n_computed == 0 for seq in self.waiting)
        self.pool.check([seq.blocks for seq in self.running])
