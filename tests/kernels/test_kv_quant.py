"""The quantized KV caches, int8 (kernels/kv_int8.py, LMDeploy's quant_policy=8) and int4 (kernels/kv_int4.py,
quant_policy=4): quantization's error bound, the Triton write and attention kernels against the references on
the same quantized cache, and quantized attention against the float cache it was quantized from. Triton runs
under its interpreter where no CUDA device exists."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from test_kernels import DEVICES, HEADS, random_block_table, sizes  # noqa: E402

from kubellm.kernels import attention, attention_triton, kv_int4, kv_int8  # noqa: E402

pytestmark = pytest.mark.model
# Quantized attention against the float cache it came from, unit-normal keys and values: (max, mean) error.
# int8's step is max|x| / 127 (about 1% of it); int4's is the range / 15, about 16x coarser.
FORMATS = {"int8": (kv_int8, 0.05, 0.005), "int4": (kv_int4, 0.3, 0.05)}


def quantized_cache(kv, num_blocks, block_size, num_kv_heads, head_dim, device, gen):
    """A float cache and the same cache quantized: (float k, float v, quantized k, quantized v, k scales,
    v scales)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k, v = (torch.randn(shape, generator=gen) for _ in range(2))
    (qk, sk), (qv, sv) = kv.quantize(k), kv.quantize(v)
    return [t.to(device) for t in (k, v, qk, qv, sk, sv)]


def empty_cache(kv, shape, device):
    """Zeroed (k cache, v cache, k scales, v scales) of format kv for a float cache of `shape`."""
    q, scales = kv.quantize(torch.zeros(shape))
    return tuple(torch.zeros_like(t, device=device) for t in (q, q, scales, scales))


def test_quantize_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 64, generator=gen) * torch.logspace(-3, 3, 50)[:, None, None]
    q, scale = kv_int8.quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (50, 4) and int(q.abs().max()) == 127
    error = (kv_int8.dequantize(q, scale, torch.float32) - x).abs()
    assert bool((error <= scale[..., None] / 2 * (1 + 1e-5)).all())
    zeros, zero_scale = kv_int8.quantize(torch.zeros(2, 1, 8))   # no 0 / 0
    assert not zeros.any() and bool((zero_scale > 0).all())


def test_int4_codes_pack_two_a_byte_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 64, generator=gen) * torch.logspace(-3, 3, 50)[:, None, None] + 3
    packed, params = kv_int4.quantize(x)
    assert packed.dtype == torch.uint8 and packed.shape == (50, 4, 32) and params.shape == (50, 4, 2)
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)
    # each row's own minimum is code 0 and its maximum code 15: the whole range is used
    assert bool((codes.gather(-1, x.argmin(-1, keepdim=True)) == 0).all())
    assert bool((codes.gather(-1, x.argmax(-1, keepdim=True)) == 15).all())
    error = (kv_int4.dequantize(packed, params, torch.float32) - x).abs()
    assert bool((error <= params[..., :1] / 2 * (1 + 1e-4) + 1e-6).all())
    constant, constant_params = kv_int4.quantize(torch.full((2, 1, 8), -2.5))   # no 0 / 0
    assert torch.equal(kv_int4.dequantize(constant, constant_params, torch.float32), torch.full((2, 1, 8), -2.5))


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_triton_write_matches_the_reference_and_skips_padding(device, kind):
    gen = torch.Generator().manual_seed(1)
    num_kv_heads, head_dim, block_size, tokens = 3, 80, 16, 7
    shape = (32, block_size, num_kv_heads, head_dim)
    caches = {name: empty_cache(FORMATS[kind][0], shape, device) for name in ("reference", "triton")}
    key = (torch.randn(tokens, num_kv_heads, head_dim, generator=gen) * 5).to(device)
    value = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(device)
    slots = torch.tensor([511, 3, 17, 100, 0, 250, 64], device=device)
    attention.write_kv_cache(key, value, *caches["reference"][:2], slots, *caches["reference"][2:])
    attention_triton.write_kv_cache(key, value, *caches["triton"][:2], slots, *caches["triton"][2:])
    assert caches["reference"][0].view(-1, num_kv_heads, caches["reference"][0].shape[-1])[slots].any()
    for ref, got in zip(caches["reference"], caches["triton"]):
        if ref.dtype == torch.int8:   # rounding of an exact .5 may differ (half-to-even vs away from zero)
            assert int((ref.int() - got.int()).abs().max()) <= 1
        elif ref.dtype == torch.uint8:   # int4: each nibble
            for shift in (0, 4):
                assert int((((ref >> shift) & 15).int() - ((got >> shift) & 15).int()).abs().max()) <= 1
        else:
            torch.testing.assert_close(got, ref)
    padded = slots.clone()
    padded[2] = -1
    k_cache, v_cache, k_scale, v_scale = (t.zero_() for t in caches["triton"])
    attention_triton.write_kv_cache(key, value, k_cache, v_cache, padded, k_scale, v_scale)
    assert not k_cache.view(-1, num_kv_heads, k_cache.shape[-1])[17].any()
    assert not k_scale.view(-1, num_kv_heads, *k_scale.shape[3:])[17].any()
    assert k_cache.view(-1, num_kv_heads, k_cache.shape[-1])[3].any()


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads,block_size,sliding_window,num_splits",
                         [(*HEADS[0], 16, None, None), (*HEADS[1], 5, 33, 2)], ids=["d64-gqa4", "d80-gqa3-window-2"])
