"""eviction='copy' without a model: the block manager's swap plans and the scheduler's swapped queue,
checked against an oracle of what every device and host KV slot holds.

The oracle executes each step's plans as the runners do (out first, then in) before the step's
tokens are written, so a plan that copied the wrong block, freed a block another sequence still
reads, or reused a host block too early shows as a slot holding the wrong prefix.
"""

from __future__ import annotations

import logging
import random

import pytest

from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.scheduler import Scheduler
from kubellm.runtime.engine.sequence import Sequence, Status

BS = 4


def make_seq(prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(prompt, GenerationConfig(), max_tokens=max_tokens, seed=0)


def model_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole prefix."""
    return 7 + hash(tuple(tokens)) % 5


def computed(bm: BlockManager, seq: Sequence) -> None:
    """Pretend a step computed all but the last token (as after a prefill that sampled)."""
    seq.num_computed_tokens = len(seq) - 1
    bm.register_computed(seq)


# ---------------------------------------------------------------- the block manager's plans


def test_swap_out_copies_computed_blocks_and_frees_the_device_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS, num_cpu_blocks=4)
    seq = make_seq(list(range(10)), 5)          # 10 tokens: 3 blocks, 9 computed: 3 blocks hold K/V
    bm.allocate(seq)
    computed(bm, seq)
    table = list(seq.block_table)
    assert bm.can_swap_out(seq)
    plan = bm.swap_out(seq)
    assert [d for d, _ in plan] == table and len({h for _, h in plan}) == 3
    assert seq.cpu_block_table == [h for _, h in plan] and seq.block_table == []
    assert bm.num_free == 8 and bm.num_cpu_free == 1 and bm.swapped_out_blocks == 3


def test_swap_out_plans_only_blocks_with_computed_kv():
    bm = BlockManager(num_blocks=8, block_size=BS, num_cpu_blocks=8)
    seq = make_seq(list(range(10)), 5)
    bm.allocate(seq)
    seq.num_computed_tokens = 4                 # mid-prefill: one block computed of three held
    plan = bm.swap_out(seq)
    assert len(plan) == 1 and bm.num_free == 8 and bm.num_cpu_free == 7


def test_swap_out_refused_when_host_blocks_are_too_few():
    bm = BlockManager(num_blocks=8, block_size=BS, num_cpu_blocks=2)
    seq = make_seq(list(range(10)), 5)
    bm.allocate(seq)
    computed(bm, seq)
    assert not bm.can_swap_out(seq)


def test_a_shared_prefix_block_is_copied_but_stays_with_the_sequence_sharing_it():
    bm = BlockManager(num_blocks=10, block_size=BS, num_cpu_blocks=8)
    a = make_seq(list(range(9)), 5)             # blocks: [0..3] [4..7] [8]
    bm.allocate(a)
    computed(bm, a)
    b = make_seq(list(range(8)) + [50, 51], 5)  # shares a's two full blocks
    bm.allocate(b)
    shared = b.block_table[:2]
    assert shared == a.block_table[:2] and all(bm.blocks[i].ref_count == 2 for i in shared)
    computed(bm, b)
    plan = bm.swap_out(b)
    assert [d for d, _ in plan][:2] == shared
    assert all(bm.blocks[i].ref_count == 1 for i in shared), "a's references are untouched"
    assert all(i not in bm.free for i in shared), "a shared block is not freed under a"
    # Back in: the shared blocks are still a's, in the prefix cache: shared again, not copied.
    plan = bm.swap_in(b)
    assert b.block_table[:2] == shared and all(bm.blocks[i].ref_count == 2 for i in shared)
    assert len(plan) == 1 and bm.swapped_in_blocks == 1
    assert bm.num_cpu_free == 8


def test_swap_in_copies_into_new_blocks_and_registers_them_again():
    bm = BlockManager(num_blocks=6, block_size=BS, num_cpu_blocks=6)
    seq = make_seq(list(range(9)), 5)
    bm.allocate(seq)
    computed(bm, seq)
    out = bm.swap_out(seq)
    other = make_seq([90 + i for i in range(24)], 1)   # takes every block: the prefix cache is evicted
    bm.allocate(other)
    bm.free_blocks(other)
    assert not bm.hash_to_block
    assert bm.can_swap_in(seq)
    plan = bm.swap_in(seq)
    assert [h for h, _ in plan] == [h for _, h in out], "every saved block comes back, in order"
    # 9 tokens, 8 computed: two blocks were saved and come back; the third (token 8) is a new block.
    assert [d for _, d in plan] == seq.block_table[:2] and len(seq.block_table) == 3
    assert seq.num_hashed_blocks == 2 and len(bm.hash_to_block) == 2, "its full blocks are findable again"
    assert bm.num_cpu_free == 6 and seq.cpu_block_table == []


def test_swap_in_takes_blocks_for_every_token_not_only_the_saved_ones():
    bm = BlockManager(num_blocks=8, block_size=BS, num_cpu_blocks=8)
    seq = make_seq(list(range(10)), 5)
    bm.allocate(seq)
    seq.num_computed_tokens = 4
    bm.swap_out(seq)
    plan = bm.swap_in(seq)
    assert len(plan) == 1 and len(seq.block_table) == 3 and bm.num_free == 5


def test_can_swap_in_needs_room_for_the_whole_sequence():
    bm = BlockManager(num_blocks=4, block_size=BS, num_cpu_blocks=4)
    seq = make_seq(list(range(10)), 5)
    bm.allocate(seq)
    computed(bm, seq)
    bm.swap_out(seq)
    hog = make_seq([70, 71, 72, 73, 74], 1)     # 2 of the 4 blocks
    bm.allocate(hog)
    assert not bm.can_swap_in(seq)
    bm.free_blocks(hog)
    assert bm.can_swap_in(seq)


def test_free_host_blocks_returns_an_aborted_swapped_sequences_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS, num_cpu_blocks=4)
    seq = make_seq(list(range(10)), 5)
    bm.allocate(seq)
    computed(bm, seq)
    bm.swap_out(seq)
    bm.free_host_blocks(seq)
    assert bm.num_cpu_free == 4 and seq.cpu_block_table == []


# ---------------------------------------------------------------- the scheduler, with an oracle


class SwapOracle:
    """What each device slot and host slot holds: the K/V at position i depends on tokens[: i + 1]."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.device: dict[tuple[int, int], tuple[int, ...]] = {}
        self.host: dict[tuple[int, int], tuple[int, ...]] = {}
        self.computed_tokens: dict[int, int] = {}   # seq_id -> tokens the steps ran (prefill + decode)

    def apply_swaps(self) -> None:
        plan = self.sched.swaps
        for dev, host in plan.out:
            for slot in range(BS):
                self.host[(host, slot)] = self.device.get((dev, slot))
        for host, dev in plan.in_:
            for slot in range(BS):
                self.device[(dev, slot)] = self.host.get((host, slot))

    def run(self, seq: Sequence, start: int, n: int) -> None:
        bm = self.sched.blocks
        for pos in range(start):
            slot = (seq.block_table[pos // BS], pos % BS)
            assert self.device.get(slot) == tuple(seq.token_ids[: pos + 1]), (seq.seq_id, pos)
        for pos in range(start, start + n):
            block = seq.block_table[pos // BS]
            assert bm.blocks[block].ref_count == 1, "writing into a shared block"
            self.device[(block, pos % BS)] = tuple(seq.token_ids[: pos + 1])
        self.computed_tokens[seq.seq_id] = self.computed_tokens.get(seq.seq_id, 0) + n


def check_invariants(sched: Scheduler) -> None:
    bm = sched.blocks
    refs: dict[int, int] = {}
    for s in sched.running:
        assert s.status is Status.RUNNING and not s.cpu_block_table
        for b in s.block_table:
            refs[b] = refs.get(b, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0)
    held = [h for s in sched.swapped for h in s.cpu_block_table]
    for s in sched.swapped:
        assert s.status is Status.SWAPPED and s.block_table == []
        assert len(s.cpu_block_table) == bm.blocks_for(s.num_computed_tokens)
    for s in sched.waiting:
        assert s.block_table == [] and s.cpu_block_table == []
    assert len(held) == len(set(held)) and not set(held) & set(bm.cpu_free)
    assert len(held) + bm.num_cpu_free == bm.num_cpu_blocks


def drive(sched: Scheduler, seqs: list[Sequence], arrivals: dict[int, int] | None = None,
          abort_rate: float = 0.0, rng: random.Random | None = None, max_steps: int = 2000) -> SwapOracle:
    oracle = SwapOracle(sched)
    pending = list(seqs)
    arrivals = arrivals or {}
    step = 0
    while pending or sched.has_work():
        for s in [s for s in pending if arrivals.get(s.seq_id, 0) <= step]:
            sched.add(s)
            pending.remove(s)
        if abort_rate and rng.random() < abort_rate:
            live = list(sched.running) + list(sched.swapped) + list(sched.waiting)
            if live:
                victim = rng.choice(live)
                cpu_free = sched.blocks.num_cpu_free + len(victim.cpu_block_table)
                sched.finish(victim, "abort")
                assert sched.blocks.num_cpu_free == cpu_free
        scheduled = sched.schedule()
        check_invariants(sched)
        assert scheduled or not sched.has_work(), "a step with work scheduled nothing"
        if sched.swaps.in_:
            assert not sched.swaps.out, "swapped in during a step that preempted"
        oracle.apply_swaps()
        for item in scheduled:
            oracle.run(item.seq, item.seq.num_computed_tokens, item.num_tokens)
        samples = [item.samples for item in scheduled]
        sched.advance(scheduled)
        for item, sampled in zip(scheduled, samples):
            if sampled:
                item.seq.token_ids.append(model_token(item.seq.token_ids))
                if item.seq.num_generated >= item.seq.max_tokens:
                    sched.finish(item.seq, "length")
        step += 1
        assert step < max_steps, "no progress"
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert sched.blocks.num_cpu_free == sched.blocks.num_cpu_blocks
    return oracle


def expected_tokens(seq: Sequence) -> list[int]:
    tokens = list(seq.token_ids[: seq.num_prompt_tokens])
    for _ in range(seq.max_tokens):
        tokens.append(model_token(tokens))
    return tokens


def copy_sched(num_blocks, num_cpu_blocks, batch=8, budget=32, caching=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, caching, num_cpu_blocks), batch, budget, eviction="copy")


@pytest.mark.parametrize("caching", [False, True])
def test_swapped_sequences_resume_without_recomputing(caching):
    sched = copy_sched(num_blocks=8, num_cpu_blocks=64, caching=caching)
    # Each grows to 5 + 12 = 17 tokens (5 blocks): three at once do not fit in 8.
    seqs = [make_seq([100 * i + j for j in range(5)], 12) for i in range(3)]
    oracle = drive(sched, seqs)
    assert sched.num_preemptions > 0 and sched.num_swap_fallbacks == 0
    assert sched.blocks.swapped_out_blocks > 0 and sched.blocks.swapped_in_blocks > 0
    for s in seqs:
        assert s.token_ids == expected_tokens(s)
        # Every token ran exactly once (the last one is never fed back): nothing was recomputed.
        assert oracle.computed_tokens[s.seq_id] == len(s) - 1


def test_host_blocks_exhausted_falls_back_to_recompute(caplog):
    sched = copy_sched(num_blocks=8, num_cpu_blocks=1, caching=False)   # too few for any victim's K/V
    seqs = [make_seq([100 * i + j for j in range(5)], 12) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="kubellm.runtime.engine.scheduler"):
        oracle = drive(sched, seqs)
    assert sched.num_preemptions > 0 and sched.num_swap_fallbacks > 0
    assert "recomputing it instead" in caplog.text and "num_cpu_blocks" in caplog.text
    assert sum(oracle.computed_tokens[s.seq_id] - (len(s) - 1) for s in seqs) > 0, "something was recomputed"
    for s in seqs:
        assert s.token_ids == expected_tokens(s)


def test_some_swapped_some_recomputed_when_host_blocks_run_short():
    sched = copy_sched(num_blocks=8, num_cpu_blocks=4, batch=8, budget=64, caching=False)
    seqs = [make_seq([100 * i + j for j in range(6)], 14) for i in range(4)]   # each grows to 5 blocks
    drive(sched, seqs)
    assert sched.blocks.swapped_out_blocks > 0 and sched.num_swap_fallbacks > 0
    for s in seqs:
        assert s.token_ids == expected_tokens(s)


def test_waiting_requests_are_not_admitted_while_a_swapped_one_waits():
    sched = copy_sched(num_blocks=6, num_cpu_blocks=16, batch=8, budget=32, caching=False)
    a = make_seq(list(range(8)), 12)        # grows to 20 tokens: 5 blocks
    b = make_seq(list(range(100, 108)), 12)
    sched.add(a)
    sched.add(b)
    seen_swapped = False
    late = make_seq(list(range(200, 203)), 2)
    for _ in range(200):
        scheduled = sched.schedule()
        if sched.swapped:
            seen_swapped = True
            if late.status is Status.WAITING and late not in sched.waiting:
                sched.add(late)
            assert late not in sched.running, "a waiting request jumped a swapped one"
        samples = [item.samples for item in scheduled]
        sched.advance(scheduled)
        for item, sampled in zip(scheduled, samples):
            if sampled:
                item.seq.token_ids.append(model_token(item.seq.token_ids))
                if item.seq.num_generated >= item.seq.max_tokens:
                    sched.finish(item.seq, "length")
        if not sched.has_work():
            break
    assert seen_swapped and a.is_finished and b.is_finished and late.is_finished


def test_aborting_a_swapped_sequence_frees_its_host_blocks():
    sched = copy_sched(num_blocks=6, num_cpu_blocks=16, caching=False)
    a, b = make_seq(list(range(8)), 12), make_seq(list(range(100, 108)), 12)
    sched.add(a)
    sched.add(b)
    while not sched.swapped:
        scheduled = sched.schedule()
        samples = [item.samples for item in scheduled]
        sched.advance(scheduled)
        for item, sampled in zip(scheduled, samples):
            if sampled:
                item.seq.token_ids.append(model_token(item.seq.token_ids))
    victim = sched.swapped[0]
    assert victim.cpu_block_table
    sched.finish(victim, "abort")
    assert victim.status is Status.FINISHED and not sched.swapped and victim.cpu_block_table == []
    assert sched.blocks.num_cpu_free == 16


def test_recompute_scheduler_plans_no_swaps():
    sched = Scheduler(BlockManager(8, BS, True, 64), 8, 32)     # host blocks, but eviction='recompute'
    seqs = [make_seq([100 * i + j for j in range(5)], 12) for i in range(3)]
    drive(sched, seqs)
    assert sched.num_preemptions > 0 and sched.blocks.swapped_out_blocks == 0


def test_unknown_eviction_is_refused_by_name():
    with pytest.raises(ValueError, match="eviction: 'swap'"):
        Scheduler(BlockManager(8, BS), 8, 32, eviction="swap")


@pytest.mark.parametrize("trial", range(24))
def test_randomized_swapping_keeps_device_and_host_caches_consistent(trial):
    rng = random.Random(1000 + trial)
    num_blocks = rng.randint(6, 14)
    sched = copy_sched(num_blocks=num_blocks, num_cpu_blocks=rng.randint(0, 20), batch=rng.randint(1, 5),
                       budget=rng.randint(16, 40), caching=trial % 3 != 0)
    # Prompts of a few whole blocks from a small set, so equal blocks recur and prefixes are shared.
    words = [[20, 21, 22, 23], [24, 24, 24, 24], [20, 21, 22, 24]]
    seqs, arrivals = [], {}
    for _ in range(10):
        prompt = [t for _ in range(rng.randint(0, 3)) for t in rng.choice(words)]
        prompt += [rng.randint(20, 21) for _ in range(rng.randint(0 if prompt else 1, 4))]
        max_tokens = max(1, min(rng.randint(1, 12), num_blocks * BS - len(prompt)))
        s = make_seq(prompt, max_tokens)
        seqs.append(s)
        arrivals[s.seq_id] = rng.randint(0, 25)
    drive(sched, seqs, arrivals, abort_rate=0.03, rng=rng)
    for s in seqs:
        assert s.is_finished
        if s.finish_reason == "abort":
            assert s.token_ids == expected_tokens(s)[: len(s)]
        else:
            assert s.token_ids == expected_tokens(s)


def test_randomized_trials_do_swap():
    """The randomized trials above are only worth something if they swap out, swap in, share on the way
    back and fall back: count it over the same trials (without aborts)."""
    totals = dict(out=0, in_=0, fallbacks=0)
    for trial in range(24):
        rng = random.Random(1000 + trial)
        num_blocks = rng.randint(6, 14)
        sched = copy_sched(num_blocks=num_blocks, num_cpu_blocks=rng.randint(0, 20), batch=rng.randint(1, 5),
                           budget=rng.randint(16, 40), caching=trial % 3 != 0)
        words = [[20, 21, 22, 23], [24, 24, 24, 24], [20, 21, 22, 24]]
        seqs, arrivals = [], {}
        for _ in range(10):
            prompt = [t for _ in range(rng.randint(0, 3)) for t in rng.choice(words)]
            prompt += [rng.randint(20, 21) for _ in range(rng.randint(0 if prompt else 1, 4))]
            s = make_seq(prompt, max(1, min(rng.randint(1, 12), num_blocks * BS - len(prompt))))
            seqs.append(s)
            arrivals[s.seq_id] = rng.randint(0, 25)
        drive(sched, seqs, arrivals)
        totals["out"] += sched.blocks.swapped_out_blocks
        totals["in_"] += sched.blocks.swapped_in_blocks
        totals["fallbacks"] += sched.num_swap_fallbacks
    assert all(v > 0 for v in totals.values()), totals
