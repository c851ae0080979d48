"""`kubellm bench kernels`: each Triton kernel against the best PyTorch path on the same shapes.

Attention is compared with PyTorch's scaled_dot_product_attention (SDPA; flash or
memory-efficient backend, whichever PyTorch picks) on keys/values that are already dense
and contiguous. That is SDPA's best case: it cannot read a block table, so serving with it
needs the gather the reference kernels do (timed too, as "gather+SDPA"). Ratios are
PyTorch time / Triton time, so above 1 means Triton is faster. Issue 6's targets: >= 1 for
paged decode, >= 0.8 for prefill.

The other kernels are compared with their plain-PyTorch references (kernels/*.py).
Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head size 128, hidden 4096, vocabulary
128256), bf16. Timing is triton.testing.do_bench (median, L2 cleared between runs).

Needs a CUDA GPU: on CPU the Triton kernels only run under the interpreter, whose timings
mean nothing.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

LLAMA3_8B = dict(num_heads=32, num_kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, vocab=128256)
BLOCK_SIZE = 16
DECODE_SHAPES = [(1, 1024), (1, 8192), (1, 32768), (16, 2048), (64, 1024), (64, 4096)]  # (batch, context)
PREFILL_SHAPES = [(512, 512), (2048, 2048), (8192, 8192), (512, 4096)]  # (query tokens, context): last is a chunk


def time_ms(fn, cuda: bool | None = None) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU (events, L2 cleared between runs); on CPU
    (`kubellm bench gpu --device cpu`'s tiny shapes, Triton interpreted) one call after a warm-up, only so
    that the pipeline runs: such timings mean nothing."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    import time

    fn()   # warm-up; then one timed call (the interpreter is slow, and what it measures means nothing)
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


_time_ms = time_ms


def _paged_cache(contexts: list[int], heads: dict, dtype, device, gen):
    """Random K/V cache holding one sequence per context, in shuffled blocks; its block tables."""
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in contexts]
    num_blocks = sum(blocks_per_seq)
    shape = (num_blocks, BLOCK_SIZE, heads["num_kv_heads"], heads["head_dim"])
    k_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    order = torch.randperm(num_blocks, device=device, generator=gen)
    width = max(blocks_per_seq)
    tables = torch.zeros(len(contexts), width, dtype=torch.long, device=device)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[start:start + n]
        start += n
    return k_cache, v_cache, tables


def _dense(cache: torch.Tensor, table: torch.Tensor, context: int) -> torch.Tensor:
    """[Hkv, context, D]: one sequence's keys gathered out of the cache, contiguous."""
    return cache[table].flatten(0, 1)[:context].transpose(0, 1).contiguous()


def bench_decode(batch: int, context: int, dtype=torch.bfloat16, device="cuda", heads: dict = LLAMA3_8B) -> dict:
    from kubellm.kernels import attention, attention_triton

    h = heads
    gen = torch.Generator(device=device).manual_seed(0)
    k_cache, v_cache, tables = _paged_cache([context] * batch, h, dtype, device, gen)
    lens = torch.full((batch,), context, dtype=torch.long, device=device)
    q = torch.randn(batch, h["num_heads"], h["head_dim"], device=device, dtype=dtype, generator=gen)
    scale = h["head_dim"] ** -0.5
    k = torch.stack([_dense(k_cache, t, context) for t in tables])  # [B, Hkv, ctx, D]
    v = torch.stack([_dense(v_cache, t, context) for t in tables])
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]

    triton_ms = _time_ms(lambda: attention_triton.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale))
    sdpa_ms = _time_ms(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
    gather_ms = _time_ms(lambda: attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale))
    kv_bytes = 2 * batch * context * h["num_kv_heads"] * h["head_dim"] * k_cache.element_size()
    return {"kernel": "paged decode", "shape": f"batch {batch}, context {context}", "triton_ms": triton_ms,
            "torch_ms": sdpa_ms, "torch": "SDPA (dense KV)", "gather_ms": gather_ms,
            "ratio": sdpa_ms / triton_ms, "triton_GBps": kv_bytes / triton_ms / 1e6}


