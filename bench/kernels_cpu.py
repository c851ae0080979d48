"""`kubellm bench kernels --cpu`: the CPU paths of a decode step, each against the alternatives, on one model's shapes.

Decode multiplies a few rows by every weight, so on CPU a step is bound by how fast the weights are read.
For each projection of the model (SmolLM2-135M's by default: the embedded model) and each row count
(1: batch-1 decode; 16: sixteen sequences), every candidate kernel is timed on enough copies of the
weight, used in turn, that they do not fit in the CPU's last-level cache: each call reads its weight
from memory, as a model step does. Reported: ms per call, the GB/s of the weight bytes as stored, and
the speed-up over float32 `F.linear` (MKL on the plain tensor, what the engine used before issue 19).

Candidates, per weight format (the `engine` column marks what the layers use on CPU):
- float32 / bfloat16: `F.linear`, and oneDNN on the weight packed once (kernels/linear_cpu.py);
- int8 (per output channel): kubellm's C++ kernel with float32 activations (kernels/native.py, where it
  builds), `aten._weight_int8pack_mm` with bfloat16 or float32 activations (kernels/quant_cpu.py), and the
  plain-PyTorch reference (de-quantize, then `F.linear`; kernels/quant.py);
- int4 (group 32): `aten._weight_int4pack_mm_for_cpu` with bfloat16 activations, and the reference.

Then decode attention over a paged cache (kernels/attention.py): one sequence with its keys cut to its
context and no mask, against the same with a boolean mask; sixteen sequences with an additive float mask
against a boolean one. And the read bandwidth (torch.sum over 1 GiB), the roofline's.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

# The embedded model's projections (SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, MLP 1536,
# vocabulary 49152): name -> (out, in).
SMOLLM2_SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576),
                  "down_proj": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 16)
CACHE_BYTES = 32 * 2 ** 20        # this machine's L3; the copies of a weight add up to 4x that
MIN_SECONDS = 0.25                # each candidate is timed for at least this long


def time_calls(fns: list, min_seconds: float = MIN_SECONDS) -> float:
    """ms per call of the functions called in turn (each reads its own weight), after a warm-up round."""
    for fn in fns:
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        for fn in fns:
            fn()
        calls += len(fns)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 1e3 * elapsed / calls


def _copies(nbytes: int, cache_bytes: int) -> int:
    return max(2, -(-4 * cache_bytes // max(nbytes, 1)))


def _candidates(out_features: int, in_features: int, gen: torch.Generator, rows: int):
    """(format, kernel, weight bytes, make(weight float32) -> fn(x) , x dtype, used by the engine at `rows`)."""
    from kubellm.kernels import linear_cpu, native, quant, quant_cpu

    n, k = out_features, in_features
    group = 32

    def int8_parts(w):
        q, scales = quant.quantize_int8(w)
        return quant_cpu.prepare_int8(q, scales)

    def int4_parts(w):
        q = torch.randint(0, 16, (n, k), generator=gen)
        scales = w.abs().reshape(n, k // group, group).amax(-1) / 8 + 1e-6
        return quant.pack_int4(q), scales, -8 * scales

    def int8_ref(w):
        q, scales = quant.quantize_int8(w)
        return lambda x: quant.int8_linear(x, q, scales)

    def int4_ref(w):
        packed, scales, mins = int4_parts(w)
        return lambda x: quant.int4_linear(x, packed, scales, mins)

    def int4pack(w):
        packed, scales_and_zeros = quant_cpu.prepare_int4(*int4_parts(w))
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)

    def int8pack(w, act):
        q, scales = int8_parts(w)
        scales = scales.to(act)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scales)

    def int8_native(w):
        q, scales = int8_parts(w)
        return lambda x: native.int8_linear(x, q, scales)

    f32, bf16 = torch.float32, torch.bfloat16
    native_rows = native.available() and rows <= quant_cpu.NATIVE_INT8_ROWS   # quant_cpu.int8_linear's choice
    return [
        ("float32", "F.linear (MKL)", 4 * n * k, lambda w: (lambda x: F.linear(x, w)), f32, False),
        ("float32", "oneDNN packed", 4 * n * k, lambda w: (lambda x, p=linear_cpu.pack(w): linear_cpu.linear(x, p, None)),
         f32, True),
        ("bfloat16", "F.linear", 2 * n * k, lambda w: (lambda x, b=w.to(bf16): F.linear(x, b)), bf16, False),
        ("bfloat16", "oneDNN packed", 2 * n * k,
         lambda w: (lambda x, p=linear_cpu.pack(w.to(bf16)): linear_cpu.linear(x, p, None)), bf16, True),
        *([("int8", "kubellm C++ (native.py), f32 activations", n * k + 2 * n, int8_native, f32, native_rows)]
          if native.loaded else []),
        ("int8", "_weight_int8pack_mm, bf16 activations", n * k + 2 * n, lambda w: int8pack(w, bf16), bf16,
         not native_rows),
        ("int8", "_weight_int8pack_mm, f32 activations", n * k + 4 * n, lambda w: int8pack(w, f32), f32, False),
        ("int8", "reference (de-quantize + F.linear)", n * k + 4 * n, int8_ref, f32, False),
        ("int4", "_weight_int4pack_mm_for_cpu, bf16 activations", n * k // 2 + 4 * n * k // group, int4pack, bf16,
         True),
        ("int4", "reference (de-quantize + F.linear)", n * k // 2 + 8 * n * k // group, int4_ref, f32, False),
    ]


def bench_matmuls(shapes: dict = SMOLLM2_SHAPES, rows=ROWS, cache_bytes: int = CACHE_BYTES,
                  min_seconds: float = MIN_SECONDS, progress=None) -> list[dict]:
    """One row per (projection, row count, candidate); `speedup` is over float32 F.linear at that shape."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, (n, k) in shapes.items():
        for m in rows:
            baseline_ms = None
            for fmt, kernel, nbytes, make, act, engine in _candidates(n, k, gen, m):
                if progress is not None:
                    progress.update(0, note=f"{name} {m} rows: {fmt} {kernel}")
                copies = _copies(nbytes, cache_bytes)
                weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(copies)]
                x = torch.randn(m, k, generator=gen).to(act)
                fns = [(lambda f=make(w): f(x)) for w in weights]
                del weights
                ms = time_calls(fns, min_seconds)
                if baseline_ms is None:
                    baseline_ms = ms
                out.append({"projection": name, "shape": [n, k], "rows": m, "format": fmt, "kernel": kernel,
                            "engine": engine, "ms": ms, "weight_GBps": nbytes / ms / 1e6,
                            "speedup_vs_f32_linear": baseline_ms / ms})
        if progress is not None:
            progress.update()
    return out


