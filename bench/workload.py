"""The seeded workload of `kubellm bench offline` and `bench parallel`: prompts of words drawn from a
small vocabulary (the random-weight checkpoint's tokenizer holds the same words), lengths uniform or
long-tailed, and the engine's run over it."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from kubellm.runtime.config import GenerationConfig

WORDS = ("the of and to in is was for on that with as by at from it an be this which or are his "
         "model data city river music light paper stone garden winter system market story").split()


@dataclass
class Workload:
    prompts: list[list[int]]
    max_new_tokens: list[int]

    @property
    def generated_tokens(self) -> int:
        return sum(self.max_new_tokens)


LONGTAIL_MEDIAN = 64   # tokens, for both prompts and replies
LONGTAIL_SIGMA = (0.8, 1.0)  # log-normal spread of prompt and reply lengths


def _length(rng: random.Random, bounds: tuple[int, int], lengths: str, sigma: float) -> int:
    if lengths == "uniform":
        return rng.randint(*bounds)
    return min(max(round(rng.lognormvariate(math.log(LONGTAIL_MEDIAN), sigma)), bounds[0]), bounds[1])


def make_workload(tokenizer, num_prompts: int, prompt_len: tuple[int, int], new_tokens: tuple[int, int],
                  seed: int, lengths: str = "longtail") -> Workload:
    if lengths not in ("uniform", "longtail"):
        raise ValueError(f"lengths: {lengths!r} is not one of 'uniform', 'longtail'")
    rng = random.Random(seed)
    prompts, limits = [], []
    for _ in range(num_prompts):
        n = _length(rng, prompt_len, lengths, LONGTAIL_SIGMA[0])
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(n)), add_special_tokens=False)[:n]
        prompts.append(ids)
        limits.append(_length(rng, new_tokens, lengths, LONGTAIL_SIGMA[1]))
    return Workload(prompts, limits)


def run_engine(engine, work: Workload, progress=None) -> float:
    """Seconds the engine takes for the workload; `progress` (bench/progress.py) counts its generated tokens."""
    gens = [GenerationConfig(max_new_tokens=m, ignore_eos=True) for m in work.max_new_tokens]
    start = time.perf_counter()
    if progress is None:
        seqs = engine.generate(work.prompts, gens)
    else:  # generate()'s loop, counting tokens after each step
        seqs = [engine.add_request(p, g) for p, g in zip(work.prompts, gens)]
        while any(not s.is_finished for s in seqs):
            engine.step()
            progress.set(sum(s.num_generated for s in seqs))
    elapsed = time.perf_counter() - start
    assert [s.num_generated for s in seqs] == work.max_new_tokens
    return elapsed


# --------------------------------------------------------------------------- shared-prefix (bench serve)


@dataclass
class SharedPrefixWorkload:
    """A few long system prompts shared by many requests, each with a short user turn of its own."""
    system_prompts: list[str]
    requests: list[tuple[int, str]]   # (index of its system prompt, the whole prompt text)


def make_shared_prefix_workload(num_system_prompts: int, system_words: int, user_words: int, num_requests: int,
                                seed: int) -> SharedPrefixWorkload:
    """Text only (the benchmark's client has no tokenizer); each request's system prompt drawn uniformly,
    so that no fixed order lines prompts up with replicas by chance."""
    for name, value in (("system prompts", num_system_prompts), ("system words", system_words),
                        ("user words", user_words), ("requests", num_requests)):
        if value < 1:
            raise ValueError(f"shared-prefix workload: {name} must be >= 1 (got {value})")
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(system_words)) for _ in range(num_system_prompts)]
    requests = []
    for _ in range(num_requests):
        i = rng.randrange(num_system_prompts)
        user = " ".join(rng.choice(WORDS) for _ in range(user_words))
        requests.append((i, f"{systems[i]}\n\nUser: {user}\nAssistant:"))
    return SharedPrefixWorkload(systems, requests)
