"""The CPU decode path of kernels/attention.py: one sequence reads its keys cut to its context (no mask), several
read them through a per-step additive mask; both must equal dense attention over exactly the keys allowed."""

import pytest
import torch
import torch.nn.functional as F

from kubellm.kernels import attention


def _dense(q, k, v, context, window, scale):
    begin = 0 if window is None else max(0, context - window)
    k, v = k[begin:context].transpose(0, 1), v[begin:context].transpose(0, 1)   # [Hkv, n, D]
    group = q.shape[0] // k.shape[0]
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.repeat_interleave(group, 0),
                                          v.repeat_interleave(group, 0), scale=scale).squeeze(1)


@pytest.mark.parametrize("contexts, window", [([37], None), ([37], 8), ([16], None), ([1], 4),
                                              ([37, 5, 16], None), ([37, 5, 16], 8), ([5, 5], None)])
def test_decode_equals_dense(contexts, window):
    gen = torch.Generator().manual_seed(0)
    block, hkv, hq, d = 16, 2, 6, 8
    width = max(-(-c // block) for c in contexts)
    num_blocks = width * len(contexts)
    k_cache = torch.randn(num_blocks, block, hkv, d, generator=gen)
    v_cache = torch.randn(num_blocks, block, hkv, d, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen).view(len(contexts), width)
    q = torch.randn(len(contexts), hq, d, generator=gen)
    lens = torch.tensor(contexts)
    out = attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3, window)
    for i, c in enumerate(contexts):
        keys = k_cache[tables[i]].flatten(0, 1)
        values = v_cache[tables[i]].flatten(0, 1)
        torch.testing.assert_close(out[i], _dense(q[i], keys, values, c, window, 0.3), rtol=1e-5, atol=1e-5)
    # the step's mask is kept while the lengths are equal, and rebuilt when they change
    if len(contexts) > 1:
        longer = lens + 1
        again = attention.paged_decode_attention(q, k_cache, v_cache, tables, longer, 0.3, window)
        for i, c in enumerate(longer.tolist()):
            keys = k_cache[tables[i]].flatten(0, 1)
            values = v_cache[tables[i]].flatten(0, 1)
            torch.testing.assert_close(again[i], _dense(q[i], keys, values, c, window, 0.3), rtol=1e-5, atol=1e-5)