def bench_prefill(num_queries: int, context: int, dtype=torch.bfloat16, device="cuda",
                  heads: dict = LLAMA3_8B) -> dict:
    from torch.nn.attention.bias import causal_lower_right

    from kubellm.kernels import attention, attention_triton

    h = heads
    gen = torch.Generator(device=device).manual_seed(0)
    k_cache, v_cache, tables = _paged_cache([context], h, dtype, device, gen)
    table = tables[0]
    q = torch.randn(num_queries, h["num_heads"], h["head_dim"], device=device, dtype=dtype, generator=gen)
    k, v = _dense(k_cache, table, context), _dense(v_cache, table, context)  # [Hkv, ctx, D]
    chunk_k, chunk_v = k[:, context - num_queries:].transpose(0, 1), v[:, context - num_queries:].transpose(0, 1)
    scale = h["head_dim"] ** -0.5
    q4, k4, v4 = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    # Causal with the queries at the end of the context (bottom-right aligned), as in a chunk.
    mask = None if num_queries == context else causal_lower_right(num_queries, context)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=True)

    triton_ms = _time_ms(lambda: attention_triton.paged_prefill_attention(
        q, chunk_k, chunk_v, k_cache, v_cache, table, context, scale))
    sdpa_ms = _time_ms(sdpa)
    gather_ms = _time_ms(lambda: attention.paged_prefill_attention(
        q, chunk_k, chunk_v, k_cache, v_cache, table, context, scale))
    # Multiply-adds of QK^T and PV over the causal (lower-right) region.
    pairs = num_queries * context - num_queries * (num_queries - 1) / 2
    flops = 4 * pairs * h["num_heads"] * h["head_dim"]
    return {"kernel": "paged prefill", "shape": f"{num_queries} queries, context {context}", "triton_ms": triton_ms,
            "torch_ms": sdpa_ms, "torch": "SDPA (dense KV)", "gather_ms": gather_ms,
            "ratio": sdpa_ms / triton_ms, "triton_TFLOPs": flops / triton_ms / 1e9}


def bench_pointwise(device="cuda", dtype=torch.bfloat16, heads: dict = LLAMA3_8B, tokens: int = 4096,
                    rows: int = 64) -> list[dict]:
    """RMSNorm, rotary, SiLU-and-mul, KV write and top-k/top-p (`rows` rows of logits) against their references."""
    from kubellm.kernels import (activation, activation_triton, attention, attention_triton, norm, norm_triton,
                                 rotary, rotary_triton, sampling, sampling_triton)

    h = heads
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    x, residual, weight = randn(tokens, h["hidden"]), randn(tokens, h["hidden"]), randn(h["hidden"])
    q, k = randn(tokens, h["num_heads"], h["head_dim"]), randn(tokens, h["num_kv_heads"], h["head_dim"])
    cos, sin = randn(tokens, h["head_dim"]), randn(tokens, h["head_dim"])
    gate_up = randn(tokens, 2 * h["intermediate"])
    k_cache = torch.zeros(tokens // BLOCK_SIZE * 2, BLOCK_SIZE, h["num_kv_heads"], h["head_dim"], device=device,
                          dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device=device, generator=gen)[:tokens]
    logits = randn(rows, h["vocab"], dtype=torch.float32)
    top_k = torch.full((rows,), 50, device=device)
    top_p = torch.full((rows,), 0.9, device=device)
    cases = [
        ("rms_norm + residual", f"{tokens} x {h['hidden']}", lambda m: m.rms_norm(x, weight, 1e-5, residual),
         norm, norm_triton),
        ("rotary", f"{tokens} tokens, {h['num_heads']}+{h['num_kv_heads']} heads",
         lambda m: m.apply_rotary(q, k, cos, sin), rotary, rotary_triton),
        ("silu_and_mul", f"{tokens} x {h['intermediate']}", lambda m: m.silu_and_mul(gate_up), activation,
         activation_triton),
        ("write_kv_cache", f"{tokens} tokens", lambda m: m.write_kv_cache(k, k, k_cache, v_cache, slots), attention,
         attention_triton),
        ("top_k_top_p_filter", f"{rows} x {h['vocab']}", lambda m: m.top_k_top_p_filter(logits, top_k, top_p), sampling,
         sampling_triton),
    ]
    rows = []
    for name, shape, call, reference, triton_impl in cases:
        triton_ms = _time_ms(lambda: call(triton_impl))
        torch_ms = _time_ms(lambda: call(reference))
        rows.append({"kernel": name, "shape": shape, "triton_ms": triton_ms, "torch_ms": torch_ms,
                     "torch": "reference", "ratio": torch_ms / triton_ms})
    return rows


