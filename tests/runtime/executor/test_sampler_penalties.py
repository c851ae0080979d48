"""Sampler: OpenAI's presence / frequency penalties, logit_bias and grammar masks, batched, against a plain
per-row reference (a Python loop over each row's tokens, the formulas as OpenAI writes them)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.engine.sequence import Sequence
from kubellm.runtime.executor.sampler import SamplingBatch, apply_bitmask, gumbel_noise, sample

VOCAB = 301   # not a multiple of 32: the bitmask's last word is partly padding


class AllowedSet:
    """A stand-in grammar: a fixed set of allowed tokens, filled the way engine/structured.py's is (fill_rows)."""

    def __init__(self, allowed):
        self.allowed = sorted(allowed)

    @classmethod
    def fill_rows(cls, grammars, bitmask, rows):
        bitmask[rows] = 0
        for row, g in zip(rows, grammars):
            for t in g.allowed:
                word = int(bitmask[row, t // 32]) & 0xFFFFFFFF | (1 << (t % 32))
                bitmask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word


def make_seq(rng: random.Random, i: int) -> Sequence:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
    options = {"temperature": rng.choice([0.0, 0.7, 1.0, 1.5]),
               "presence_penalty": rng.choice([0.0, 0.5, -1.0, 2.0]),
               "frequency_penalty": rng.choice([0.0, 0.3, -0.5, 2.0]),
               "logit_bias": {rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randint(0, 4))}}
    s = Sequence(prompt, GenerationConfig.build(**options), max_tokens=64, seed=1000 + i)
    # generated tokens drawn from a few ids, so that counts above 1 occur; some also in the prompt (not penalised)
    s.token_ids.extend(rng.choice(prompt + [5, 6, 7]) for _ in range(rng.randint(0, 12)))
    if rng.random() < 0.4:
        s.grammar = AllowedSet(rng.sample(range(VOCAB), rng.randint(1, 40)))
    return s


def reference_logits(logits: torch.Tensor, s: Sequence) -> torch.Tensor:
    """One row as OpenAI describes it: mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j], then the mask."""
    out = logits.clone()
    for token, count in Counter(s.generated_ids).items():
        out[token] = out[token] + -(count * s.gen.frequency_penalty + s.gen.presence_penalty)
    for token, bias in sorted(s.gen.logit_bias.items()):
        out[token] = out[token] + bias
    if s.grammar is not None:
        allowed = torch.zeros(VOCAB, dtype=torch.bool)
        allowed[s.grammar.allowed] = True
        out[~allowed] = float("-inf")
    return out


@pytest.mark.parametrize("seed", range(6))
def test_penalties_bias_and_masks_match_the_per_row_reference(seed):
    rng = random.Random(seed)
    seqs = [make_seq(rng, i) for i in range(rng.randint(1, 12))]
    params = [s.sampling_params(set()) for s in seqs]
    logits = torch.randn(len(seqs), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    out = sample(logits.clone(), SamplingBatch.from_params(params, "cpu"))
    noise = gumbel_noise(torch.tensor([p.seed for p in params]), torch.tensor([p.step for p in params]), VOCAB)
    raw = logits.log_softmax(-1)
    for row, s in enumerate(seqs):
        ref = reference_logits(logits[row], s)
        expected = ref.argmax() if s.gen.greedy else (ref / max(s.gen.temperature, 0.01) + noise[row]).argmax()
        assert out.token_ids[row] == expected.item(), f"row {row}"
        if s.grammar is not None:
            assert out.token_ids[row] in s.grammar.allowed
        # the chosen token's logprob is the model's own, before any of these (as with repetition_penalty)
        assert out.logprobs[row] == pytest.approx(raw[row, out.token_ids[row]].item(), abs=1e-4)


def test_penalties_count_generated_tokens_only():
    # token 3 is in the prompt only, token 4 generated twice: presence 1 + frequency 2 x 2 = 5 off token 4's logit
    s = Sequence([3, 3, 3], GenerationConfig.build(presence_penalty=1.0, frequency_penalty=2.0), 64, seed=0)
    s.token_ids.extend([4, 4])
    logits = torch.zeros(1, 8)
    logits[0, 3], logits[0, 4], logits[0, 5] = 10.0, 14.9, 9.95
    # greedy: 14.9 - 5 = 9.9 < 9.95 (token 5) < 10 (token 3, unpenalised)
    assert sample(logits.clone(), SamplingBatch.from_params([s.sampling_params(set())], "cpu")).token_ids == [3]


def test_logit_bias_can_force_and_ban():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    forced = Sequence([1], GenerationConfig.build(temperature=1.0, logit_bias={17: 100}), 64, seed=3)
    banned_top = int(logits[1].argmax())
    banned = Sequence([1], GenerationConfig.build(logit_bias={banned_top: -100}), 64, seed=3)
    out = sample(logits.clone(), SamplingBatch.from_params([forced.sampling_params(set()),
                                                            banned.sampling_params(set())], "cpu"))
    assert out.token_ids[0] == 17 and out.token_ids[1] != banned_top


def test_rows_without_these_options_build_no_tensors():
    b = SamplingBatch.from_params([Sequence([1, 2], GenerationConfig(), 64, seed=0).sampling_params(set())], "cpu")
    assert b.presence is None and b.bias_rows is None and b.grammars is None


@pytest.mark.parametrize("kernel", ["torch", "xgrammar"])
def test_apply_bitmask_unpacks_every_bit_including_the_sign_bit(kernel):
    from kubellm.runtime.engine.structured import SequenceGrammar

    logits = torch.zeros(3, 70)
    bitmask = torch.full((3, 3), -1, dtype=torch.int32)
    bitmask[0] = torch.tensor([-2 ** 31, 0, 0b10 | 0b1000])   # token 31 (the sign bit), tokens 65 and 67
    bitmask[1, 0] = 0                                          # row 1 is not constrained: its bits are not read
    bitmask[2] = torch.tensor([0, 1, 0])                       # token 32
    out = apply_bitmask(logits.clone(), bitmask, [0, 2], SequenceGrammar.apply_rows if kernel == "xgrammar" else None)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [31, 65, 67]
    assert torch.isfinite(out[1]).all()   # an unconstrained row is untouched
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [32]
