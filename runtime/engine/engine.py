"""The engine: requests in, one scheduled model step at a time, token and text deltas out."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass

from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.config import (EngineConfig, GenerationConfig, generation_problem, max_new_tokens_problem,
                                    prompt_count_problem)
from kubellm.runtime.errors import EngineFullError, RequestError
from kubellm.runtime.executor.executor import create_executor
from kubellm.runtime.executor.layers.long_context import max_session_len
from kubellm.runtime.executor.load_times import LoadTimes
from kubellm.runtime.executor.loader import check_model_dir, load_hf_config
from kubellm.runtime.executor.lora import adapter_slots
from kubellm.runtime.executor.step import SeqChunk, StepBatch
from kubellm.runtime.engine.scheduler import ScheduledSeq, Scheduler, SwapPlan
from kubellm.runtime.engine.sequence import Sequence
from kubellm.runtime.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class StepOutput:
    seq: Sequence
    delta_text: str
    new_token_ids: list[int]
    finished: bool


def step_batch(scheduled: list[ScheduledSeq], swaps: SwapPlan | None = None,
               adapter_slots: dict[str, int] | None = None) -> StepBatch:
    """The executor's view of a step: each scheduled sequence's new tokens, its blocks and its LoRA
    adapter's slot, and the block copies of the sequences swapped out and in (eviction='copy')."""
    chunks = []
    for item in scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        adapter = adapter_slots[seq.gen.adapter] if seq.gen.adapter is not None else -1
        chunks.append(SeqChunk(start, seq.token_ids[start:start + item.num_tokens],
                               seq.block_table,   # read during this step only (pickled to other ranks): no copy
                               item.samples, adapter, prompt_logprobs_wanted(seq, start, item.num_tokens)))
    if swaps is None:
        return StepBatch(chunks)
    return StepBatch(chunks, swaps.out, swaps.in_)


def prompt_logprobs_wanted(seq: Sequence, start: int, num_tokens: int) -> tuple[int, int, list[int]] | None:
    """gen.prompt_logprobs: which positions of this chunk still owe the prompt their logprobs (position p's logits
    give token p + 1's; a recompute after preemption does not ask again for those it has)."""
    if seq.gen.prompt_logprobs is None:
        return None
    first = max(start, len(seq.prompt_logprobs))
    last = min(start + num_tokens, seq.num_prompt_tokens - 1)   # the last prompt position predicts no prompt token
    if first >= last:
        return None
    return first, seq.gen.prompt_logprobs, seq.token_ids[first + 1:last + 1]


def session_len_for(hf_config, config: EngineConfig) -> int:
    max_positions = getattr(hf_config, "max_position_embeddings", None) or 2048
    session_len = config.session_len or max_positions
    limit = max_session_len(hf_config, config)  # None: dynamic NTK scaling runs past max_position_embeddings
    if limit is not None and session_len > limit:
        raise ValueError(f"session_len: {session_len} exceeds the model's max_position_embeddings "
                         f"({max_positions}); lower it, or set rope_scaling_factor (dynamic NTK) to go past it")
    return session_len


