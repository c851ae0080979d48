"""Sampler: counter-based Gumbel noise, top-k/top-p filter vs a slow reference, penalties, bans, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from kubellm.kernels.sampling import top_k_top_p_filter
from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.executor.sampler import SamplingBatch, gumbel_noise, sample
from kubellm.runtime.engine.sequence import Sequence

EULER_GAMMA = 0.5772156649015329


def seq(tokens=(1, 2, 3), seed=0, generated=(), **gen) -> Sequence:
    s = Sequence(list(tokens), GenerationConfig.build(**gen), max_tokens=64, seed=seed)
    s.token_ids.extend(generated)
    return s


def batch(seqs, eos=()):
    return SamplingBatch.from_params([s.sampling_params(set(eos)) for s in seqs], "cpu")


# ---------------------------------------------------------------- Gumbel noise


def test_gumbel_noise_is_deterministic_per_seed_and_step():
    seeds = torch.tensor([0, 1, 2, 12345], dtype=torch.int64)
    steps = torch.tensor([0, 0, 5, 7], dtype=torch.int64)
    a = gumbel_noise(seeds, steps, 64)
    b = gumbel_noise(seeds.clone(), steps.clone(), 64)
    assert a.shape == (4, 64)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_gumbel_noise_does_not_depend_on_the_batch():
    seeds = torch.tensor([3, 99, 7], dtype=torch.int64)
    steps = torch.tensor([4, 0, 11], dtype=torch.int64)
    together = gumbel_noise(seeds, steps, 32)
    for i in range(3):
        alone = gumbel_noise(seeds[i:i + 1], steps[i:i + 1], 32)
        assert torch.equal(together[i], alone[0])
    # The first V columns don't change when the vocab grows (noise is per token id).
    assert torch.equal(gumbel_noise(seeds, steps, 64)[:, :32], together)


def test_gumbel_noise_differs_across_seeds_and_steps():
    v = 256
    base = gumbel_noise(torch.tensor([5]), torch.tensor([3]), v)[0]
    other_seed = gumbel_noise(torch.tensor([6]), torch.tensor([3]), v)[0]
    other_step = gumbel_noise(torch.tensor([5]), torch.tensor([4]), v)[0]
    for other in (other_seed, other_step):
        assert (base != other).float().mean() > 0.99
        # Not just shifted or permuted copies: essentially uncorrelated.
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1]) < 0.25
    # Many (seed, step) pairs: all rows distinct.
    seeds = torch.arange(50).repeat_interleave(20)
    steps = torch.arange(20).repeat(50)
    rows = gumbel_noise(seeds, steps, 16)
    assert len({tuple(r.tolist()) for r in rows}) == 1000


def test_gumbel_noise_distribution():
    seeds = torch.arange(64, dtype=torch.int64)
    steps = torch.arange(64, dtype=torch.int64) * 3
    x = gumbel_noise(seeds, steps, 4096).double().flatten()  # 262k samples
    assert abs(x.mean().item() - EULER_GAMMA) < 0.015
    assert abs(x.var().item() - math.pi ** 2 / 6) < 0.03
    # CDF exp(-exp(-x)) at a few points.
    for t in (-1.0, 0.0, 0.5, 1.0, 2.5):
        expected = math.exp(-math.exp(-t))
        assert abs((x <= t).double().mean().item() - expected) < 0.005, t


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_gumbel_max_reproduces_softmax(vary):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log() + 1.7  # an offset must not matter
    n = 20000
    if vary == "seed":
        seeds, steps = torch.arange(n), torch.zeros(n, dtype=torch.int64)
    else:
        seeds, steps = torch.full((n,), 42), torch.arange(n)
    chosen = (logits.unsqueeze(0) + gumbel_noise(seeds, steps, 4)).argmax(-1)
    freq = torch.bincount(chosen, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq


# ---------------------------------------------------------------- top-k / top-p filter


def reference_filter(row: list[float], k: int, p: float) -> list[bool]:
    """Which tokens survive: top-k first (0 = all), then the smallest prefix of the renormalised
    top-k distribution, in descending order, whose mass reaches p (the top token always)."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if k > 0:
        order = order[:k]
    finite = [row[i] for i in order if row[i] != -math.inf]
    m = max(finite)
    z = sum(math.exp(row[i] - m) for i in order if row[i] != -math.inf)
    keep = [False] * len(row)
    mass = 0.0
    for rank, i in enumerate(order):
        if rank > 0 and mass >= p:
            break
        keep[i] = True
        mass += math.exp(row[i] - m) / z if row[i] != -math.inf else 0.0
    return keep


