"""The paged KV cache's bookkeeping: which blocks each sequence holds, and which can be shared.

Blocks are ref-counted. A block that is full and whose K/V have been computed is registered
under a hash of its tokens chained with the previous block's hash, so a later prompt with the
same prefix reuses it instead of recomputing. Freed blocks keep their contents (and stay
findable by hash) until they are handed out again, oldest first.

With eviction='copy' a second pool of host blocks holds preempted sequences' K/V (vLLM v0's swap):
`swap_out` plans device -> host copies and frees the device blocks, `swap_in` plans host -> device
copies into newly taken blocks. Only ids are planned here; every rank's ModelRunner does the copies
on its own cache shard before the step's forward.
"""

from __future__ import annotations

import hashlib
import struct

from kubellm.runtime.engine.sequence import Sequence


def block_hash(token_ids: list[int], previous: bytes | None) -> bytes:
    h = hashlib.blake2b(previous or b"", digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def hash_root(seq: Sequence) -> bytes | None:
    """What a sequence's first block hash starts from: a LoRA adapter computes other keys and values for
    the same tokens, so each adapter (and the base model) has prefix-cache entries of its own."""
    return None if seq.gen.adapter is None else b"lora:" + seq.gen.adapter.encode()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_cpu_blocks: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[bytes, int] = {}
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered set
        self.prefix_hits = 0      # tokens served from the prefix cache, for metrics and tests
        self.prefix_queries = 0
        self.num_cpu_blocks = num_cpu_blocks
        self.cpu_free: dict[int, None] = dict.fromkeys(range(num_cpu_blocks))  # host blocks; each held by one sequence
        self.swapped_out_blocks = 0   # device -> host block copies planned (cumulative, for metrics and tests)
        self.swapped_in_blocks = 0    # host -> device block copies planned

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> int:
        block_id = next(iter(self.free))
        del self.free[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, [], 1
        return block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of registered blocks matching the sequence's leading full blocks.

        At least one token is always left to compute, so the last block of a fully cached
        prompt is recomputed rather than shared (the step needs its logits).
        """
        return self._prefix_hits(seq, (len(seq) - 1) // self.block_size)

    def _prefix_hits(self, seq: Sequence, most: int) -> list[int]:
        """Ids of registered blocks holding the sequence's leading full blocks, at most `most`."""
        if not self.enable_prefix_caching:
            return []
        bs, token_ids = self.block_size, seq.token_ids
        hits, previous = [], hash_root(seq)
        for i in range(most):
            tokens = token_ids[i * bs:(i + 1) * bs]
            previous = block_hash(tokens, previous)
            block_id = self.hash_to_block.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= self.blocks_for(len(seq))

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        # prompt_logprobs need every prompt position's logits: a prompt that still owes them is computed whole
        owes = seq.gen.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens - 1
        hits = [] if owes else self._cached_prefix(seq)
        self._share(hits)
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_for(len(seq)) - len(hits))]
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_prompt_tokens = seq.num_computed_tokens
        self.prefix_hits += seq.num_computed_tokens
        self.prefix_queries += len(seq)

    def _share(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= self.blocks_for(len(seq)) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the block table covers every token (a decode may need one new block)."""
        while len(seq.block_table) < self.blocks_for(len(seq)):
            seq.block_table.append(self._take_free())

    def register_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly full, computed blocks for prefix reuse."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while seq.num_hashed_blocks < seq.num_computed_tokens // bs:
            i = seq.num_hashed_blocks
            previous = self.blocks[seq.block_table[i - 1]].hash if i else hash_root(seq)
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = block_hash(tokens, previous), tokens
            self.hash_to_block.setdefault(block.hash, block.block_id)
            seq.num_hashed_blocks += 1

    def free_blocks(self, seq: Sequence) -> None:
        # Release in reverse so a sequence's tail blocks are reused before its shareable head.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []

    # -- swapping to host blocks (eviction='copy') ---------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        """Host blocks are free for every block holding the sequence's computed K/V."""
        return len(self.cpu_free) >= self.blocks_for(seq.num_computed_tokens)

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Plan the copies (device block, host block) of the blocks holding the sequence's computed K/V,
        then release its device blocks. A block another sequence shares (a prefix-cache hit) is copied
        but keeps that sequence's reference: only this sequence's is dropped, nothing is freed under it."""
        assert self.can_swap_out(seq) and not seq.cpu_block_table
        plan = []
        for block_id in seq.block_table[:self.blocks_for(seq.num_computed_tokens)]:
            cpu_id = next(iter(self.cpu_free))
            del self.cpu_free[cpu_id]
            plan.append((block_id, cpu_id))
        seq.cpu_block_table = [cpu_id for _, cpu_id in plan]
        self.free_blocks(seq)   # registered blocks stay findable by hash until handed out again
        self.swapped_out_blocks += len(plan)
        return plan

    def can_swap_in(self, seq: Sequence) -> bool:
        return self.num_free >= self.blocks_for(len(seq))

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Give a swapped sequence device blocks for all its tokens again and plan the copies (host block,
        device block) of its saved K/V. Leading full blocks still in the prefix cache (its own, freed by the
        swap-out and not handed out since, or another sequence's with the same tokens) are shared, not copied."""
        assert not seq.block_table
        saved = seq.cpu_block_table
        hits = self._prefix_hits(seq, min(seq.num_computed_tokens // self.block_size, len(saved)))
        self._share(hits)
        table, plan = list(hits), []
        for cpu_id in saved[len(hits):]:
            table.append(self._take_free())
            plan.append((cpu_id, table[-1]))
        table += [self._take_free() for _ in range(self.blocks_for(len(seq)) - len(table))]
        seq.block_table, seq.cpu_block_table = table, []
        for cpu_id in saved:   # read by this step's copies, before any later step can write them
            self.cpu_free[cpu_id] = None
        seq.num_hashed_blocks = len(hits)
        self.register_computed(seq)   # the copied full blocks are findable again (their K/V land before the forward)
        self.swapped_in_blocks += len(plan)
        return plan

    def free_host_blocks(self, seq: Sequence) -> None:
        """A swapped sequence ends (aborted) without coming back."""
        for cpu_id in seq.cpu_block_table:
            self.cpu_free[cpu_id] = None
        seq.cpu_block_table = []

    @property
    def num_cpu_free(self) -> int:
        return len(self.cpu_free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks
