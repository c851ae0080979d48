"""BlockManager: allocation, ref counts, prefix caching (hash chain, LRU reuse) and decode growth."""

from __future__ import annotations

import math

import pytest

from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.engine.sequence import Sequence

BS = 4


def make_seq(tokens, max_tokens=8) -> Sequence:
    return Sequence(list(tokens), GenerationConfig(), max_tokens=max_tokens, seed=0)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does once a sequence's K/V are all in the cache."""
    seq.num_computed_tokens = len(seq)
    bm.register_computed(seq)


def used_blocks_consistent(bm: BlockManager, *seqs: Sequence) -> None:
    """Every block is either free (ref 0) or referenced exactly as often as the tables say."""
    refs: dict[int, int] = {}
    for s in seqs:
        for b in s.block_table:
            refs[b] = refs.get(b, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0), block.block_id
        assert (block.block_id in bm.free) == (block.ref_count == 0), block.block_id
    assert bm.num_free == bm.num_blocks - len(refs)


# ---------------------------------------------------------------- allocation and freeing


@pytest.mark.parametrize("length", [1, 3, 4, 5, 8, 9, 17])
def test_allocate_gives_ceil_blocks_with_distinct_ids(length):
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(range(100, 100 + length))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    expected = math.ceil(length / BS)
    assert len(seq.block_table) == expected
    assert len(set(seq.block_table)) == expected
    assert all(0 <= b < 10 for b in seq.block_table)
    assert bm.num_free == 10 - expected
    assert seq.num_computed_tokens == 0  # nothing cached yet
    for b in seq.block_table:
        assert bm.blocks[b].ref_count == 1
    used_blocks_consistent(bm, seq)


def test_two_sequences_get_disjoint_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(range(10, 19)), make_seq(range(50, 56))  # 3 blocks, 2 blocks
    bm.allocate(a)
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free == 3
    used_blocks_consistent(bm, a, b)

    a_blocks = list(a.block_table)
    bm.free_blocks(a)
    assert a.block_table == []
    assert bm.num_free == 6
    assert all(bm.blocks[x].ref_count == 0 for x in a_blocks)
    used_blocks_consistent(bm, b)
    bm.free_blocks(b)
    assert bm.num_free == bm.num_blocks
    used_blocks_consistent(bm)


def test_can_allocate_respects_free_count():
    bm = BlockManager(num_blocks=3, block_size=BS)
    big = make_seq(range(13))  # 4 blocks > 3
    assert not bm.can_allocate(big)
    exact = make_seq(range(100, 112))  # 3 blocks
    assert bm.can_allocate(exact)
    bm.allocate(exact)
    assert bm.num_free == 0
    assert not bm.can_allocate(make_seq([7]))
    bm.free_blocks(exact)
    assert bm.can_allocate(make_seq([7]))


# ---------------------------------------------------------------- prefix caching


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_prefix_reuses_exactly_the_first_k_blocks(k):
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(range(1, 1 + 4 * BS + 2))  # 4 full blocks + 2 tokens
    bm.allocate(first)
    compute_all(bm, first)

    # Same first k full blocks, then something different (and a few more tokens).
    tokens = first.token_ids[: k * BS] + [999] + list(range(500, 500 + BS))
    second = make_seq(tokens)
    free_before = bm.num_free
    bm.allocate(second)

    assert second.block_table[:k] == first.block_table[:k]
    assert not set(second.block_table[k:]) & set(first.block_table)
    for b in first.block_table[:k]:
        assert bm.blocks[b].ref_count == 2
    for b in first.block_table[k:]:
        assert bm.blocks[b].ref_count == 1
    assert second.num_computed_tokens == k * BS
    assert second.num_uncomputed == len(tokens) - k * BS
    # Only the new, unshared blocks came out of the free pool.
    assert bm.num_free == free_before - (math.ceil(len(tokens) / BS) - k)
    used_blocks_consistent(bm, first, second)

    # Freeing the second keeps the shared blocks alive for the first.
    bm.free_blocks(second)
    for b in first.block_table:
        assert bm.blocks[b].ref_count == 1
    used_blocks_consistent(bm, first)


@pytest.mark.parametrize("length", [2 * BS, 2 * BS + 1, 3 * BS - 1, 3 * BS])
def test_fully_cached_prompt_leaves_last_block_to_compute(length):
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(range(40, 40 + length))
    bm.allocate(first)
    compute_all(bm, first)
    second = make_seq(first.token_ids)
    bm.allocate(second)
    # At least one token (the one whose logits the step needs) is left to compute...
    assert second.num_uncomputed >= 1
    assert second.num_computed_tokens % BS == 0
    # ...and everything before the block holding the last token is reused.
    assert second.num_computed_tokens == (length - 1) // BS * BS
    shared = second.num_computed_tokens // BS
    assert second.block_table[:shared] == first.block_table[:shared]
    # The block that will be written again is not a shared one.
    assert second.block_table[-1] not in first.block_table
    assert len(second.block_table) == math.ceil(length / BS)
    used_blocks_consistent(bm, first, second)