def _near_boundary(row, k, p, i, tol=1e-5) -> bool:
    """Float32 vs float64 may disagree only when the mass before token i is within tol of p."""
    order = sorted(range(len(row)), key=lambda j: -row[j])
    if k > 0:
        order = order[:k]
    if i not in order:
        return False
    m = max(row)
    z = sum(math.exp(row[j] - m) for j in order)
    before = sum(math.exp(row[j] - m) for j in order[:order.index(i)]) / z
    return abs(before - p) < tol


def test_filter_matches_reference_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    b, v = 48, 37
    logits = torch.randn(b, v, generator=gen) * 2.5
    logits[5, [0, 3, 9]] = -math.inf  # rows may carry banned (-inf) tokens
    logits[17, 4:] = -math.inf
    top_k = torch.randint(0, 12, (b,), generator=gen)
    top_k[:6] = torch.tensor([0, 0, 1, v, v + 10, 3])
    top_p = torch.rand(b, generator=gen) * 0.98 + 0.02
    top_p[:6] = torch.tensor([1.0, 0.3, 1.0, 1.0, 0.5, 1.0])
    top_p[10] = 1e-6
    out = top_k_top_p_filter(logits.clone(), top_k, top_p)
    assert out.shape == logits.shape
    for r in range(b):
        row = logits[r].tolist()
        keep = reference_filter(row, int(top_k[r]), float(top_p[r]))
        for i in range(v):
            got_kept = out[r, i].item() != -math.inf
            if got_kept != keep[i] and not (row[i] == -math.inf):
                assert _near_boundary(row, int(top_k[r]), float(top_p[r]), i), (r, i)
            if got_kept:  # surviving logits are untouched
                assert out[r, i].item() == row[i]
        # The top token always survives.
        assert out[r, int(logits[r].argmax())].item() == logits[r].max().item()
    # Spot-check the special rows exactly.
    assert torch.equal(out[0], logits[0])                   # k=0, p=1: nothing filtered
    assert torch.equal(out[3], logits[3])                   # k=V
    assert torch.equal(out[4] == -math.inf, torch.tensor(reference_filter(logits[4].tolist(), 0, 0.5))
                       .logical_not())
    assert (out[2] != -math.inf).sum() == 1                 # k=1
    assert (out[10] != -math.inf).sum() == 1                # tiny p
    assert torch.equal((out[5] != -math.inf).nonzero().flatten().sort().values,  # k=3, p=1, some -inf
                       logits[5].topk(3).indices.sort().values)
    assert (out[17] != -math.inf).sum() <= 4                # only 4 finite logits to begin with