class LLMEngine:
    def __init__(self, model: str | os.PathLike, config: EngineConfig | None = None, show_progress: bool = True,
                 rank_group=None, load_times: LoadTimes | None = None):
        """`rank_group`: the other ranks, already joined (several hosts, see `kubellm worker`); by
        default a world size above 1 starts its ranks on this host. `load_times`: filled with where the
        load's time goes (download, weights, warmup; a new one by default), kept as `self.load_times`."""
        from kubellm.runtime.hub.adapters import resolve_adapters
        from kubellm.runtime.hub.embedded import resolve_model

        started = time.monotonic()
        self.load_times = load_times if load_times is not None else LoadTimes()
        self.config = config or EngineConfig()
        with self.load_times.phase("download"):
            self.model_path = check_model_dir(resolve_model(model))
            if self.config.adapters:   # hf:// adapters downloaded like the model; directories checked
                self.config = self.config.updated(adapters=resolve_adapters(self.config.adapters, "adapters"))
        self.hf_config = load_hf_config(self.model_path)
        self.session_len = session_len_for(self.hf_config, self.config)
        with self.load_times.phase("weights"):
            self.tokenizer = Tokenizer(self.model_path)
        self.executor = create_executor(self.model_path, self.hf_config, self.config, self.session_len,
                                        show_progress, group=rank_group, load_times=self.load_times)
        # The host blocks exist on every rank only with eviction='copy' (ModelRunner.allocate_kv_cache).
        num_cpu_blocks = self.config.num_cpu_blocks if self.config.eviction == "copy" else 0
        self.block_manager = BlockManager(self.executor.num_kv_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching, num_cpu_blocks)
        self.scheduler = Scheduler(self.block_manager, self.config.max_batch_size, self.config.max_num_batched_tokens,
                                   self.config.eviction)
        self.adapter_slots = adapter_slots(self.config.adapters)
        self._seed_rng = random.Random(self.config.seed)
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._requests: dict[str, Sequence] = {}
        self._structured = None   # structured outputs' compiler, on the first constrained request
        self._structured_lock = threading.Lock()   # made by the engine thread or by a server's (prepare)
        self.load_times.total = time.monotonic() - started

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt, gen: GenerationConfig, request_id: str | None = None,
                    field: str = "prompt") -> Sequence:
        """Validate and queue one request. Raises RequestError / EngineFullError, never crashes the engine."""
        if len(self.scheduler.waiting) >= self.config.max_queue_size:
            raise EngineFullError(f"the engine queue is full ({self.config.max_queue_size} waiting); retry later")
        if problem := generation_problem(gen, self.config):   # before any work: the limits bound that work
            raise RequestError(problem)
        prompt_ids = self.tokenizer.encode_prompt(prompt, field, max_tokens=self.session_len - 1)
        max_tokens = self._generation_limit(len(prompt_ids), gen, field)
        seed = gen.random_seed if gen.random_seed is not None else self._seed_rng.getrandbits(32)
        seq = Sequence(prompt_ids, gen, max_tokens, seed, request_id)
        if seq.request_id in self._requests:
            raise RequestError(f"request_id: {seq.request_id!r} is already in flight; use a unique id")
        banned: set[int] = set()   # each id once: the sampler handles every banned id at every step
        for word in gen.bad_words:
            banned.update(self.tokenizer.ids_containing(word))
            seq.bad_word_ids.extend(ids for ids in self.tokenizer.word_ids(word) if len(ids) > 1)
        self._check_vocabulary(gen)
        if gen.guided_fields():
            seq.grammar = self._structured_outputs().grammar_for(gen)
            banned.update(self._structured.banned_ids)
        seq.banned_ids = sorted(banned)
        self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, prompt_ids, gen.skip_special_tokens)
        self._requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def _check_vocabulary(self, gen: GenerationConfig) -> None:
        vocab = self.hf_config.vocab_size
        if bad := [t for t in gen.logit_bias if t >= vocab]:
            raise RequestError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab}); bias ids "
                               "of this model's tokenizer")

    def _structured_outputs(self):
        """The engine's grammar compiler, made on the first constrained request (engine/structured.py)."""
        with self._structured_lock:
            if self._structured is None:
                from kubellm.runtime.engine.structured import StructuredOutputs

                self._structured = StructuredOutputs(self.tokenizer.hf, self.hf_config.vocab_size,
                                                     self.tokenizer.eos_token_ids)
        return self._structured

    def prepare(self, gens: list[GenerationConfig]) -> None:
        """Compile the structured-output constraints of `gens` (cached), from any thread: a server calls it before
        posting a request, so that the engine thread's add_request finds them compiled. Raises RequestError."""
        for gen in {id(g): g for g in gens if g.guided_fields()}.values():
            self._structured_outputs().compile(gen)

    def _generation_limit(self, prompt_len: int, gen: GenerationConfig, field: str) -> int:
        if prompt_len >= self.session_len:
            raise RequestError(f"{field}: the prompt is {prompt_len} tokens but session_len is {self.session_len}, "
                               "leaving no room to generate; shorten the prompt or raise session_len")
        if problem := max_new_tokens_problem(prompt_len, gen, self.session_len, field):
            raise RequestError(problem)
        limit = min(gen.max_new_tokens, self.session_len - prompt_len)
        if gen.max_length is not None:
            if gen.max_length <= prompt_len:
                raise RequestError(f"max_length: {gen.max_length} counts the prompt ({prompt_len} tokens) and "
                                   "leaves nothing to generate; raise max_length or use max_new_tokens")
            limit = min(limit, gen.max_length - prompt_len)
        needed = self.block_manager.blocks_for(prompt_len + limit)
        if needed > self.block_manager.num_blocks:
            raise RequestError(f"{field}: prompt + generation need {needed} KV blocks but the cache holds "
                               f"{self.block_manager.num_blocks}; lower max_new_tokens or give the cache more "
                               "memory (kv_cache_fraction / num_kv_blocks)")
        return limit

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is unknown or already finished."""
        seq = self._requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        self._forget(seq)
        return True

    def _forget(self, seq: Sequence) -> None:
        self._requests.pop(seq.request_id, None)
        self._detokenizers.pop(seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def runner(self):
        """Rank 0's model runner, for inspection (tests, benchmarks); steps go through the executor."""
        return self.executor.runner

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.has_work():  # admission checks make this unreachable; never spin silently
                raise RuntimeError("the scheduler could not place any waiting request in the KV cache")
            return []
        sampling_seqs = [item.seq for item in scheduled if item.samples]
        sampling = [seq.sampling_params(self.tokenizer.eos_token_ids) for seq in sampling_seqs]
        # A broken executor raises ExecutorBrokenError here, and from every later step.
        batch = step_batch(scheduled, self.scheduler.swaps, self.adapter_slots)
        result = self.executor.execute(batch, sampling)
        if result is not None and result.prompt_logprobs:
            for item, chunk in zip(scheduled, batch.chunks):
                if chunk.prompt_logprobs is not None:
                    item.seq.prompt_logprobs.extend(result.prompt_logprobs.pop(0))
        self.scheduler.advance(scheduled)
        outputs = []
        for row, seq in enumerate(sampling_seqs):
            outputs.append(self._append_token(seq, result.token_ids[row],
                                              result.logprobs[row] if result.logprobs else None,
                                              result.top_logprobs[row] if result.top_logprobs else None))
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob, top) -> StepOutput:
        gen = seq.gen
        seq.token_ids.append(token)
        if logprob is not None:
            seq.cumulative_logprob += logprob
        # The mask allowed only what the grammar accepts; a refusal means that every token was banned (EOS held off
        # by min_new_tokens where the grammar can only end): the sequence ends rather than emit invalid output.
        refused = seq.grammar is not None and not seq.grammar.accept(token)
        if gen.logprobs is not None:
            seq.logprobs.append(logprob)
            if gen.logprobs:
                seq.top_logprobs.append(dict(list(top.items())[: gen.logprobs]))
        reason = None
        if refused or (seq.grammar is not None and seq.grammar.finished):
            reason = "stop"   # no text: a token the grammar refused, or a stop token it took (ignore_eos too)
        elif token in self.tokenizer.eos_token_ids and not gen.ignore_eos:
            reason = "stop"  # the EOS token counts as generated but adds no text
        else:
            seq.text += self._detokenizers[seq.seq_id].delta(seq.token_ids)
            if gen.stop_words and seq.num_generated >= gen.min_new_tokens:
                reason = self._cut_at_stop_word(seq)
        if reason is None and seq.num_generated >= seq.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget(seq)
        # While a stop word may still be forming at the end, hold those characters back.
        hold = 0 if reason else max((len(w) for w in gen.stop_words), default=1) - 1
        visible = len(seq.text) - hold
        delta = seq.text[seq.emitted_chars:visible] if visible > seq.emitted_chars else ""
        seq.emitted_chars += len(delta)
        return StepOutput(seq, delta, [token], reason is not None)

    @staticmethod
    def _cut_at_stop_word(seq: Sequence) -> str | None:
        longest = max(len(w) for w in seq.gen.stop_words)
        search_from = max(0, seq.emitted_chars - longest)
        hits = [i for i in (seq.text.find(w, search_from) for w in seq.gen.stop_words) if i >= 0]
        if not hits:
            return None
        seq.text = seq.text[: min(hits)]
        return "stop"

    # -- convenience --------------------------------------------------------------------------
    def generate(self, prompts: list, gens: list[GenerationConfig]) -> list[Sequence]:
        """Run a batch to completion; sequences come back in prompt order."""
        if problem := prompt_count_problem(len(prompts), self.config):
            raise RequestError(problem)
        seqs = []
        try:
            for i, (prompt, gen) in enumerate(zip(prompts, gens)):
                seqs.append(self.add_request(prompt, gen, field=f"prompts[{i}]"))
            while any(not s.is_finished for s in seqs):
                self.step()
        except BaseException:
            for seq in seqs:  # all or nothing: a bad prompt or a failed step leaves no orphans to fail the next call
                self.abort(seq.request_id)
            raise
        return seqs

    def destroy(self) -> None:
        """Release the model and KV cache."""
        import gc

        import torch

        for seq in list(self._requests.values()):
            self.abort(seq.request_id)
        self.executor.shutdown()
        del self.executor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