def bench_attention(min_seconds: float = MIN_SECONDS, context: int = 512, heads=(9, 3, 64)) -> list[dict]:
    """Decode attention on CPU as kernels/attention.py runs it, against the masked alternatives."""
    from kubellm.kernels import attention

    hq, hkv, d = heads
    block = 16
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, 16):
        blocks_per_seq = -(-context // block)
        cache = torch.randn(batch * blocks_per_seq, block, hkv, d, generator=gen)
        tables = torch.arange(batch * blocks_per_seq).view(batch, blocks_per_seq)
        lens = torch.full((batch,), context - block // 2)   # the last block half full
        q = torch.randn(batch, hq, d, generator=gen)
        qg = q.view(batch, hkv, hq // hkv, d)
        valid = (torch.arange(blocks_per_seq * block) < lens.unsqueeze(1))[:, None, None, :]

        def boolean_mask():   # the engine's gathers (keys, values), then SDPA over the whole table, boolean mask
            k, v = (cache.index_select(0, tables.flatten()).view(batch, -1, hkv, d).transpose(1, 2) for _ in "kv")
            return F.scaled_dot_product_attention(qg, k, v, attn_mask=valid, scale=d ** -0.5)

        engine_ms = time_calls([lambda: attention.paged_decode_attention(q, cache, cache, tables, lens, d ** -0.5)],
                               min_seconds)
        bool_ms = time_calls([boolean_mask], min_seconds)
        rows.append({"kernel": "paged decode attention", "batch": batch, "context": context,
                     "engine": "keys cut to the context, no mask" if batch == 1 else "additive float mask",
                     "engine_ms": engine_ms, "alternative": "SDPA with a boolean mask", "alternative_ms": bool_ms,
                     "speedup": bool_ms / engine_ms})
    return rows


def run(shapes: dict = SMOLLM2_SHAPES, rows=ROWS, min_seconds: float = MIN_SECONDS,
        cache_bytes: int = CACHE_BYTES, bandwidth_bytes: int = 2 ** 30) -> dict:
    from kubellm.bench.progress import Progress
    from kubellm.bench.roofline import measure_read_bandwidth

    progress = Progress("bench kernels --cpu", "decode-shaped matmuls", total=len(shapes) + 2, unit="steps")
    matmuls = bench_matmuls(shapes, rows, cache_bytes, min_seconds, progress)
    progress.update(0, note="decode attention")
    attn = bench_attention(min_seconds)
    progress.update()
    progress.update(0, note="read bandwidth")
    bandwidth = measure_read_bandwidth(bandwidth_bytes)
    progress.update()
    progress.close()
    return {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "read_bandwidth_GBps": bandwidth / 1e9,
            "matmuls": matmuls, "attention": attn}


def format_result(result: dict) -> str:
    lines = [f"CPU, {result['threads']} threads, torch {result['torch']} ({result['cpu_capability']}); read bandwidth "
             f"{result['read_bandwidth_GBps']:.1f} GB/s (torch.sum over 1 GiB); weights cycled past the cache",
             f"{'projection':<13} {'rows':>4}  {'format':<9} {'kernel':<46} {'ms':>8} {'GB/s':>6} {'vs f32':>7}"]
    for r in result["matmuls"]:
        mark = "  <- engine" if r["engine"] else ""
        lines.append(f"{r['projection']:<13} {r['rows']:>4}  {r['format']:<9} {r['kernel']:<46} {r['ms']:>8.3f} "
                     f"{r['weight_GBps']:>6.1f} {r['speedup_vs_f32_linear']:>6.2f}x{mark}")
    for r in result["attention"]:
        lines.append(f"{r['kernel']}, batch {r['batch']}, context {r['context']}: {r['engine']} "
                     f"{r['engine_ms']:.3f} ms; {r['alternative']} {r['alternative_ms']:.3f} ms "
                     f"({r['speedup']:.2f}x)")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    result = run()
    print(json.dumps(result) if as_json else format_result(result))
    return 0
