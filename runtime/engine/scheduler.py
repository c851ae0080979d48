"""Continuous batching with chunked prefill (DeepSpeed-FastGen's Dynamic SplitFuse).

Every step spends a token budget: first one token for each running sequence that is decoding,
then chunks of prompts still being prefilled, then new requests join while blocks, batch slots
and budget last. A long prompt is therefore split across steps and shares each step with the
decodes. When a decode needs a block and none is free, the newest running sequence is
preempted. With eviction='recompute' its blocks are freed and it is recomputed later from its
tokens. With eviction='copy' its computed K/V are swapped out to host blocks (vLLM v0's swap) and
swapped back in before any waiting request is admitted, so it resumes where it stopped; while the
host blocks are full it falls back to recompute. A step that preempts swaps nothing in: it had no
room to spare.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int     # tokens to run this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so this step yields its next token."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


@dataclass
class SwapPlan:
    """One step's block copies, done by every rank before the step's forward (out first, then in)."""

    out: list[tuple[int, int]] = field(default_factory=list)   # (device block, host block)
    in_: list[tuple[int, int]] = field(default_factory=list)   # (host block, device block)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 eviction: str = "recompute"):
        if eviction not in ("recompute", "copy"):
            raise ValueError(f"eviction: {eviction!r} is not 'recompute' or 'copy'")
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eviction = eviction
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last is preempted first
        self.swapped: deque[Sequence] = deque()   # eviction='copy': preempted, K/V in host blocks; first back first
        self.swaps = SwapPlan()   # the copies the last schedule() planned (the engine puts them in the StepBatch)
        self.num_preemptions = 0
        self.num_swap_fallbacks = 0   # eviction='copy' preemptions recomputed because the host blocks were full

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> list[ScheduledSeq]:
        self.swaps = SwapPlan()
        preemptions_before = self.num_preemptions
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

        # 2. Swapped sequences come back first (they are older than any waiting one), unless this step
        # preempted: then there is no room to spare. Out-copies are planned before in-copies, so a host
        # block freed here is never a destination in the same step.
        if self.num_preemptions == preemptions_before:
            while (self.swapped and budget > 0 and len(self.running) < self.max_batch_size
                   and self.blocks.can_swap_in(self.swapped[0])):
                seq = self.swapped.popleft()
                self.swaps.in_ += self.blocks.swap_in(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
                n = min(seq.num_uncomputed, budget)
                (decodes if seq.num_uncomputed == 1 else prefills).append(ScheduledSeq(seq, n))
                budget -= n

        # 3. Admit waiting sequences while there is room (none while a swapped one still waits for room).
        now = None
        while not self.swapped and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
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
        self.num_preemptions += 1
        if self.eviction == "copy" and seq.num_computed_tokens:   # nothing computed: recompute costs nothing
            if self.blocks.can_swap_out(seq):
                self.swaps.out += self.blocks.swap_out(seq)
                seq.status = Status.SWAPPED
                self.swapped.appendleft(seq)
                return
            self.num_swap_fallbacks += 1
            log.log(logging.WARNING if self.num_swap_fallbacks == 1 else logging.DEBUG,
                    "eviction='copy': %d host blocks free, sequence %s needs %d; recomputing it instead "
                    "(%d such fallbacks so far; raise num_cpu_blocks to swap more)", self.blocks.num_cpu_free,
                    seq.request_id, self.blocks.blocks_for(seq.num_computed_tokens), self.num_swap_fallbacks)
        self.blocks.free_blocks(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

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
        elif seq in self.swapped:
            self.swapped.remove(seq)
            self.blocks.free_host_blocks(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free_blocks(seq)
