"""Every Triton kernel against its plain-PyTorch reference (kernels/*_triton.py vs kernels/*.py).

Where no CUDA device exists the Triton kernels run under Triton's interpreter on CPU tensors
(kubellm.kernels.triton_support turns TRITON_INTERPRET on before any kernel is decorated,
whatever the import order), with small shapes: the interpreter runs numpy per tile.
On a GPU the same tests run compiled, on CUDA tensors, with realistic shapes; the CPU cases
are then skipped (compiled kernels cannot read CPU memory).

Inputs are random: cache contents, block tables drawn from the whole cache (the last block
included), mixed sequence lengths, GQA ratios, head sizes 64/80/128, fp32/fp16/bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kubellm.kernels import activation, attention, dispatch, norm, rotary, sampling  # noqa: E402
from kubellm.kernels import (activation_triton, attention_triton, norm_triton, rotary_triton,  # noqa: E402
                             sampling_triton, triton_support)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not triton_support.interpreting(),
                                                 reason="CPU tensors need Triton's interpreter (no CUDA device)")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(64, 4, 1), (80, 6, 2), (128, 4, 4)]  # (head_dim, query heads, kv heads): GQA 4, 3 and MHA

# Tolerances against a float32 reference: about two units in the last place of the dtype.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2)}


pytestmark = pytest.mark.model


def sizes(device: str) -> dict:
    """Small under the interpreter, realistic on a GPU."""
    if device == "cpu":
        return dict(num_blocks=1024, batch=3, max_context=150, prefill_context=90, chunk=40, tokens=5,
                    hidden=96, vocab=300)
    return dict(num_blocks=8192, batch=24, max_context=4096, prefill_context=3000, chunk=512, tokens=512,
                hidden=4096, vocab=128256)


def random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=gen).to(device=device, dtype=dtype),
            torch.randn(shape, generator=gen).to(device=device, dtype=dtype))


def random_block_table(num_blocks, blocks_needed, width, gen):
    """Distinct blocks from anywhere in the cache, the highest index always among them."""
    chosen = torch.randperm(num_blocks - 1, generator=gen)[:blocks_needed - 1]
    table = torch.cat([chosen, torch.tensor([num_blocks - 1])])[torch.randperm(blocks_needed, generator=gen)]
    return torch.cat([table, torch.zeros(width - blocks_needed, dtype=table.dtype)])  # padded like the runner


# ---------------------------------------------------------------------------------------------
# The interpreter really is what runs on CPU
# ---------------------------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter is only turned on where no CUDA device exists")
def test_kernels_turn_the_interpreter_on_without_cuda():
    """With TRITON_INTERPRET unset, importing a kernel module turns it on and the kernel runs on CPU."""
    out = _python("import torch; from kubellm.kernels import attention_triton as a; "
                  "c = torch.zeros(2, 2, 1, 64); a.write_kv_cache(torch.ones(1, 1, 64), torch.ones(1, 1, 64), "
                  "c, c.clone(), torch.tensor([3])); print(type(a._decode_kernel).__name__, int(c.sum()))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["InterpretedFunction", "64"]
    assert type(attention_triton._decode_kernel).__name__ == "InterpretedFunction"


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter is only turned on where no CUDA device exists")
def test_triton_imported_too_early_is_a_clear_error():
    out = _python("import triton; import kubellm.kernels.norm_triton")
    assert out.returncode != 0
    assert "triton was imported before it was set" in out.stderr


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Each head shape with its own block size / window / split case: the full cross product is
# too slow for the interpreter and adds little.
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads,block_size,sliding_window,num_splits",
                         [(*HEADS[0], 16, None, None), (*HEADS[1], 5, 33, 2), (*HEADS[2], 4, None, 3)],
                         ids=["d64-gqa4-bs16-auto-splits", "d80-gqa3-bs5-window-2-splits", "d128-mha-bs4-3-splits"])
def test_paged_decode_attention(device, dtype, head_dim, num_heads, num_kv_heads, block_size, sliding_window,
                                num_splits):
    s = sizes(device)
    gen = torch.Generator().manual_seed(head_dim * 7 + block_size)
    k_cache, v_cache = random_cache(s["num_blocks"], block_size, num_kv_heads, head_dim, dtype, device, gen)
    max_ctx = s["max_context"]
    # Mixed lengths: a single token, the longest, and random ones between.
    lens = torch.randint(1, max_ctx + 1, (s["batch"],), generator=gen)
    lens[0], lens[-1] = 1, max_ctx
    width = -(-max_ctx // block_size)
    tables = torch.stack([random_block_table(s["num_blocks"], -(-int(n) // block_size), width, gen) for n in lens])
    q = torch.randn(s["batch"], num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    tables, lens = tables.to(device), lens.to(device)
    scale = head_dim ** -0.5

    expected = attention.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale,
                                                sliding_window)
    got = attention_triton.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, sliding_window,
                                                  num_splits=num_splits)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_attention_int32_block_table_and_strided_query(device):
    """The runner's tables are int64, CUDA-graph buffers may be int32; q is a view of a packed qkv."""
    s = sizes(device)
    gen = torch.Generator().manual_seed(1)
    head_dim, num_heads, num_kv_heads, block_size = 64, 8, 2, 8
    k_cache, v_cache = random_cache(s["num_blocks"], block_size, num_kv_heads, head_dim, torch.float32, device, gen)
    lens = torch.randint(1, s["max_context"] + 1, (s["batch"],), generator=gen)
    width = -(-s["max_context"] // block_size)
    tables = torch.stack([random_block_table(s["num_blocks"], -(-int(n) // block_size), width, gen) for n in lens])
    qkv = torch.randn(s["batch"], (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(device)
    q = qkv[:, :num_heads * head_dim].view(-1, num_heads, head_dim)
    expected = attention.paged_decode_attention(q, k_cache, v_cache, tables.to(device), lens.to(device), 0.125)
    got = attention_triton.paged_decode_attention(q, k_cache, v_cache, tables.to(device, torch.int32),
                                                  lens.to(device, torch.int32), 0.125)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.gpu  # 2 x 4.6 GB of cache
def test_paged_attention_reads_and_writes_beyond_int32_offsets():
    """A cache of more than 2^31 elements: offsets of its last blocks overflow int32 arithmetic."""
    num_kv_heads, head_dim, block_size, num_heads = 8, 128, 16, 32
    num_blocks = 2 ** 31 // (block_size * num_kv_heads * head_dim) + 4096
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    gen = torch.Generator(device="cuda").manual_seed(7)
    context = 300
    table = torch.arange(num_blocks - 19, num_blocks, device="cuda")  # the cache's last 19 blocks
    slots = table[torch.arange(context, device="cuda") // block_size] * block_size + torch.arange(
        context, device="cuda") % block_size
    k = torch.randn(context, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(context, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    attention_triton.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[slots], k)
    q = torch.randn(context, num_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    expected = attention.paged_prefill_attention(q.float(), k.float(), v.float(), k_cache[table].float(),
                                                 v_cache[table].float(), torch.arange(19, device="cuda"), context,
                                                 head_dim ** -0.5)
    got = attention_triton.paged_prefill_attention(q, k, v, k_cache, v_cache, table, context, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), expected, **TOL[torch.bfloat16])
    lens = torch.tensor([context], device="cuda")
    expected = attention.paged_decode_attention(q[-1:].float(), k_cache[table].float(), v_cache[table].float(),
                                                torch.arange(19, device="cuda")[None], lens, head_dim ** -0.5)
    got = attention_triton.paged_decode_attention(q[-1:], k_cache, v_cache, table[None], lens, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), expected, **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads,block_size,sliding_window,whole",
                         [(*HEADS[0], 3, None, False), (*HEADS[1], 8, 17, False), (*HEADS[2], 16, None, True)],
                         ids=["d64-gqa4-bs3-chunk-after-prefix", "d80-gqa3-bs8-window-chunk", "d128-mha-bs16-whole"])
def test_paged_prefill_attention(device, dtype, head_dim, num_heads, num_kv_heads, block_size, sliding_window,
                                 whole):
    s = sizes(device)
    gen = torch.Generator().manual_seed(head_dim + block_size)
    k_cache, v_cache = random_cache(s["num_blocks"], block_size, num_kv_heads, head_dim, dtype, device, gen)
    context_len = s["prefill_context"]
    n = context_len if whole else s["chunk"]
    blocks = -(-context_len // block_size)
    table = random_block_table(s["num_blocks"], blocks, blocks + 2, gen).to(device)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    # The chunk's own keys are in the cache already (the layer writes them first).
    positions = torch.arange(context_len - n, context_len, device=device)
    slots = table[positions // block_size] * block_size + positions % block_size
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots]
    scale = head_dim ** -0.5

    expected = attention.paged_prefill_attention(q.float(), k.float(), v.float(), k_cache.float(), v_cache.float(),
                                                 table, context_len, scale, sliding_window)
    got = attention_triton.paged_prefill_attention(q, k, v, k_cache, v_cache, table, context_len, scale,
                                                   sliding_window)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_cache(device, dtype):
    s = sizes(device)
    gen = torch.Generator().manual_seed(2)
    num_kv_heads, head_dim, block_size = 2, 80, 16
    k_cache, v_cache = random_cache(s["num_blocks"], block_size, num_kv_heads, head_dim, dtype, device, gen)
    total_slots = s["num_blocks"] * block_size
    slots = torch.randperm(total_slots, generator=gen)[:s["tokens"]]
    slots[0] = total_slots - 1  # the very last slot of the cache
    # Keys and values as the model makes them: views into one packed projection output.
    kv = torch.randn(s["tokens"], 2 * num_kv_heads * head_dim, generator=gen).to(device=device, dtype=dtype)
    key = kv[:, :num_kv_heads * head_dim].view(-1, num_kv_heads, head_dim)
    value = kv[:, num_kv_heads * head_dim:].view(-1, num_kv_heads, head_dim)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    attention.write_kv_cache(key, value, expected_k, expected_v, slots.to(device))
    attention_triton.write_kv_cache(key, value, k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_cache_skips_negative_slots(device):
    """Padding rows of a captured decode batch carry slot -1 and must not touch the cache."""
    k_cache = torch.zeros(4, 2, 1, 64, device=device)
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(3, 1, 64, device=device)
    attention_triton.write_kv_cache(key, 2 * key, k_cache, v_cache, torch.tensor([5, -1, 0], device=device))
    assert k_cache.view(-1, 64).sum(1).tolist() == [64, 0, 0, 0, 0, 64, 0, 0]
    assert v_cache.view(-1, 64).sum(1).tolist() == [128, 0, 0, 0, 0, 128, 0, 0]


# ---------------------------------------------------------------------------------------------
# Norm, rotary, activation: the reference in the same dtype (same rounding steps)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "fused-residual"])
def test_rms_norm(device, dtype, with_residual):
    s = sizes(device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(s["tokens"], s["hidden"], generator=gen).to(device=device, dtype=dtype)
    residual = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(s["hidden"], generator=gen)).to(device=device, dtype=dtype)
    expected, expected_residual = norm.rms_norm(x, weight, 1e-5, residual)
    got, got_residual = norm_triton.rms_norm(x, weight, 1e-5, residual)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **TOL[dtype])
    if with_residual:
        torch.testing.assert_close(got_residual, expected_residual, **TOL[dtype])
    else:
        assert got_residual is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", HEADS)
def test_apply_rotary(device, dtype, head_dim, num_heads, num_kv_heads):
    """Any cos/sin table works (random here; Llama-3 or YaRN tables are just other numbers)."""
    s = sizes(device)
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(s["tokens"], (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(device=device, dtype=dtype)
    q = qkv[:, :num_heads * head_dim].view(-1, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(-1, num_kv_heads, head_dim)
    cos = torch.randn(s["tokens"], head_dim, generator=gen).to(device=device, dtype=dtype)
    sin = torch.randn(s["tokens"], head_dim, generator=gen).to(device=device, dtype=dtype)
    expected_q, expected_k = rotary.apply_rotary(q.float(), k.float(), cos.float(), sin.float())
    got_q, got_k = rotary_triton.apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(got_q.float(), expected_q, **TOL[dtype])
    torch.testing.assert_close(got_k.float(), expected_k, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(device, dtype):
    s = sizes(device)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, s["tokens"], 2 * (3 * s["hidden"] + 8), generator=gen).to(device=device, dtype=dtype)
    torch.testing.assert_close(activation_triton.silu_and_mul(x), activation.silu_and_mul(x), **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Sampling filter: exactly the reference's survivors (distinct logits, so no ties at the cut)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_filter(device):
    s = sizes(device)
    gen = torch.Generator().manual_seed(6)
    vocab = s["vocab"]
    top_k = torch.tensor([0, 1, 5, 0, vocab, vocab + 7, 40, 0])
    top_p = torch.tensor([0.9, 1.0, 1.0, 0.3, 0.5, 1.0, 0.95, 1e-4])
    logits = 3 * torch.randn(len(top_k), vocab, generator=gen)
    logits[0, :vocab // 3] = float("-inf")  # banned tokens
    logits, top_k, top_p = logits.to(device), top_k.to(device), top_p.to(device)
    expected = sampling.top_k_top_p_filter(logits, top_k, top_p)
    got = sampling_triton.top_k_top_p_filter(logits, top_k, top_p)
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def test_dispatch_follows_the_device_and_the_override(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("KUBELLM_KERNELS", raising=False)
    assert not dispatch.use_triton(cpu)
    monkeypatch.setenv("KUBELLM_KERNELS", "triton")
    assert dispatch.use_triton(cpu)
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    assert not dispatch.use_triton(cpu)
    if HAS_CUDA:
        assert not dispatch.use_triton(cpu.cuda())
        monkeypatch.setenv("KUBELLM_KERNELS", "auto")
        assert dispatch.use_triton(cpu.cuda())
    monkeypatch.setenv("KUBELLM_KERNELS", "fast")
    with pytest.raises(ValueError, match="KUBELLM_KERNELS"):
        dispatch.use_triton(cpu)


def test_dispatch_calls_the_chosen_implementation(monkeypatch):
    x = torch.randn(3, 2 * 64)
    monkeypatch.setenv("KUBELLM_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(activation_triton, "silu_and_mul", lambda t: calls.append("triton") or t)
    monkeypatch.setattr(activation, "silu_and_mul", lambda t: calls.append("reference") or t)
    dispatch.silu_and_mul(x)
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    dispatch.silu_and_mul(x)
    assert calls == ["triton", "reference"]


# ---------------------------------------------------------------------------------------------
# The whole engine on the Triton path (interpreted on CPU): same greedy tokens as the references
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="on a GPU, test_engine_hf.py itself runs the Triton path")
@pytest.mark.skipif(not triton_support.interpreting(), reason="CPU tensors need Triton's interpreter")
def test_engine_greedy_tokens_equal_on_the_triton_path(tiny_llama3, monkeypatch):
    """A chunked prefill after a cached prefix, a lone prefill and decodes sharing steps with them."""
    from kubellm.runtime.config import EngineConfig, GenerationConfig
    from kubellm.runtime.engine.engine import LLMEngine

    prompts = [list(range(3, 30)), [5, 17, 42]]
    gen = GenerationConfig(max_new_tokens=4, logprobs=0)

    def run(mode):
        monkeypatch.setenv("KUBELLM_KERNELS", mode)
        engine = LLMEngine(tiny_llama3, EngineConfig.build(block_size=4, max_num_batched_tokens=16, num_kv_blocks=64,
                                                           max_batch_size=4), show_progress=False)
        seqs = engine.generate(prompts, [gen] * len(prompts))
        return [s.generated_ids for s in seqs], [s.logprobs for s in seqs]

    ref_ids, ref_logprobs = run("reference")
    calls = {"decode": 0, "prefill": 0}

    def counted(kind):
        kernel = getattr(attention_triton, f"paged_{kind}_attention")

        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return kernel(*args, **kwargs)
        return wrapper

    for kind in calls:
        monkeypatch.setattr(attention_triton, f"paged_{kind}_attention", counted(kind))
    ids, logprobs = run("triton")
    assert calls["decode"] and calls["prefill"]
    assert ids == ref_ids
    for got, expected in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(expected, abs=1e-4)
