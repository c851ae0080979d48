"""The step contract between the engine and the executor.

The engine turns its scheduled sequences into a `StepBatch` (plain values, no engine objects) and
hands it to an `Executor`, with one `SamplingParams` per row that yields a token. Rank 0's runner
and every follower rank consume the same `StepBatch`: a rank group pickles it as it is. Nothing
here imports torch or the engine, so both sides (and a follower unpickling a batch) can use it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubellm.runtime.executor.model_runner import ModelRunner
    from kubellm.runtime.executor.sampler import SampleOutput


@dataclass(slots=True)
class SeqChunk:
    """One sequence's tokens in a step: those at positions start .. start + num_tokens - 1."""

    start: int              # tokens of the sequence already in the KV cache
    token_ids: list[int]    # the tokens this step computes
    block_table: list[int]  # the sequence's KV blocks, in order (covers every position of the chunk)
    samples: bool           # the chunk ends the sequence, so this step yields its next token
    adapter: int = -1       # the LoRA adapter's slot (executor/lora.py adapter_slots); -1: the base model
    # prompt_logprobs: (first position, top alternatives, the prompt tokens that follow positions first, first + 1,
    # ...): the logprobs of those tokens at those positions of the chunk are wanted (rank 0's SampleOutput)
    prompt_logprobs: tuple[int, int, list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the cache once the chunk is computed."""
        return self.start + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start > 0


@dataclass(slots=True)
class StepBatch:
    """What one step computes: the scheduler's chunks, decodes first, then prefill chunks; and, with
    eviction='copy', the KV blocks every rank copies on its own cache shard before the forward: out
    (device -> host) first, then in (host -> device)."""

    chunks: list[SeqChunk] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)   # (device block, host block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)    # (host block, device block)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_samples(self) -> int:
        """Rows that yield a token (their logits are wanted)."""
        return sum(1 for c in self.chunks if c.samples)

    def micro_batches(self, count: int) -> list[list[SeqChunk]]:
        """The chunks cut into `count` pipeline micro-batches (see split_micro_batches)."""
        return split_micro_batches(self.chunks, count)


def split_micro_batches(chunks: list, count: int) -> list[list]:
    """Consecutive runs of sequences with about equal token counts (order kept: decodes stay first)."""
    count = max(1, min(count, len(chunks)))
    total = sum(item.num_tokens for item in chunks)
    out, current, done = [], [], 0
    for i, item in enumerate(chunks):
        current.append(item)
        done += item.num_tokens
        left_items, left_chunks = len(chunks) - i - 1, count - len(out) - 1
        if left_chunks and (done >= total * (len(out) + 1) / count or left_items == left_chunks):
            out.append(current)
            current = []
    out.append(current)
    return out


@dataclass(slots=True)
class SamplingParams:
    """How to pick one row's next token, as plain values (the executor makes the tensors)."""

    temperature: float
    greedy: bool
    top_k: int
    top_p: float
    seed: int
    step: int                        # tokens generated so far: the position in the seed's random stream
    banned_ids: list[int]            # ids that may not come next (bad words, EOS before min_new_tokens)
    repetition_penalty: float = 1.0
    history: list[int] = field(default_factory=list)   # tokens seen so far (read for the penalty)
    logprobs: int | None = None      # None: no logprobs; n: the chosen token's and the top n
    presence_penalty: float = 0.0    # OpenAI's, on the generated tokens (the last `step` of history)
    frequency_penalty: float = 0.0
    logit_bias: list[tuple[int, float]] = field(default_factory=list)   # (token id, bias added to its logit)
    # The request's grammar (engine/structured.py's SequenceGrammar), or None. Rank 0's sampler asks it for the
    # row's allowed tokens (`fill_rows(grammars, bitmask, rows)` on its class, the whole batch at once) after the
    # forward is launched, so the masks are computed while the device runs the model. It stays in rank 0's
    # process: only the StepBatch is sent to the other ranks.
    grammar: object | None = None


class Executor(ABC):
    """Runs the engine's steps on the model: one rank here (LocalExecutor) or a tensor × pipeline group
    of ranks (RankGroup). A group's failure is raised as ExecutorBrokenError, from every step on."""

    runner: "ModelRunner"   # this process's rank (rank 0); for inspection (tests, benchmarks)
    num_kv_blocks: int      # KV cache blocks every rank holds

    @abstractmethod
    def execute(self, batch: StepBatch, sampling: list[SamplingParams]) -> "SampleOutput | None":
        """Run one step; the sampled tokens of the rows that sample (None when no row does)."""

    @property
    def broken(self) -> bool:
        """True once the executor cannot run another step."""
        return False

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the ranks and release the process group (idempotent)."""
