"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
import itertools

from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.executor.step import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"    # preempted with eviction='copy': its K/V wait in host blocks (cpu_block_table)
    FINISHED = "finished"


_ids = itertools.count()
# A temperature above 0 but below this is raised to it (vLLM's _MAX_TEMP): logits divided by 1e-45 become
# infinite in float32, and the softmax of infinities is NaN.
MIN_TEMPERATURE = 0.01


class Sequence:
    def __init__(self, prompt_ids: list[int], gen: GenerationConfig, max_tokens: int, seed: int,
                 request_id: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.gen = gen
        self.max_tokens = max_tokens  # generation limit after session_len / max_length are applied
        self.seed = seed
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.cpu_block_table: list[int] = []  # host blocks holding its computed K/V while SWAPPED
        self.num_computed_tokens = 0   # tokens whose K/V are in the cache
        self.num_hashed_blocks = 0     # leading full blocks registered for prefix caching
        self.num_cached_prompt_tokens = 0  # prefix-cache hits at the last admission
        self.first_scheduled: float | None = None  # time.monotonic() of its first admission (queue time)
        self.finish_reason: str | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0   # the generated tokens' logprobs summed (best_of ranks choices by it)
        # gen.prompt_logprobs: per prompt position 1.., (its token's logprob, the top alternatives)
        self.prompt_logprobs: list[tuple[float, dict[int, float]]] = []
        self.grammar = None   # structured outputs: engine/structured.py's SequenceGrammar, advanced per token
        self.logit_bias = sorted(gen.logit_bias.items())   # as the sampler takes it (checked by the engine)
        self.bad_word_ids: list[list[int]] = []  # multi-token bad words: ban the last id after the rest
        self.banned_ids: list[int] = []      # always-banned ids (bad words)
        self.text = ""
        self.emitted_chars = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def sampling_params(self, eos_ids: set[int]) -> SamplingParams:
        """How to pick this sequence's next token, given what it generated so far."""
        gen, tokens = self.gen, self.token_ids
        generated = len(tokens) - self.num_prompt_tokens
        banned = self.banned_ids   # extended into a new list only when this step bans more
        for word in self.bad_word_ids:  # multi-token: ban its last id right after the rest
            if tokens[len(tokens) - len(word) + 1:] == word[:-1]:
                banned = banned + [word[-1]]
        if generated < gen.min_new_tokens and not gen.ignore_eos:
            banned = banned + list(eos_ids)
        # history: the sequence's own list, read during this step only (no copy)
        temperature = max(gen.temperature, MIN_TEMPERATURE) if gen.temperature else 0.0
        return SamplingParams(temperature, gen.greedy, gen.top_k, gen.top_p, self.seed, generated, banned,
                              gen.repetition_penalty, tokens, gen.logprobs, gen.presence_penalty,
                              gen.frequency_penalty, self.logit_bias, self.grammar)

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone; prompt and generated tokens will be prefilled again."""
        self.status = Status.WAITING
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