def test_decode_on_quantized_cache(device, kind, head_dim, num_heads, num_kv_heads, block_size, sliding_window,
                                   num_splits):
    s = sizes(device)
    kv, max_error, mean_error = FORMATS[kind]
    gen = torch.Generator().manual_seed(head_dim)
    k, v, qk, qv, sk, sv = quantized_cache(kv, s["num_blocks"], block_size, num_kv_heads, head_dim, device, gen)
    lens = torch.randint(1, s["max_context"] + 1, (s["batch"],), generator=gen)
    lens[-1] = s["max_context"]
    width = -(-s["max_context"] // block_size)
    tables = torch.stack([random_block_table(s["num_blocks"], -(-int(n) // block_size), width, gen)
                          for n in lens]).to(device)
    lens = lens.to(device)
    q = torch.randn(s["batch"], num_heads, head_dim, generator=gen).to(device)
    scale = head_dim ** -0.5
    reference = attention.paged_decode_attention(q, qk, qv, tables, lens, scale, sliding_window, k_scale=sk,
                                                 v_scale=sv)
    triton_out = attention_triton.paged_decode_attention(q, qk, qv, tables, lens, scale, sliding_window,
                                                         num_splits=num_splits, k_scale=sk, v_scale=sv)
    torch.testing.assert_close(triton_out, reference, atol=2e-5, rtol=2e-5)
    exact = attention.paged_decode_attention(q, k, v, tables, lens, scale, sliding_window)
    # Within the format's error of the float cache (keys and values off by at most half a step each)
    assert 0 < float((reference - exact).abs().max()) < max_error
    assert float((reference - exact).abs().mean()) < mean_error


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_on_quantized_cache(device, kind):
    s = sizes(device)
    kv, max_error, mean_error = FORMATS[kind]
    head_dim, num_heads, num_kv_heads, block_size = HEADS[0][0], HEADS[0][1], HEADS[0][2], 8
    gen = torch.Generator().manual_seed(5)
    k, v, qk, qv, sk, sv = quantized_cache(kv, s["num_blocks"], block_size, num_kv_heads, head_dim, device, gen)
    context_len, n = s["prefill_context"], s["chunk"]
    blocks = -(-context_len // block_size)
    table = random_block_table(s["num_blocks"], blocks, blocks, gen).to(device)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(device)
    positions = torch.arange(context_len - n, context_len, device=device)
    slots = table[positions // block_size] * block_size + positions % block_size
    chunk_k, chunk_v = k.view(-1, num_kv_heads, head_dim)[slots], v.view(-1, num_kv_heads, head_dim)[slots]
    scale = head_dim ** -0.5
    for whole in (False, True):   # a chunk after a cached prefix, and a whole prompt in one chunk
        ctx, rows = (n, n) if whole else (context_len, n)
        if whole:
            table_used = table[:-(-n // block_size)]
            chunk_k = k.view(-1, num_kv_heads, head_dim)[
                (table_used[torch.arange(n) // block_size] * block_size + torch.arange(n, device=device) % block_size)]
            chunk_v = chunk_k
        else:
            table_used = table
        reference = attention.paged_prefill_attention(q[:rows], chunk_k, chunk_v, qk, qv, table_used, ctx, scale,
                                                      k_scale=sk, v_scale=sv)
        triton_out = attention_triton.paged_prefill_attention(q[:rows], chunk_k, chunk_v, qk, qv, table_used, ctx,
                                                              scale, k_scale=sk, v_scale=sv)
        torch.testing.assert_close(triton_out, reference, atol=2e-5, rtol=2e-5)
    exact = attention.paged_prefill_attention(q, chunk_k, chunk_v, k, v, table, context_len, scale)
    reference = attention.paged_prefill_attention(q, chunk_k, chunk_v, qk, qv, table, context_len, scale,
                                                  k_scale=sk, v_scale=sv)
    assert 0 < float((reference - exact).abs().max()) < max_error
    assert float((reference - exact).abs().mean()) < mean_error