def test_different_token_in_block0_gives_no_hits_even_if_later_blocks_match():
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(range(1, 1 + 3 * BS + 1))
    bm.allocate(first)
    compute_all(bm, first)
    tokens = list(first.token_ids)
    tokens[0] = 777  # blocks 1 and 2 have identical tokens, but the hash chain differs
    second = make_seq(tokens)
    bm.allocate(second)
    assert second.num_computed_tokens == 0
    assert not set(second.block_table) & set(first.block_table)
    for b in first.block_table:
        assert bm.blocks[b].ref_count == 1


def test_difference_only_in_block1_gives_exactly_one_hit():
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(range(1, 1 + 3 * BS + 1))
    bm.allocate(first)
    compute_all(bm, first)
    tokens = list(first.token_ids)
    tokens[BS + 2] = 777  # inside block 1; blocks 0 and 2 are identical
    second = make_seq(tokens)
    bm.allocate(second)
    assert second.num_computed_tokens == BS
    assert second.block_table[0] == first.block_table[0]
    assert not set(second.block_table[1:]) & set(first.block_table)


def test_same_block_content_after_another_prefix_is_not_a_hit():
    bm = BlockManager(num_blocks=20, block_size=BS)
    a, t = [11, 12, 13, 14], [21, 22, 23, 24]
    first = make_seq(a + t + [1])
    bm.allocate(first)
    compute_all(bm, first)
    # Block 1's tokens at position 0: its K/V were computed after `a`, so it must not be reused.
    second = make_seq(t + [9])
    bm.allocate(second)
    assert second.num_computed_tokens == 0
    assert first.block_table[1] not in second.block_table
    # Same tokens after a different first block: not a hit either.
    third = make_seq([5, 5, 5, 5] + t + [9])
    bm.allocate(third)
    assert third.num_computed_tokens == 0


def test_reused_block_refilled_with_same_tokens_under_another_prefix_is_not_hit():
    """A block handed out again loses its old identity, even if it ends up holding the same tokens."""
    bm = BlockManager(num_blocks=3, block_size=BS)
    a, b, t = [11, 12, 13, 14], [31, 32, 33, 34], [21, 22, 23, 24]
    first = make_seq(a + t + [1])
    bm.allocate(first)
    compute_all(bm, first)
    a_block, t_block = first.block_table[:2]
    bm.free_blocks(first)

    second = make_seq(b + t)  # two blocks: the freed tail ones go first, `a` stays cached
    bm.allocate(second)
    assert a_block not in second.block_table and second.block_table[1] == t_block  # the scenario
    compute_all(bm, second)   # t_block now holds t's K/V computed after b
    bm.free_blocks(second)

    third = make_seq(a + t + [1])
    bm.allocate(third)
    assert third.block_table[0] == a_block
    assert third.num_computed_tokens == BS  # `a` is reused; t after `a` must be recomputed
    assert bm.blocks[third.block_table[1]].ref_count == 1


def test_partial_blocks_are_not_registered():
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(range(1, 1 + BS + 3))  # 1 full block + 3 tokens
    bm.allocate(first)
    compute_all(bm, first)
    second = make_seq(first.token_ids + [50, 51, 52])  # block 1 of second is [5,6,7,50]
    bm.allocate(second)
    assert second.num_computed_tokens == BS
    assert second.block_table[1] != first.block_table[1]


def test_uncomputed_blocks_are_not_hit():
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(range(1, 1 + 3 * BS))
    bm.allocate(first)
    first.num_computed_tokens = BS + 2  # a prefill chunk covered block 0 only fully
    bm.register_computed(first)
    second = make_seq(first.token_ids + [99])
    bm.allocate(second)
    assert second.num_computed_tokens == BS
    assert second.block_table[0] == first.block_table[0]
    assert second.block_table[1] != first.block_table[1]