@pytest.mark.parametrize("p, kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4), (1.0, 4)])
def test_top_p_stops_as_soon_as_the_mass_reaches_p(p, kept):
    # Four equal logits: probabilities 0.25 each, exactly representable, so no rounding.
    logits = torch.zeros(2, 4)
    logits[1] = 3.0
    out = top_k_top_p_filter(logits.clone(), torch.tensor([0, 0]), torch.tensor([p, p]))
    assert ((out != -math.inf).sum(-1) == kept).all()


def test_top_k_ties_keep_exactly_k():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = top_k_top_p_filter(logits.clone(), torch.tensor([2]), torch.tensor([1.0]))
    assert (out != -math.inf).sum() == 2


def test_top_p_one_never_filters_even_peaked_rows():
    # A peaked row (e.g. after a low temperature): every tail token has a positive probability.
    logits = torch.tensor([[20.0, 0.0, 0.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert (logits.softmax(-1) > 0).all()
    out = top_k_top_p_filter(logits.clone(), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert torch.equal(out, logits)


def test_filter_matches_transformers_warpers():
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(1)
    v = 50
    logits = torch.randn(16, v, generator=gen) * 2
    ks = [0, 1, 2, 5, 10, 0, 3, 20, 0, 7, 50, 4, 0, 9, 1, 6]
    ps = [0.9, 1.0, 0.5, 0.95, 0.3, 0.1, 1.0, 0.8, 0.6, 0.99, 0.7, 0.45, 1.0, 0.2, 0.9, 0.85]
    out = top_k_top_p_filter(logits.clone(), torch.tensor(ks), torch.tensor(ps))
    for r, (k, p) in enumerate(zip(ks, ps)):
        scores = logits[r:r + 1].clone()
        if k:
            scores = transformers.TopKLogitsWarper(top_k=k)(None, scores)
        if p < 1.0:
            scores = transformers.TopPLogitsWarper(top_p=p)(None, scores)
        assert torch.equal(out[r] == -math.inf, scores[0] == -math.inf), r


# ---------------------------------------------------------------- sample()


def test_all_greedy_rows_equal_argmax():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 40, generator=gen)
    seqs = [seq(seed=i) for i in range(5)] + [seq(seed=9, temperature=0.8, top_k=1)]  # top_k=1 is greedy
    b = batch(seqs)
    assert b.greedy.all()
    out = sample(logits.clone(), b)
    assert out.token_ids == logits.argmax(-1).tolist()
    # The chosen tokens' logprobs come back unasked (a sequence's cumulative logprob); no alternatives
    assert out.logprobs == pytest.approx(logits.log_softmax(-1).max(-1).values.tolist(), abs=1e-5)
    assert out.top_logprobs is None


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 40, generator=gen)
    seqs = [seq(seed=i, temperature=1.5 if i % 2 else 0.0, top_p=0.9) for i in range(8)]
    out = sample(logits.clone(), batch(seqs))
    for i in range(0, 8, 2):
        assert out.token_ids[i] == int(logits[i].argmax())


def test_sample_does_not_modify_logits():
    logits = torch.randn(3, 20)
    before = logits.clone()
    seqs = [seq(temperature=1.0, top_k=5, repetition_penalty=1.3, seed=1, logprobs=2),
            seq(seed=2), seq(temperature=0.5, top_p=0.5, seed=3)]
    seqs[1].banned_ids = [4]
    sample(logits, batch(seqs, eos=[0]))
    assert torch.equal(logits, before)


def test_sampled_rows_follow_softmax_with_temperature_top_k_and_top_p():
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5])
    logits = probs.log()
    n = 3000

    def freqs(**gen):
        seqs = [seq(seed=s, **gen) for s in range(n)]
        out = sample(logits.expand(n, 4).clone(), batch(seqs))
        return torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n

    expected_t = (logits / 0.5).softmax(-1)
    assert torch.allclose(freqs(temperature=1.0), probs, atol=0.03)
    assert torch.allclose(freqs(temperature=0.5), expected_t, atol=0.03)
    top2 = torch.tensor([0.0, 0.0, 0.375, 0.625])
    assert torch.allclose(freqs(temperature=1.0, top_k=2), top2, atol=0.03)
    # p=0.75: 0.5 alone doesn't reach it, 0.5 + 0.3 does -> tokens 3 and 2, renormalised.
    assert torch.allclose(freqs(temperature=1.0, top_p=0.75), top2, atol=0.03)


def test_same_seed_same_token_whatever_the_batch():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 30, generator=gen)
    seqs = [seq(seed=100 + i, temperature=1.0, top_k=10 if i % 2 else 0, generated=[7] * i) for i in range(5)]
    together = sample(logits.clone(), batch(seqs)).token_ids
    for i in range(5):
        assert sample(logits[i:i + 1].clone(), batch([seqs[i]])).token_ids == [together[i]]
    # A different seed gives different choices somewhere (30 tokens, fairly flat logits).
    flat = torch.zeros(20, 30)
    a = sample(flat.clone(), batch([seq(seed=s, temperature=1.0) for s in range(20)])).token_ids
    assert len(set(a)) > 5


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    # Positive seen logit divided, negative seen logit multiplied: pin both with near-ties.
    penalty = 1.5
    logits = torch.full((4, 10), -20.0)
    logits[0, 3], logits[0, 5] = 3.0, 1.99   # seen 3 -> 2.0 > 1.99: stays
    logits[1, 3], logits[1, 5] = 3.0, 2.01   # seen 3 -> 2.0 < 2.01: loses
    logits[2, 3], logits[2, 5] = -1.0, -1.49  # seen 3 -> -1.5 < -1.49: loses
    logits[3, 3], logits[3, 5] = -1.0, -1.51  # seen 3 -> -1.5 > -1.51: stays
    seqs = [seq(tokens=[3, 8], repetition_penalty=penalty) for _ in range(4)]
    out = sample(logits.clone(), batch(seqs))
    assert out.token_ids == [3, 5, 5, 3]

    # Random rows, random histories (prompt + generated), per-row penalties: same choice as HF.
    gen = torch.Generator().manual_seed(5)
    b, v = 32, 24
    logits = torch.randn(b, v, generator=gen) * 3
    seqs, expected = [], []
    for r in range(b):
        hist = torch.randint(0, v, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        pen = [1.0, 1.2, 1.8, 0.7][r % 4]
        seqs.append(seq(tokens=hist[:1], generated=hist[1:], repetition_penalty=pen))
        processed = transformers.RepetitionPenaltyLogitsProcessor(penalty=pen)(
            torch.tensor([hist]), logits[r:r + 1].clone())
        expected.append(int(processed.argmax()))
    assert sample(logits.clone(), batch(seqs)).token_ids == expected


def test_repetition_penalty_changes_choices():
    """Guard that the random comparison above exercises the penalty at all."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(32, 8, generator=gen).abs() + 0.1
    seqs = [seq(tokens=[int(logits[r].argmax())], repetition_penalty=10.0) for r in range(32)]
    got = sample(logits.clone(), batch(seqs)).token_ids
    assert all(g != int(logits[r].argmax()) for r, g in enumerate(got))


def test_min_new_tokens_bans_eos_until_reached():
    v = 12
    logits = torch.zeros(1, v)
    logits[0, 2] = 5.0  # EOS is the favourite
    logits[0, 7] = 4.0
    logits[0, 9] = 4.5  # second EOS id
    eos = [2, 9]
    for generated, want in [(0, 7), (1, 7), (2, 7), (3, 2), (5, 2)]:
        s = seq(min_new_tokens=3, generated=[1] * generated)
        assert sample(logits.clone(), batch([s], eos=eos)).token_ids == [want], generated
    # Sampling rows too: EOS never appears before min_new_tokens.
    seqs = [seq(seed=i, temperature=1.0, min_new_tokens=2, generated=[1]) for i in range(300)]
    out = sample(logits.expand(300, v).clone(), batch(seqs, eos=eos))
    assert not set(out.token_ids) & set(eos)
    assert 7 in out.token_ids
    # Without min_new_tokens the same rows do produce EOS.
    seqs = [seq(seed=i, temperature=1.0, generated=[1]) for i in range(300)]
    out = sample(logits.expand(300, v).clone(), batch(seqs, eos=eos))
    assert set(out.token_ids) & set(eos)


def test_banned_ids_are_never_sampled():
    v = 16
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(v, generator=gen)
    base[[3, 11]] += 6.0  # the banned ids are the most likely ones
    n = 400
    seqs = []
    for i in range(n):
        s = seq(seed=i, temperature=[0.0, 0.7, 1.5, 3.0][i % 4], top_p=[1.0, 0.9][i % 2], top_k=[0, 4][i % 2 and i % 3 == 0])
        s.banned_ids = [3, 11]
        seqs.append(s)
    out = sample(base.expand(n, v).clone(), batch(seqs))
    assert not {3, 11} & set(out.token_ids)
    assert len(set(out.token_ids)) > 3  # the test did sample broadly


def test_multi_token_bad_word_bans_its_last_id_after_the_rest():
    logits = torch.zeros(3, 10)
    logits[:, 6] = 3.0
    seqs = [seq(tokens=[1, 4]), seq(tokens=[1, 5]), seq(tokens=[4, 4])]
    seqs[0].bad_word_ids = [[4, 6]]      # ends with 4 -> 6 banned
    seqs[1].bad_word_ids = [[4, 6]]      # does not -> 6 allowed
    seqs[2].bad_word_ids = [[9, 4, 6]]   # ends with 4 but not 9, 4
    assert sample(logits.clone(), batch(seqs)).token_ids == [0, 6, 6]


def test_logprobs_are_log_softmax_of_raw_logits_at_chosen_tokens():
    gen = torch.Generator().manual_seed(8)
    b, v = 6, 20
    logits = torch.randn(b, v, generator=gen) * 2
    seqs = [
        seq(seed=1, logprobs=0),
        seq(seed=2, temperature=0.7, logprobs=3),
        seq(seed=3, temperature=1.3, top_k=5, top_p=0.8),
        seq(seed=4, repetition_penalty=1.4, tokens=[int(logits[3].argmax())], logprobs=1),
        seq(seed=5, temperature=2.0, min_new_tokens=4),
        seq(seed=6),
    ]
    seqs[5].banned_ids = [int(logits[5].argmax())]
    out = sample(logits.clone(), batch(seqs, eos=[int(logits[4].argmax())]))
    raw = torch.log_softmax(logits.double(), -1)
    assert out.logprobs is not None and len(out.logprobs) == b
    for r, t in enumerate(out.token_ids):
        assert out.logprobs[r] == pytest.approx(raw[r, t].item(), abs=1e-5)
    # Processing changed the choice in rows 3 and 5, yet logprobs are of the raw distribution.
    assert out.token_ids[3] != int(logits[3].argmax())
    assert out.token_ids[5] != int(logits[5].argmax())
    # Top alternatives: the batch-wide maximum count, from the raw distribution.
    assert out.top_logprobs is not None
    for r in range(b):
        values, ids = raw[r].topk(3)
        assert list(out.top_logprobs[r]) == ids.tolist()
        assert list(out.top_logprobs[r].values()) == pytest.approx(values.tolist(), abs=1e-5)
