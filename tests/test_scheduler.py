"""The scheduler and block pool with a fake runner: no Numba, no model.

The fake runner keeps a fake KV cache: it writes each computed token into its (block, slot) cell
and derives the next token from what it reads back through the block table. So a block handed to
two sequences, a prefix hit on the wrong block or a preempted sequence resumed wrongly changes
the tokens, and the tests see it.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmx.engine.block_pool import BlockPool, block_key, prompt_rows_in
from llmx.engine.scheduler import Scheduler, SchedulerOutput, Sequence
from llmx.errors import LlmxError

VOCAB = 50
EOS = 0


class FakeRunner:
    def __init__(self, pool: BlockPool):
        self.cells: dict[tuple[int, int], int] = {}
        self.block_size = pool.block_size

    def run(self, output: SchedulerOutput) -> dict[int, list[int]]:
        """seq_id -> the tokens a verification keeps: proposals while they match the 'model',
        then its own next token."""
        sampled = {}
        for chunk in output.chunks:
            for i, token in enumerate(chunk.tokens):
                pos = chunk.start + i
                self.cells[chunk.block_table[pos // self.block_size], pos % self.block_size] = token
            if chunk.wants_logits:
                end = chunk.start + len(chunk.tokens)
                history = [self.cells[chunk.block_table[p // self.block_size], p % self.block_size] for p in range(end)]
                draft = history[end - chunk.n_draft:]
                kept = []
                for row in range(end - chunk.n_draft - 1, end):
                    kept.append(next_token(history[:row + 1]))
                    if row == end - 1 or kept[-1] != draft[len(kept) - 1]:
                        break
                sampled[chunk.seq_id] = kept
        return sampled


def next_token(history: list[int]) -> int:
    """A deterministic 'model': the next token from the whole history (EOS now and then)."""
    h = 17
    for t in history:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    out, history = [], list(prompt)
    while len(out) < max_tokens:
        token = next_token(history)
        if token == EOS:
            break
        out.append(token)
        history.append(token)
    return out


def drive(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000,
          propose: random.Random | None = None) -> list[SchedulerOutput]:
    """Run the scheduler to the end; `propose`: speculative proposals after each step, from this rng."""
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_work:
            return outputs
        output = scheduler.schedule()
        scheduler.check(output)
        scheduler.update(output, runner.run(output))
        if propose is not None:
            for seq in scheduler.running:
                if seq.n_uncomputed == 1:
                    seq.draft = proposal(seq.token_ids, propose)
        scheduler.pool.check([s.blocks for s in scheduler.running])
        outputs.append(output)
    raise AssertionError("the scheduler did not finish")


def proposal(history: list[int], rng: random.Random) -> list[int]:
    """Up to 5 proposed tokens: the 'model's own for a while, then maybe wrong ones."""
    out, right = [], rng.randrange(0, 6)
    for i in range(rng.randrange(0, 6)):
        out.append(next_token(history + out) if i < right else rng.randrange(0, VOCAB))
    return out


def make_seq(seq_id: int, prompt: list[int], max_tokens: int, max_len: int = 10_000) -> Sequence:
    return Sequence(seq_id, list(prompt), max_tokens, max_len, frozenset({EOS}))


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_seqs=st.integers(1, 12), n_blocks=st.integers(8, 40),
       block_size=st.sampled_from([1, 2, 4, 16]), max_seqs=st.integers(1, 6), budget=st.integers(1, 40),
       caching=st.booleans(), speculate=st.booleans())
def test_random_workloads_keep_invariants_and_give_each_sequence_its_own_tokens(
        seed, n_seqs, n_blocks, block_size, max_seqs, budget, caching, speculate):
    """With `speculate`, proposals (right and wrong) ride along: the tokens must not change."""
    rng = random.Random(seed)
    pool = BlockPool(n_blocks, block_size, caching)
    scheduler = Scheduler(pool, max_seqs, budget)
    shared = random_prompt(rng, rng.randrange(0, 3 * block_size + 1))  # a common prefix for some
    seqs = []
    capacity = n_blocks * block_size
    for i in range(n_seqs):
        prompt = (shared if rng.random() < 0.5 else []) + random_prompt(rng, rng.randrange(1, 2 * block_size + 3))
        prompt = prompt[: capacity - 1]
        seqs.append(make_seq(i, prompt, rng.randrange(1, 12), max_len=capacity))
        scheduler.add(seqs[-1])
    outputs = drive(scheduler, FakeRunner(pool), propose=random.Random(seed + 1) if speculate else None)
    assert all(o.n_tokens <= budget and len(o.chunks) <= max_seqs for o in outputs)
    for seq in seqs:
        expected = expected_tokens(seq.token_ids[: seq.n_prompt], seq.max_tokens)
        got = seq.token_ids[seq.n_prompt:]
        if seq.finish_reason == "length" and len(got) < seq.max_tokens:  # the whole pool could not hold it
            assert len(seq.token_ids) >= capacity - block_size
            assert got == expected[: len(got)]
        else:
            assert got == expected, seq.seq_id
    assert pool.num_used == pool.num_cached and all(r == 0 for r in pool.refs)


def test_running_sequences_come_first_then_waiting_ones_in_arrival_order():
    pool = BlockPool(64, 4)
    scheduler = Scheduler(pool, max_seqs=8, max_batched_tokens=10)
    for i, n in enumerate([6, 6, 6]):
        scheduler.add(make_seq(i, [i + 1] * n, 5))
    first = scheduler.schedule()
    assert [(c.seq_id, len(c.tokens)) for c in first.chunks] == [(0, 6), (1, 4)]  # a chunked prefill
    scheduler.update(first, {0: [3]})
    second = scheduler.schedule()
    assert [(c.seq_id, len(c.tokens)) for c in second.chunks] == [(0, 1), (1, 2), (2, 6)]
    assert second.chunks[0].wants_logits and second.chunks[1].wants_logits


def test_the_sequence_cap_holds_back_the_queue():
    scheduler = Scheduler(BlockPool(64, 4), max_seqs=2, max_batched_tokens=100)
    for i in range(4):
        scheduler.add(make_seq(i, [5, 6], 3))
    assert [c.seq_id for c in scheduler.schedule().chunks] == [0, 1]


def test_preemption_takes_the_latest_admitted_and_requeues_it_first():
    pool = BlockPool(4, 2)  # 8 tokens in all
    scheduler = Scheduler(pool, max_seqs=4, max_batched_tokens=100)
    a, b = make_seq(0, [1, 2, 3], 20), make_seq(1, [4, 5, 6], 20)
    scheduler.add(a)
    scheduler.add(b)
    runner = FakeRunner(pool)
    while scheduler.stats.preemptions == 0:
        output = scheduler.schedule()
        scheduler.check(output)
        scheduler.update(output, runner.run(output))
    assert scheduler.waiting[0] is b and b.blocks == [] and b.n_computed == 0
    drive(scheduler, runner)
    assert a.token_ids[3:] == expected_tokens([1, 2, 3], 20)[: a.n_generated]
    assert b.token_ids[3:] == expected_tokens([4, 5, 6], 20)[: b.n_generated]


def test_a_cached_prefix_is_taken_and_only_the_rest_computed():
    pool = BlockPool(32, 4)
    scheduler = Scheduler(pool, max_seqs=4, max_batched_tokens=64)
    runner = FakeRunner(pool)
    prefix = list(range(1, 13))  # three full blocks
    first = make_seq(0, prefix + [20, 21], 2)
    scheduler.add(first)
    drive(scheduler, runner)
    second = make_seq(1, prefix + [30, 31, 32], 2)
    scheduler.add(second)
    output = scheduler.schedule()
    assert output.chunks[0].start == 12 and output.chunks[0].tokens == (30, 31, 32)
    assert scheduler.stats.prefix_hit_tokens == 12
    scheduler.update(output, runner.run(output))
    drive(scheduler, runner)
    assert second.token_ids[15:] == expected_tokens(prefix + [30, 31, 32], 2)


def test_the_last_prompt_token_is_always_computed():
    pool = BlockPool(32, 4)
    scheduler = Scheduler(pool, max_seqs=4, max_batched_tokens=64)
    runner = FakeRunner(pool)
    scheduler.add(make_seq(0, list(range(1, 9)), 1))
    drive(scheduler, runner)
    scheduler.add(make_seq(1, list(range(1, 9)), 1))  # the same 8 tokens: two full cached blocks
    output = scheduler.schedule()
    assert output.chunks[0].start == 4 and output.chunks[0].wants_logits


def test_unreferenced_cached_blocks_are_reused_least_recent_first():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    pool.cache_full_blocks(a, [1, 2, 3, 4], 4, 4, [])
    pool.release(a)
    assert pool.num_free == 4 and pool.num_cached == 2
    fresh = pool.allocate(2)  # the never-used blocks go first
    assert set(fresh).isdisjoint(a) and pool.num_cached == 2
    pool.allocate(1)  # now one cached block is evicted: the tail, freed first
    assert pool.num_cached == 1
    blocks, _ = pool.cached_prefix([1, 2, 3, 4, 5], 4)
    assert blocks == [a[0]]


def test_a_block_key_depends_on_the_prefix_and_the_rows_computed_as_prompt():
    assert block_key(None, [1, 2], 2) != block_key(block_key(None, [9], 1), [1, 2], 2)
    assert block_key(None, [1, 2], 2) != block_key(None, [1, 2], 1)
    assert prompt_rows_in(0, 4, 1) == 0 and prompt_rows_in(4, 4, 6) == 2 and prompt_rows_in(8, 4, 6) == 0


def test_generated_tokens_are_not_a_prefix_hit_for_the_same_tokens_as_prompt():
    """Attention computes prompt rows and generated rows in different float orders: a hit must
    give the bits the new sequence would compute itself."""
    pool = BlockPool(32, 2)
    scheduler = Scheduler(pool, max_seqs=2, max_batched_tokens=64)
    runner = FakeRunner(pool)
    first = make_seq(0, [5, 6], 4)
    scheduler.add(first)
    drive(scheduler, runner)
    again = make_seq(1, first.token_ids + [7], 1)  # its prompt holds first's generated tokens
    scheduler.add(again)
    output = scheduler.schedule()
    assert output.chunks[0].start == 2  # only the first block (prompt rows in both) was a hit


def test_a_prompt_larger_than_the_pool_is_refused_with_both_sizes():
    scheduler = Scheduler(BlockPool(4, 4), max_seqs=2, max_batched_tokens=64)
    with pytest.raises(LlmxError, match=r"20 tokens.*holds 16"):
        scheduler.add(make_seq(0, list(range(1, 21)), 3))


def test_finishing_a_sequence_frees_its_blocks_wherever_it_is():
    pool = BlockPool(16, 4, prefix_caching=False)
    scheduler = Scheduler(pool, max_seqs=1, max_batched_tokens=64)
    running, waiting = make_seq(0, [1, 2, 3, 4, 5], 9), make_seq(1, [6, 7], 9)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.update(scheduler.schedule(), {0: [8]})
    scheduler.finish(running, "cancelled")
    scheduler.finish(waiting, "cancelled")
    assert pool.num_used == 0 and not scheduler.has_work and running.finish_reason == "cancelled"


def test_max_tokens_and_context_end_a_sequence_with_length():
    pool = BlockPool(16, 4)
    scheduler = Scheduler(pool, max_seqs=2, max_batched_tokens=64)
    short, full = make_seq(0, [1, 2], 1), make_seq(1, [3, 4], 100, max_len=5)
    scheduler.add(short)
    scheduler.add(full)
    runner = FakeRunner(pool)
    drive(scheduler, runner)
    assert short.finish_reason == "length" and short.n_generated <= 1
    assert full.finish_reason in ("length", "stop") and len(full.token_ids) <= 5


def test_accepted_proposals_give_several_tokens_per_step_and_rejected_ones_are_recomputed():
    pool = BlockPool(32, 4)
    scheduler = Scheduler(pool, max_seqs=2, max_batched_tokens=64)
    seq = make_seq(0, [3, 4, 5], 40)
    scheduler.add(seq)
    runner = FakeRunner(pool)
    scheduler.update(first := scheduler.schedule(), runner.run(first))
    expected = expected_tokens([3, 4, 5], 40)
    seq.draft = expected[1:4] + [(expected[4] + 1) % VOCAB or 1]  # three right, then a wrong one
    step = scheduler.schedule()
    assert step.chunks[0].n_draft == 4 and step.chunks[0].n_logit_rows == 5
    scheduler.update(step, runner.run(step))
    assert seq.token_ids[3:] == expected[:5]  # the first token, three accepted, and the model's own
    assert seq.n_computed == 3 + 4 and seq.n_uncomputed == 1  # the wrong proposal's slot is not counted
    assert (scheduler.stats.draft_tokens, scheduler.stats.accepted_tokens) == (4, 3)
    drive(scheduler, runner)
    assert seq.token_ids[3:] == expected


def test_proposals_are_dropped_rather_than_preempting_another_sequence():
    pool = BlockPool(4, 4, prefix_caching=False)
    scheduler = Scheduler(pool, max_seqs=2, max_batched_tokens=64)
    first, second = make_seq(0, [1, 2, 3, 4, 5, 6, 7], 9), make_seq(1, [8, 9, 10, 11, 12, 13, 14], 9)
    scheduler.add(first)
    scheduler.add(second)
    runner = FakeRunner(pool)
    scheduler.update(step := scheduler.schedule(), runner.run(step))
    assert pool.num_free == 0 and first.n_uncomputed == 1  # two blocks each: 8 positions, 7 computed
    first.draft = [5, 5, 5]  # would need a third block
    step = scheduler.schedule()
    assert not step.preempted and [len(c.tokens) for c in step.chunks] == [1, 1] and not first.draft
