"""Continuous batching with chunked prefill (DeepSpeed-FastGen's Dynamic SplitFuse).

Every step spends a token budget: first one token for each running sequence that is decoding,
then chunks of prompts still being prefilled, then new requests join while blocks, batch slots
and budget last. A long prompt is therefore split across steps and shares each step with the
decodes. When a decode needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int     # tokens to run this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so this step yields its next token."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []

        # 1. Running sequences: decodes first (each one token), then unfinished prefills.
        for seq in [s for s in self.running if s.num_uncomputed == 1]:
            if budget == 0:
                break
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.append_slot(seq)
            decodes.append(ScheduledSeq(seq, 1))
            budget -= 1
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed > 1:
                n = min(seq.num_uncomputed, budget)
                prefills.append(ScheduledSeq(seq, n))
                budget -= n

        # 2. Admit waiting sequences while there is room.
        now = None
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            if seq.first_scheduled is None:   # its queue time ends here (a preempted one keeps the first)
                now = now or time.monotonic()
                seq.first_scheduled = now
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            prefills.append(ScheduledSeq(seq, n))
            budget -= n
        return decodes + prefills

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def advance(self, scheduled: list[ScheduledSeq]) -> None:
        """Record that the step computed the scheduled tokens' K/V."""
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            self.blocks.register_computed(item.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free_blocks(seq)
