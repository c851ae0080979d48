"""The CPU rotary's shortcuts (kernels/rotary.py, layers/rotary.py): q and k rotated as one tensor when they are
adjacent views of one packed projection, and the cos/sin rows looked up once per step. Both must give exactly
what rotating each tensor on its own, with its own lookup, gives."""

import pytest
import torch

from kubellm.kernels import rotary
from kubellm.runtime.executor.layers.linear import split_heads


def _separately(q, k, cos, sin):
    return rotary.apply_rotary(q.clone(), k.clone(), cos, sin)   # clones: never adjacent


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adjacent_q_and_k_rotate_as_one_with_the_same_result(tokens, dtype):
    gen = torch.Generator().manual_seed(tokens)
    heads, kv_heads, dim = 6, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = split_heads(qkv, heads, kv_heads, dim)
    cos, sin = torch.randn(tokens, dim, generator=gen).to(dtype), torch.randn(tokens, dim, generator=gen).to(dtype)
    assert rotary._adjacent(q, k)
    got, want = rotary.apply_rotary(q, k, cos, sin), _separately(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)
    assert torch.equal(qkv, torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1))   # the input is untouched


def test_views_that_are_not_adjacent_rotate_separately():
    qkv = torch.randn(3, 10 * 8)
    q, k, v = split_heads(qkv, 6, 2, 8)
    assert not rotary._adjacent(k, q) and not rotary._adjacent(q, v)
    assert not rotary._adjacent(q, k.clone()) and not rotary._adjacent(q[::2], k[::2].contiguous())
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    for g, w in zip(rotary.apply_rotary(q, v, cos, sin), _separately(q, v, cos, sin)):
        assert torch.equal(g, w)


def test_cos_sin_are_looked_up_once_per_positions_tensor():
    from transformers import LlamaConfig

    from kubellm.runtime.executor.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4), 16, 64)
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    positions = torch.tensor([0, 5, 9])
    first = rope(positions, q, k)
    cached = rope._step[2]
    assert rope(positions, q, k)[0].equal(first[0]) and rope._step[2] is cached   # same step: no new lookup
    other = torch.tensor([1, 2, 3])   # the next step: the runner builds a new positions tensor
    moved = rope(other, q, k)
    assert rope._step[2] is not cached and not moved[0].equal(first[0])
    cos, sin = rope.cos_sin(other)
    assert torch.equal(moved[0], rotary.apply_rotary(q.clone(), k.clone(), cos, sin)[0])