def run(device: str = "cuda") -> dict:
    from kubellm.bench.progress import Progress

    progress = Progress("bench kernels", "Triton against SDPA / the references",
                        total=len(DECODE_SHAPES) + len(PREFILL_SHAPES) + 1, unit="benchmarks")
    rows = []
    for b, c in DECODE_SHAPES:
        progress.update(0, note=f"paged decode, batch {b}, context {c}")
        rows.append(bench_decode(b, c, device=device))
        progress.update()
    for n, c in PREFILL_SHAPES:
        progress.update(0, note=f"paged prefill, {n} queries, context {c}")
        rows.append(bench_prefill(n, c, device=device))
        progress.update()
    progress.update(0, note="RMSNorm, rotary, SiLU-and-mul, KV write, top-k/top-p")
    rows += bench_pointwise(device)
    progress.update()
    progress.close()
    return {"device": torch.cuda.get_device_name(device), "dtype": "bfloat16", "torch": torch.__version__,
            "rows": rows}


def format_rows(result: dict) -> str:
    lines = [f"device {result['device']}, {result['dtype']}, torch {result['torch']}; "
             "ratio = PyTorch time / Triton time (above 1: Triton faster)",
             f"{'kernel':<20} {'shape':<28} {'triton ms':>10} {'torch ms':>10} {'ratio':>7}  compared with"]
    for r in result["rows"]:
        extra = ""
        if "gather_ms" in r:
            extra += f"; gather+SDPA {r['gather_ms']:.3f} ms"
        if "triton_GBps" in r:
            extra += f"; Triton reads KV at {r['triton_GBps']:.0f} GB/s"
        if "triton_TFLOPs" in r:
            extra += f"; Triton {r['triton_TFLOPs']:.0f} TFLOP/s"
        lines.append(f"{r['kernel']:<20} {r['shape']:<28} {r['triton_ms']:>10.3f} {r['torch_ms']:>10.3f} "
                     f"{r['ratio']:>6.2f}x  {r['torch']}{extra}")
    return "\n".join(lines)


NEEDS_GPU = ("kubellm bench kernels needs a CUDA GPU: on CPU the Triton kernels only run under Triton's "
             "interpreter, whose timings mean nothing. Their correctness on CPU is checked by "
             "`TRITON_INTERPRET=1 pytest tests/kernels/test_kernels.py`. Nothing was measured.")


def main(as_json: bool = False) -> int:
    if not torch.cuda.is_available():
        print(NEEDS_GPU + " `kubellm bench kernels --cpu` measures the CPU paths.")
        return 2
    result = run()
    print(json.dumps(result) if as_json else format_rows(result))
    return 0


def command(args) -> int:
    """`kubellm bench kernels` (Triton, a GPU); `--cpu`: the CPU paths (bench/kernels_cpu.py)."""
    if args.cpu:
        from kubellm.bench import kernels_cpu
        return kernels_cpu.main(as_json=args.json)
    return main(as_json=args.json)
