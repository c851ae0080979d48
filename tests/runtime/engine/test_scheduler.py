"""Scheduler driven without a model: fake tokens, real block manager.

The driver mirrors the engine's loop: schedule, note which items sample (their chunk reaches
the end of the sequence: that must be read before `advance`, which moves num_computed_tokens),
advance, append one fake token per sampling sequence, finish those that reached max_tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.engine.scheduler import Scheduler, ScheduledSeq
from kubellm.runtime.engine.sequence import Sequence, Status

BS = 4


def make_seq(prompt_len: int, max_tokens: int, base: int = 0) -> Sequence:
    return Sequence([base + i for i in range(prompt_len)], GenerationConfig(), max_tokens=max_tokens, seed=0)


def fake_token(seq: Sequence) -> int:
    """Deterministic per (sequence, position), so a lost or doubled token shows in the output."""
    return 10_000 + 1000 * (seq.seq_id % 50) + seq.num_generated


@dataclass
class Item:
    seq: Sequence
    start: int       # num_computed_tokens when scheduled
    num_tokens: int
    samples: bool
    len_before: int  # len(seq) when scheduled


@dataclass
class Driver:
    sched: Scheduler
    steps: list[list[Item]] = field(default_factory=list)
    # (step, sequence, tokens it had computed, len) for each preemption, observed around _preempt
    preemptions: list[tuple[int, Sequence, int, int]] = field(default_factory=list)

    def __post_init__(self):
        original = self.sched._preempt

        def spy(seq):
            computed, length = seq.num_computed_tokens, len(seq)
            original(seq)
            assert seq.num_computed_tokens == 0 and seq.block_table == [] and seq.status is Status.WAITING
            self.preemptions.append((len(self.steps), seq, computed, length))

        self.sched._preempt = spy

    def step(self) -> list[Item]:
        bm = self.sched.blocks
        scheduled: list[ScheduledSeq] = self.sched.schedule()
        items = [Item(s.seq, s.seq.num_computed_tokens, s.num_tokens, s.samples, len(s.seq)) for s in scheduled]
        check_step_invariants(self.sched, items)
        self.sched.advance(scheduled)
        for it in items:
            if it.samples:
                it.seq.token_ids.append(fake_token(it.seq))
                if it.seq.num_generated >= it.seq.max_tokens:
                    self.sched.finish(it.seq, "length")
        assert bm.num_free <= bm.num_blocks
        self.steps.append(items)
        return items

    def run(self, max_steps: int = 500) -> None:
        while self.sched.has_work():
            self.step()
            assert len(self.steps) < max_steps, "scheduler made no progress"


def check_step_invariants(sched: Scheduler, items: list[Item]) -> None:
    bm = sched.blocks
    assert sum(it.num_tokens for it in items) <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_batch_size
    assert len({id(it.seq) for it in items}) == len(items), "a sequence scheduled twice in one step"
    for it in items:
        assert it.num_tokens >= 1
        assert it.seq.status is Status.RUNNING
        assert it.seq in sched.running
        assert it.start + it.num_tokens <= len(it.seq)
        # Every token run this step has a KV slot.
        assert len(it.seq.block_table) * bm.block_size >= it.start + it.num_tokens
        assert it.samples == (it.start + it.num_tokens == len(it.seq))
    # Block accounting: ref counts match the running sequences' tables.
    refs: dict[int, int] = {}
    for s in sched.running:
        for b in s.block_table:
            refs[b] = refs.get(b, 0) + 1
    for s in sched.waiting:
        assert s.block_table == []
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0)
    assert bm.num_free == bm.num_blocks - len(refs)


def make_sched(num_blocks=64, batch=8, budget=32, caching=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, enable_prefix_caching=caching), batch, budget)


def assert_all_done(sched: Scheduler, seqs: list[Sequence]) -> None:
    assert not sched.has_work()
    assert sched.blocks.num_free == sched.blocks.num_blocks
    for s in seqs:
        assert s.status is Status.FINISHED
        assert s.finish_reason == "length"
        assert s.num_generated == s.max_tokens
        # Exactly one token per position, in order: nothing lost or doubled.
        assert s.generated_ids == [10_000 + 1000 * (s.seq_id % 50) + i for i in range(s.max_tokens)]
        assert s.block_table == []


# ---------------------------------------------------------------- budget and batch limits


@pytest.mark.parametrize("budget", [16, 20, 33])
def test_token_budget_never_exceeded(budget):
    sched = make_sched(num_blocks=200, batch=16, budget=budget)
    d = Driver(sched)
    seqs = [make_seq(n, m, base=100 * i) for i, (n, m) in enumerate([(50, 5), (3, 9), (17, 4), (40, 2), (1, 6), (8, 8)])]
    for s in seqs:
        sched.add(s)
    d.run()
    assert max(sum(it.num_tokens for it in step) for step in d.steps) == budget  # the budget is used
    assert all(sum(it.num_tokens for it in step) <= budget for step in d.steps)
    assert_all_done(sched, seqs)


def test_max_batch_size_limits_running_sequences():
    sched = make_sched(num_blocks=200, batch=2, budget=64)
    d = Driver(sched)
    seqs = [make_seq(5, 3, base=100 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    peak = 0
    while sched.has_work():
        items = d.step()
        assert len(items) <= 2
        peak = max(peak, len(sched.running) + sum(1 for it in items if it.seq.is_finished))
        assert len(sched.running) <= 2
        assert len(d.steps) < 100
    assert peak == 2
    # Sequences are admitted as others finish, not all at once.
    first_step = {id(s): min(i for i, st in enumerate(d.steps) if any(it.seq is s for it in st)) for s in seqs}
    assert len(set(first_step.values())) >= 3
    assert_all_done(sched, seqs)


@pytest.mark.parametrize("num_blocks, batch", [(200, 2), (6, 8)], ids=["batch-limited", "preempting"])
def test_first_scheduled_marks_the_first_admission_and_survives_preemption(num_blocks, batch):
    """The end of a request's queue time (vllm:request_queue_time_seconds): set when it is first
    admitted to a step, never before, and kept when a preempted sequence is admitted again."""
    sched = make_sched(num_blocks=num_blocks, batch=batch, budget=32)
    d = Driver(sched)
    seqs = [make_seq(5, 10, base=100 * i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    first: dict[int, float] = {}
    while sched.has_work():
        before = {id(s): s.first_scheduled for s in seqs}
        items = d.step()
        ran = {id(it.seq) for it in items}
        for s in seqs:
            if id(s) not in first:
                assert (s.first_scheduled is not None) == (id(s) in ran), "set exactly at the first admission"
                assert before[id(s)] is None
                if s.first_scheduled is not None:
                    first[id(s)] = s.first_scheduled
            else:
                assert s.first_scheduled == first[id(s)]
        assert len(d.steps) < 300
    times = [first[id(s)] for s in seqs]
    assert times == sorted(times) and len(first) == len(seqs)
    if num_blocks == 6:
        assert sched.num_preemptions > 0
    else:
        assert times[0] < times[-1]   # the last waited for a batch slot
    assert_all_done(sched, seqs)


# ---------------------------------------------------------------- Dynamic SplitFuse


def test_long_prompt_is_chunked_while_running_sequence_keeps_decoding():
    budget = 32
    sched = make_sched(num_blocks=100, batch=8, budget=budget)
    d = Driver(sched)
    short = make_seq(4, 40)
    sched.add(short)
    d.step()  # short's prefill
    d.step()  # short decodes
    long = make_seq(100, 3, base=1000)
    sched.add(long)

    long_chunks: list[Item] = []
    while long.num_computed_tokens < 100 or long.num_generated == 0:
        items = d.step()
        mine = [it for it in items if it.seq is long]
        theirs = [it for it in items if it.seq is short]
        assert len(mine) == 1
        # The running sequence decodes in every step of the long prefill.
        assert len(theirs) == 1 and theirs[0].num_tokens == 1 and theirs[0].samples
        long_chunks.append(mine[0])
        assert len(d.steps) < 50

    # The prompt went in several chunks, contiguous, covering it exactly once.
    assert len(long_chunks) >= math.ceil(100 / (budget - 1))
    assert long_chunks[0].start == 0
    for a, b in zip(long_chunks, long_chunks[1:]):
        assert b.start == a.start + a.num_tokens
    assert sum(c.num_tokens for c in long_chunks) == 100
    assert all(c.num_tokens <= budget - 1 for c in long_chunks)
    assert [c.samples for c in long_chunks] == [False] * (len(long_chunks) - 1) + [True]
    # A step mixing a 1-token decode and a partial prefill chunk exists.
    assert any(
        any(it.num_tokens == 1 and it.samples for it in st)
        and any(it.num_tokens > 1 and not it.samples for it in st)
        for st in d.steps
    )
    assert short.num_generated == 2 + len(long_chunks)
    d.run()
    assert_all_done(sched, [short, long])


def test_decodes_are_scheduled_before_prefills_and_get_budget_first():
    budget = 16
    sched = make_sched(num_blocks=100, batch=8, budget=budget)
    d = Driver(sched)
    decoders = [make_seq(3, 30, base=100 * i) for i in range(3)]
    for s in decoders:
        sched.add(s)
    d.step()  # all three prefilled (9 tokens)
    assert all(s.num_generated == 1 for s in decoders)
    long = make_seq(60, 2, base=5000)
    sched.add(long)
    items = d.step()
    kinds = [it.num_tokens == 1 and it.len_before - it.start == 1 for it in items]
    assert kinds == [True, True, True, False]
    assert {id(it.seq) for it in items[:3]} == {id(s) for s in decoders}
    assert items[3].seq is long and items[3].num_tokens == budget - 3

    # Every later step: decode items come first.
    while sched.has_work():
        items = d.step()
        is_decode = [it.len_before - it.start == 1 for it in items]
        assert is_decode == sorted(is_decode, reverse=True), is_decode
        assert len(d.steps) < 100
    assert_all_done(sched, decoders + [long])


def test_new_requests_join_running_ones_in_later_steps():
    sched = make_sched(num_blocks=100, batch=8, budget=32)
    d = Driver(sched)
    a = make_seq(6, 10)
    sched.add(a)
    d.step()
    d.step()
    assert a.num_generated == 2
    b = make_seq(5, 4, base=300)
    sched.add(b)
    items = d.step()
    assert [it.seq for it in items] == [a, b]
    assert items[0].num_tokens == 1 and items[1].num_tokens == 5 and items[1].start == 0
    items = d.step()
    assert {id(it.seq) for it in items} == {id(a), id(b)} and all(it.num_tokens == 1 for it in items)
    d.run()
    assert_all_done(sched, [a, b])


def test_waiting_request_not_admitted_without_blocks():
    sched = make_sched(num_blocks=3, batch=8, budget=64)
    d = Driver(sched)
    a = make_seq(8, 2)            # 2 blocks; grows to 10 tokens -> 3 blocks
    b = make_seq(8, 2, base=100)  # has to wait
    sched.add(a)
    sched.add(b)
    items = d.step()
    assert [it.seq for it in items] == [a]
    assert b.status is Status.WAITING and b.block_table == []
    d.run()
    assert_all_done(sched, [a, b])


# ---------------------------------------------------------------- preemption


def restarts_of(d: Driver, s: Sequence) -> list[tuple[list[Item], int, int]]:
    """For each preemption of `s`: its runs from the next admission on, tokens thrown away, len."""
    out = []
    for step, seq, computed, length in d.preemptions:
        if seq is s:
            runs = [it for st in d.steps[step:] for it in st if it.seq is s]
            out.append((runs, computed, length))
    return out


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_recomputes_and_everyone_finishes(caching):
    sched = make_sched(num_blocks=6, batch=8, budget=32, caching=caching)
    d = Driver(sched)
    # Each needs up to ceil((5 + 10) / 4) = 4 blocks; three of them can't all fit in 6.
    seqs = [make_seq(5, 10, base=100 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)

    while sched.has_work():
        d.step()
        for s in sched.waiting:  # waiting after having run: reset for recompute
            if s.num_generated:
                assert s.num_computed_tokens == 0 and s.block_table == [] and s.num_hashed_blocks == 0
        assert len(d.steps) < 300
    assert sched.num_preemptions > 0
    assert len(d.preemptions) == sched.num_preemptions

    recomputed_with_generated = 0
    for s in seqs:
        for runs, _, length in restarts_of(d, s):
            first = runs[0]
            assert first.len_before == length
            if not caching:
                assert first.start == 0
            else:  # a cached prefix may be skipped, whole blocks only, never the last token
                assert first.start % BS == 0 and first.start < length
            if length > s.num_prompt_tokens:
                recomputed_with_generated += 1
            # The recompute runs contiguously up to the end of the sequence and then samples.
            j, pos = 0, first.start
            while not runs[j].samples:
                assert runs[j].start == pos and runs[j].len_before == length
                pos += runs[j].num_tokens
                j += 1
            assert runs[j].start == pos and pos + runs[j].num_tokens == length
    assert recomputed_with_generated > 0
    assert_all_done(sched, seqs)


def test_preemption_full_prefill_without_caching_counts_all_tokens():
    sched = make_sched(num_blocks=5, batch=8, budget=64, caching=False)
    d = Driver(sched)
    seqs = [make_seq(4, 12, base=100 * i) for i in range(2)]  # each grows to 16 tokens = 4 blocks
    for s in seqs:
        sched.add(s)
    d.run()
    assert sched.num_preemptions > 0
    # Tokens run per sequence = every token once (the last one is never fed back), plus the
    # tokens whose K/V a preemption threw away (computed before it, computed again after).
    for s in seqs:
        runs = [it for st in d.steps for it in st if it.seq is s]
        wasted = sum(computed for _, seq, computed, _ in d.preemptions if seq is s)
        expected = (s.num_prompt_tokens + s.max_tokens - 1) + wasted
        assert sum(it.num_tokens for it in runs) == expected
    assert_all_done(sched, seqs)


# ---------------------------------------------------------------- abort


def test_finish_aborts_and_frees_blocks_immediately():
    sched = make_sched(num_blocks=20, batch=8, budget=32)
    d = Driver(sched)
    a = make_seq(9, 50)              # 3 blocks
    b = make_seq(6, 50, base=100)    # 2 blocks
    c = make_seq(6, 50, base=200)
    sched.add(a)
    sched.add(b)
    d.step()
    d.step()
    sched.add(c)  # still waiting
    free = sched.blocks.num_free
    held = len(a.block_table)
    assert held == math.ceil(len(a) / BS)
    sched.finish(a, "abort")
    assert a.status is Status.FINISHED and a.finish_reason == "abort"
    assert a not in sched.running and a.block_table == []
    assert sched.blocks.num_free == free + held

    sched.finish(c, "abort")  # a waiting sequence: holds no blocks
    assert c not in sched.waiting and c.status is Status.FINISHED
    assert sched.blocks.num_free == free + held

    items = d.step()
    assert [it.seq for it in items] == [b]
    sched.finish(b, "abort")
    assert not sched.has_work()
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_many_requests_all_finish_and_all_blocks_free():
    sched = make_sched(num_blocks=24, batch=4, budget=16)
    d = Driver(sched)
    shapes = [(1, 1), (30, 3), (7, 12), (4, 4), (15, 1), (2, 20), (9, 9), (33, 2)]
    seqs = [make_seq(n, m, base=1000 * i) for i, (n, m) in enumerate(shapes)]
    for i, s in enumerate(seqs):
        sched.add(s)
        if i % 3 == 2:
            d.step()  # requests arrive while others run
    d.run()
    assert_all_done(sched, seqs)


# ---------------------------------------------------------------- randomized, with a KV-cache oracle


class KVOracle:
    """Tracks what each KV slot holds: the K/V at position i depends on tokens[: i + 1].

    Before a step runs tokens [start, start + n) of a sequence, every earlier position must be
    in its block table with the right contents (reused prefix blocks included); the step then
    writes its positions, which must lie in blocks no other sequence shares.
    """

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def run(self, seq: Sequence, start: int, n: int) -> None:
        bs = self.bm.block_size
        for pos in range(start):
            slot = (seq.block_table[pos // bs], pos % bs)
            assert self.slots.get(slot) == tuple(seq.token_ids[: pos + 1]), (seq.seq_id, pos)
        for pos in range(start, start + n):
            block = seq.block_table[pos // bs]
            assert self.bm.blocks[block].ref_count == 1, "writing into a shared block"
            self.slots[(block, pos % bs)] = tuple(seq.token_ids[: pos + 1])


def model_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole prefix (so equal prompts
    produce equal continuations and generated blocks get shared too)."""
    return 7 + hash(tuple(tokens)) % 5