def test_freed_registered_blocks_are_hit_until_handed_out_again():
    n = 8
    bm = BlockManager(num_blocks=n, block_size=BS)
    first = make_seq(range(1, 1 + 2 * BS + 1))  # 3 blocks, 2 of them full and registered
    bm.allocate(first)
    compute_all(bm, first)
    cached = first.block_table[:2]
    bm.free_blocks(first)
    assert bm.num_free == n

    # Still findable after being freed.
    again = make_seq(first.token_ids)
    bm.allocate(again)
    assert again.block_table[:2] == cached
    assert again.num_computed_tokens == 2 * BS
    assert all(bm.blocks[b].ref_count == 1 for b in cached)
    assert bm.num_free == n - 3  # the hit blocks left the free pool too
    used_blocks_consistent(bm, again)
    bm.free_blocks(again)
    assert bm.num_free == n

    # Other sequences that take only the never-used (older) free blocks leave the cache intact.
    others = n - 3
    filler = make_seq(range(1000, 1000 + others * BS))
    bm.allocate(filler)
    assert not set(filler.block_table) & set(cached)
    probe = make_seq(first.token_ids)
    bm.allocate(probe)
    assert probe.block_table[:2] == cached
    bm.free_blocks(probe)
    bm.free_blocks(filler)

    # A sequence that needs every block gets the cached ones too: their contents are gone.
    hog = make_seq(range(2000, 2000 + n * BS))
    bm.allocate(hog)
    assert set(hog.block_table) == set(range(n))
    bm.free_blocks(hog)
    late = make_seq(first.token_ids)
    bm.allocate(late)
    assert late.num_computed_tokens == 0
    used_blocks_consistent(bm, late)


def test_prefix_caching_disabled_gives_no_hits():
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    first = make_seq(range(1, 1 + 3 * BS + 1))
    bm.allocate(first)
    compute_all(bm, first)
    second = make_seq(first.token_ids)
    bm.allocate(second)
    assert second.num_computed_tokens == 0
    assert not set(second.block_table) & set(first.block_table)
    assert all(bm.blocks[b].ref_count == 1 for b in first.block_table + second.block_table)
    bm.free_blocks(first)
    third = make_seq(first.token_ids)
    bm.allocate(third)
    assert third.num_computed_tokens == 0


def test_prefix_hit_counters():
    bm = BlockManager(num_blocks=20, block_size=BS)
    first = make_seq(range(1, 1 + 2 * BS + 1))
    bm.allocate(first)
    compute_all(bm, first)
    second = make_seq(first.token_ids)
    bm.allocate(second)
    assert bm.prefix_queries == 2 * len(first)
    assert bm.prefix_hits == 2 * BS
    assert second.num_cached_prompt_tokens == 2 * BS


# ---------------------------------------------------------------- decode growth


def test_append_slot_adds_a_block_exactly_at_block_boundaries():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(range(1, 4))  # 3 tokens, 1 block
    bm.allocate(seq)
    history = []
    for t in range(3 * BS):
        seq.token_ids.append(500 + t)  # a decoded token
        before = len(seq.block_table)
        assert bm.can_append(seq)
        bm.append_slot(seq)
        history.append(len(seq.block_table) - before)
        # The table covers every token, never more than one spare block.
        assert len(seq.block_table) == math.ceil(len(seq) / BS)
    lengths = [3 + t + 1 for t in range(3 * BS)]
    assert history == [1 if (n - 1) % BS == 0 else 0 for n in lengths]
    assert len(set(seq.block_table)) == len(seq.block_table)
    used_blocks_consistent(bm, seq)


def test_can_append_needs_a_free_block_only_when_crossing_a_boundary():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(range(1, 1 + BS + 2))  # 2 blocks: whole pool
    bm.allocate(seq)
    assert bm.num_free == 0
    seq.token_ids.append(100)  # BS + 3 tokens: still fits in 2 blocks
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(101)  # 2 * BS: still fits
    assert bm.can_append(seq)
    seq.token_ids.append(102)  # 2 * BS + 1: needs a third block, none free
    assert not bm.can_append(seq)

    bm2 = BlockManager(num_blocks=3, block_size=BS)
    s2 = make_seq(range(1, 1 + 2 * BS))
    bm2.allocate(s2)
    s2.token_ids.append(7)
    assert bm2.can_append(s2)
    bm2.append_slot(s2)
    assert len(s2.block_table) == 3 and bm2.num_free == 0
    used_blocks_consistent(bm2, s2)


def test_decoded_blocks_become_shareable_once_computed():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(range(1, 1 + BS - 1))  # BS-1 prompt tokens
    bm.allocate(seq)
    compute_all(bm, seq)
    for t in range(BS + 1):  # decode until block 1 is full and computed
        seq.token_ids.append(300 + t)
        bm.append_slot(seq)
        compute_all(bm, seq)
    assert len(seq) == 2 * BS
    other = make_seq(seq.token_ids + [1])
    bm.allocate(other)
    assert other.num_computed_tokens == 2 * BS
    assert other.block_table[:2] == seq.block_table[:2]