@pytest.mark.parametrize("trial", range(16))
def test_randomized_scheduling_keeps_kv_cache_consistent(trial):
    import random

    rng = random.Random(trial)
    num_blocks = rng.randint(6, 14)
    caching = trial % 3 != 0
    sched = make_sched(num_blocks=num_blocks, batch=rng.randint(1, 5), budget=rng.randint(16, 40), caching=caching)
    oracle = KVOracle(sched.blocks)
    # Prompts made of a few whole blocks, so equal block contents recur after different prefixes
    # and at different positions, plus a short tail from a tiny alphabet.
    words = [[20, 21, 22, 23], [24, 24, 24, 24], [20, 21, 22, 24]]
    pending = []
    for i in range(10):
        prompt = [t for _ in range(rng.randint(0, 3)) for t in rng.choice(words)]
        prompt += [rng.randint(20, 21) for _ in range(rng.randint(0 if prompt else 1, 4))]
        max_tokens = rng.randint(1, 10)
        max_tokens = max(1, min(max_tokens, num_blocks * BS - len(prompt)))
        s = Sequence(prompt, GenerationConfig(), max_tokens=max_tokens, seed=0)
        pending.append((rng.randint(0, 25), s))
    seqs = [s for _, s in pending]
    aborted = set()
    step = 0
    while pending or sched.has_work():
        for when, s in [p for p in pending if p[0] <= step]:
            sched.add(s)
            pending.remove((when, s))
        if rng.random() < 0.04 and (sched.running or sched.waiting):
            victim = rng.choice(list(sched.running) + list(sched.waiting))
            free = sched.blocks.num_free
            exclusive = sum(1 for b in victim.block_table if sched.blocks.blocks[b].ref_count == 1)
            sched.finish(victim, "abort")
            assert sched.blocks.num_free == free + exclusive
            aborted.add(id(victim))
        scheduled = sched.schedule()
        items = [Item(x.seq, x.seq.num_computed_tokens, x.num_tokens, x.samples, len(x.seq)) for x in scheduled]
        check_step_invariants(sched, items)
        for it in items:
            oracle.run(it.seq, it.start, it.num_tokens)
        sched.advance(scheduled)
        for it in items:
            if it.samples:
                it.seq.token_ids.append(model_token(it.seq.token_ids))
                if it.seq.num_generated >= it.seq.max_tokens:
                    sched.finish(it.seq, "length")
        step += 1
        assert step < 1000, "no progress"
    assert sched.blocks.num_free == num_blocks
    for s in seqs:
        assert s.is_finished
        if id(s) in aborted:
            assert s.finish_reason == "abort" and s.num_generated <= s.max_tokens
            continue
        assert s.finish_reason == "length" and s.num_generated == s.max_tokens
        expected = list(s.token_ids[: s.num_prompt_tokens])
        for _ in range(s.max_tokens):
            expected.append(model_token(expected))
        assert s.token_ids == expected
