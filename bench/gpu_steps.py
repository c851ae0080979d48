"""The steps of `kubellm bench gpu` (bench/gpu.py runs each in its own process, within its own time budget).

Each step is `step(ctx) -> dict` of figures. A correctness check that fails is recorded under "checks"
(name -> bool) and makes the step "fail"; `Skipped` says why a step cannot run here (a piece not built yet,
no CUDA). On a GPU the shapes are the realistic ones (Llama-3-8B's); with ctx.tiny (a CPU run, the check's
own tests) every step runs the same code on tiny shapes, the Triton kernels under Triton's interpreter,
so that the whole pipeline is exercised without a GPU. Timings on CPU mean nothing.

Tolerances (METHOD.md's bars): bf16 operands land between 1e-3 and 1e-2 relative error (||out - ref|| /
||ref||), so 2e-2 is the bound for a kernel against its plain-PyTorch reference in bf16.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kubellm.bench.kernels import time_ms

BF16_REL_TOL = 2e-2
NEAR_TIE = 0.125       # tests/runtime/engine/test_engine_gpu.py's bf16 near-tie gap (two bf16 ulps at 8-16)
LOGPROB_ATOL = 0.05    # and its bf16 logprob bound


class Skipped(Exception):
    """This step cannot run here; the message says why (and what would make it run)."""


@dataclass
class Context:
    device: str            # "cuda" or "cpu"
    tiny: bool             # tiny shapes (CPU dry run)
    workdir: Path          # shared by the steps: checkpoints made once
    budget_s: float | None = None   # what this step was given (a step that runs a subprocess stops it in time)
    partial_file: Path | None = None  # where save_partial() keeps figures a timeout must not lose

    def save_partial(self, figures: dict) -> None:
        """Figures measured so far: kept (status "timeout") if the step is killed before it returns."""
        if self.partial_file is not None:
            import json

            self.partial_file.write_text(json.dumps(figures, default=str))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# --------------------------------------------------------------------------- shared helpers
def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; NaN or infinity anywhere in `got` counts as failure (inf)."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def optional_module(name: str):
    """A kubellm module another piece of work is still writing: the module, or Skipped naming it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise Skipped(f"not built: {name} ({err})") from None


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# --------------------------------------------------------------------------- environment
def environment(ctx: Context) -> dict:
    """The device, the versions, and the two ceilings every figure is read against (METHOD.md): the copy
    bandwidth and a large bf16 matrix product's rate, both measured here on random data."""
    from kubellm.bench.roofline import measure_bandwidth

    from importlib import metadata

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "threads": torch.get_num_threads()}
    for name in ("triton", "transformers"):   # read, not imported: transformers alone takes seconds to import
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    device = torch.device(ctx.device)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, memory_GiB=props.total_memory / 2 ** 30,
                   cudnn=torch.backends.cudnn.version())
        try:
            import subprocess

            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
    else:
        import platform

        out.update(device_name=f"cpu-{platform.machine()}")
    out["bandwidth_GBps"] = measure_bandwidth(device) / 1e9
    n = 512 if ctx.tiny else 8192
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)   # random, never zeros (METHOD.md)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    ms = time_ms(lambda: a @ b, ctx.cuda)
    out["bf16_matmul_TFLOPs"] = 2 * n ** 3 / ms / 1e9
    out["matmul_size"] = n
    return out


# --------------------------------------------------------------------------- attention kernels
DECODE_TINY, PREFILL_TINY = [(1, 40), (3, 70)], [(16, 16), (8, 45)]


def attention_kernels(ctx: Context) -> dict:
    """Paged decode and prefill attention (Triton) against their references (correctness, fresh random
    inputs per shape) and against PyTorch SDPA on dense KV (speed; bench/kernels.py's shapes)."""
    from kubellm.bench import kernels as bench_kernels
    from kubellm.kernels import attention, attention_triton

    h = dict(bench_kernels.LLAMA3_8B) if not ctx.tiny else dict(num_heads=4, num_kv_heads=2, head_dim=32)
    dtype, checks, errors = torch.bfloat16, {}, {}
    gen = torch.Generator(device=ctx.device).manual_seed(random.randrange(2 ** 31))
    scale = h["head_dim"] ** -0.5
    # Correctness first (METHOD.md): the Triton kernels against the gather + SDPA references.
    for batch, context in ([(2, 300), (5, 1100)] if not ctx.tiny else DECODE_TINY):
        k_cache, v_cache, tables = bench_kernels._paged_cache([context] * batch, h, dtype, ctx.device, gen)
        lens = torch.full((batch,), context, dtype=torch.long, device=ctx.device)
        q = torch.randn(batch, h["num_heads"], h["head_dim"], device=ctx.device, dtype=dtype, generator=gen)
        got = attention_triton.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        want = attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        name = f"decode batch {batch}, context {context}"
        errors[name] = rel_error(got, want)
        checks[name] = errors[name] <= BF16_REL_TOL
    for num_queries, context in ([(300, 300), (64, 1000)] if not ctx.tiny else PREFILL_TINY):
        k_cache, v_cache, tables = bench_kernels._paged_cache([context], h, dtype, ctx.device, gen)
        table = tables[0]
        k, v = bench_kernels._dense(k_cache, table, context), bench_kernels._dense(v_cache, table, context)
        chunk_k, chunk_v = k[:, context - num_queries:].transpose(0, 1), v[:, context - num_queries:].transpose(0, 1)
        q = torch.randn(num_queries, h["num_heads"], h["head_dim"], device=ctx.device, dtype=dtype, generator=gen)
        got = attention_triton.paged_prefill_attention(q, chunk_k, chunk_v, k_cache, v_cache, table, context, scale)
        want = attention.paged_prefill_attention(q, chunk_k, chunk_v, k_cache, v_cache, table, context, scale)
        name = f"prefill {num_queries} queries, context {context}"
        errors[name] = rel_error(got, want)
        checks[name] = errors[name] <= BF16_REL_TOL
    # Speed against SDPA.
    decode_shapes = bench_kernels.DECODE_SHAPES if not ctx.tiny else DECODE_TINY
    prefill_shapes = bench_kernels.PREFILL_SHAPES if not ctx.tiny else PREFILL_TINY
    rows = []
    for kind, shapes in ((bench_kernels.bench_decode, decode_shapes), (bench_kernels.bench_prefill, prefill_shapes)):
        for a, b in shapes:
            rows.append(kind(a, b, device=ctx.device, heads=h))
            ctx.save_partial({"checks": checks, "rel_errors": errors, "rows": rows})
    decode = [r["ratio"] for r in rows if r["kernel"] == "paged decode"]
    prefill = [r["ratio"] for r in rows if r["kernel"] == "paged prefill"]
    return {"checks": checks, "rel_errors": errors, "rows": rows,
            "decode_ratio_min": min(decode), "decode_ratio_geomean": geomean(decode),
            "prefill_ratio_min": min(prefill), "prefill_ratio_geomean": geomean(prefill)}


# --------------------------------------------------------------------------- pointwise kernels
def pointwise_kernels(ctx: Context) -> dict:
    """KV write, RMSNorm (+ residual), rotary, SiLU-and-mul and top-k/top-p: Triton against the references,
    for correctness on fresh random inputs, then for speed (bench/kernels.py's cases)."""
    from kubellm.bench import kernels as bench_kernels
    from kubellm.kernels import (activation, activation_triton, attention, attention_triton, norm, norm_triton,
                                 rotary, rotary_triton, sampling, sampling_triton)

    h = dict(bench_kernels.LLAMA3_8B) if not ctx.tiny else dict(num_heads=4, num_kv_heads=2, head_dim=32, hidden=64,
                                                                  intermediate=96, vocab=500)
    tokens, rows_ = (777, 32) if not ctx.tiny else (19, 3)
    dtype, dev = torch.bfloat16, ctx.device
    gen = torch.Generator(device=dev).manual_seed(random.randrange(2 ** 31))

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)

    errors, checks = {}, {}

    def compare(name, got, want):
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        errors[name] = max(rel_error(g, w) for g, w in zip(got, want))
        checks[name] = errors[name] <= BF16_REL_TOL

    x, residual, weight = randn(tokens, h["hidden"]), randn(tokens, h["hidden"]), randn(h["hidden"])
    compare("rms_norm + residual", norm_triton.rms_norm(x.clone(), weight, 1e-5, residual.clone()),
            norm.rms_norm(x.clone(), weight, 1e-5, residual.clone()))
    q, k = randn(tokens, h["num_heads"], h["head_dim"]), randn(tokens, h["num_kv_heads"], h["head_dim"])
    angle = randn(tokens, h["head_dim"] // 2, dtype=torch.float32)
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)
    compare("rotary", rotary_triton.apply_rotary(q.clone(), k.clone(), cos, sin),
            rotary.apply_rotary(q.clone(), k.clone(), cos, sin))
    gate_up = randn(tokens, 2 * h["intermediate"])
    compare("silu_and_mul", activation_triton.silu_and_mul(gate_up), activation.silu_and_mul(gate_up))
    caches = []
    slots = torch.randperm(-(-tokens // 16) * 2 * 16, device=dev, generator=gen)[:tokens]
    for impl in (attention_triton, attention):
        kc = torch.full((-(-tokens // 16) * 2, 16, h["num_kv_heads"], h["head_dim"]), float("nan"), device=dev,
                        dtype=dtype)   # poisoned: every slot written must be overwritten, the rest stays NaN
        vc = kc.clone()
        impl.write_kv_cache(k, k * 2, kc, vc, slots)
        caches.append((kc, vc))
    (tk, tv), (rk, rv) = caches
    same_nan = bool(torch.equal(tk.isnan(), rk.isnan()) and torch.equal(tv.isnan(), rv.isnan()))
    errors["write_kv_cache"] = 0.0 if same_nan and torch.equal(tk.nan_to_num(), rk.nan_to_num()) and \
        torch.equal(tv.nan_to_num(), rv.nan_to_num()) else math.inf
    checks["write_kv_cache"] = errors["write_kv_cache"] == 0.0
    logits = randn(rows_, h["vocab"], dtype=torch.float32) * 3
    top_k = torch.randint(1, 100, (rows_,), device=dev, generator=gen)
    top_p = torch.rand(rows_, device=dev, generator=gen) * 0.5 + 0.5
    got, want = sampling_triton.top_k_top_p_filter(logits, top_k, top_p), sampling.top_k_top_p_filter(logits, top_k, top_p)
    kept_differ = float((torch.isinf(got) != torch.isinf(want)).float().mean())   # ties at the cut may differ
    errors["top_k_top_p_filter"] = kept_differ
    checks["top_k_top_p_filter"] = kept_differ <= 1e-3
    if ctx.tiny:
        speed = bench_kernels.bench_pointwise(ctx.device, heads=h, tokens=32, rows=2)
    else:
        speed = bench_kernels.bench_pointwise(ctx.device)
    return {"checks": checks, "rel_errors": errors, "rows": speed}


# --------------------------------------------------------------------------- the engine in bf16 vs transformers
MEDIUM = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def checkpoint(ctx: Context) -> Path:
    """A Llama checkpoint with real random weights on disk (safetensors), read by both the engine and
    transformers: made once per check in the shared workdir. The LM head is drawn wider than the default
    initialization so that logits spread out (std ~5): with flat logits every step is a near-tie and
    greedy agreement would be compared over nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = ctx.workdir / ("llama-tiny" if ctx.tiny else "llama-medium")
    if (path / "done").exists():
        return path
    shape = TINY if ctx.tiny else MEDIUM
    save_tokenizer(path, shape["vocab_size"])
    config = LlamaConfig(**shape, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        gen = torch.Generator(device=ctx.device).manual_seed(1)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, device=ctx.device, generator=gen))
        model.lm_head.weight.normal_(0.0, 5.0 / config.hidden_size ** 0.5, generator=gen)
    model.save_pretrained(path, safe_serialization=True)
    (path / "done").write_text("ok")
    del model
    return path


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer as large as the model's vocabulary (the engine refuses prompt ids past the
    tokenizer's): roofline.py's special tokens and workload words first, made-up words w<i> after them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kubellm.bench.roofline import SPECIAL_TOKENS
    from kubellm.bench.workload import WORDS

    words = SPECIAL_TOKENS + sorted(set(WORDS))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=SPECIAL_TOKENS[1],
                            eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[0]).save_pretrained(path)


def random_prompts(count: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def engine_vs_hf(ctx: Context) -> dict:
    """kubellm in bf16 (Triton kernels, CUDA-graph decode) against transformers in bf16 on the same weights:
    greedy tokens equal up to the first near-tie in transformers' logits, logprobs within LOGPROB_ATOL there."""
    from transformers import AutoModelForCausalLM

    from kubellm.runtime.config import EngineConfig, GenerationConfig
    from kubellm.runtime.engine.engine import LLMEngine

    path = checkpoint(ctx)
    vocab = (TINY if ctx.tiny else MEDIUM)["vocab_size"]
    prompts = random_prompts(4 if ctx.tiny else 8, (5, 40) if ctx.tiny else (16, 600), vocab, seed=7)
    new = 8 if ctx.tiny else 32
    engine = LLMEngine(str(path), EngineConfig.build(dtype="bfloat16", device=ctx.device, max_batch_size=8,
                                                     max_num_batched_tokens=512, num_kv_blocks=None
                                                     if ctx.cuda else 256), show_progress=False)
    try:
        gen = GenerationConfig(max_new_tokens=new, ignore_eos=True, logprobs=0)
        seqs = engine.generate(prompts, [gen] * len(prompts))
        graphs = engine.runner.decode_graphs
        replays = graphs.replays if graphs is not None else 0
    finally:
        engine.destroy()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(ctx.device).eval()
    compared = agree_all = 0
    max_diff, per_prompt, ok = 0.0, [], True
    for seq, prompt in zip(seqs, prompts):
        ids = torch.tensor([prompt], device=ctx.device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logits = [step[0].float() for step in out.logits]
        logprobs = [torch.log_softmax(s, -1)[t].item() for s, t in zip(logits, tokens)]
        gaps = [(lambda top: (top[0] - top[1]).item())(s.topk(2).values) for s in logits]
        upto = next((i for i, gap in enumerate(gaps) if gap < NEAR_TIE), len(tokens))
        same = seq.generated_ids[:upto] == tokens[:upto]
        diff = max((abs(a - b) for a, b in zip(seq.logprobs[:upto], logprobs[:upto])), default=0.0)
        ok &= same and diff <= LOGPROB_ATOL
        compared += upto
        agree_all += sum(a == b for a, b in zip(seq.generated_ids, tokens))
        max_diff = max(max_diff, diff)
        per_prompt.append({"prompt_len": len(prompt), "compared": upto, "equal": same, "max_logprob_diff": diff})
    del hf
    checks = {"greedy tokens equal up to the first near-tie, logprobs within 0.05": ok}
    if ctx.cuda:
        checks["decode steps replayed CUDA graphs"] = replays > 0
    return {"checks": checks, "model": MEDIUM if not ctx.tiny else TINY, "prompts": len(prompts), "new_tokens": new,
            "tokens_compared": compared, "tokens_total": new * len(prompts),
            "token_agreement": agree_all / (new * len(prompts)), "max_logprob_diff": max_diff,
            "graph_replays": replays, "per_prompt": per_prompt}


# --------------------------------------------------------------------------- CUDA graphs
def decode_tok_s(engine, batch: int, prompt_len: int, new: int, vocab: int, seed: int) -> tuple[float, list]:
    """Decode tokens/s of `batch` sequences (prefill time taken out: a 1-token run of the same prompts' length
    first), and the generated tokens of the decode run."""
    from kubellm.runtime.config import GenerationConfig

    def run(max_new: int, seed_: int):
        prompts = random_prompts(batch, (prompt_len, prompt_len), vocab, seed_)   # fresh: no prefix-cache hits
        start = time.perf_counter()
        seqs = engine.generate(prompts, [GenerationConfig(max_new_tokens=max_new, ignore_eos=True)] * batch)
        return time.perf_counter() - start, seqs

    run(4, seed + 100)    # warm-up
    prefill_s, _ = run(1, seed + 200)
    total_s, seqs = run(1 + new, seed)
    return batch * new / max(total_s - prefill_s, 1e-9), [s.generated_ids for s in seqs]


def cuda_graphs(ctx: Context) -> dict:
    """Decode with CUDA graphs (the default) against enforce_eager on the medium model, batch 1 and 16."""
    if not ctx.cuda:
        raise Skipped("CUDA graphs need a CUDA device")
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine.engine import LLMEngine

    path = checkpoint(ctx)
    vocab = MEDIUM["vocab_size"]
    out, tokens = {}, {}
    for mode, eager in (("graphs", False), ("eager", True)):
        engine = LLMEngine(str(path), EngineConfig.build(dtype="bfloat16", device=ctx.device, max_batch_size=16,
                                                         enforce_eager=eager), show_progress=False)
        try:
            for batch in (1, 16):
                out[f"{mode}_b{batch}_tok_s"], tokens[mode, batch] = decode_tok_s(engine, batch, 128, 128, vocab, batch)
            graphs = engine.runner.decode_graphs
            out[f"{mode}_replays"] = graphs.replays if graphs is not None else 0
        finally:
            engine.destroy()
    for batch in (1, 16):
        out[f"speedup_b{batch}"] = out[f"graphs_b{batch}_tok_s"] / out[f"eager_b{batch}_tok_s"]
        pairs = [(a, b) for x, y in zip(tokens["graphs", batch], tokens["eager", batch]) for a, b in zip(x, y)]
        out[f"token_agreement_b{batch}"] = sum(a == b for a, b in pairs) / len(pairs)
    out["checks"] = {"graph decode steps replayed (replays > 0)": out["graphs_replays"] > 0,
                     "enforce_eager replayed none": out["eager_replays"] == 0}
    return out


# --------------------------------------------------------------------------- the 8B roofline
def roofline_8b(ctx: Context) -> dict:
    """Batch-1 decode of a random-weight Llama-3-8B (load_format='random') against the HBM roofline."""
    from kubellm.bench import roofline
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine.engine import LLMEngine

    name = "llama3-tiny" if ctx.tiny else "llama3-8b"
    path = roofline.make_random_checkpoint(ctx.workdir / f"random-{name}", name)
    engine = LLMEngine(str(path), EngineConfig.build(load_format="random", dtype="bfloat16", device=ctx.device,
                                                     max_batch_size=4, session_len=None if not ctx.tiny else 256,
                                                     num_kv_blocks=None if ctx.cuda else 64), show_progress=False)
    try:
        decode = roofline.batch1_decode(engine, prompt_len=32 if ctx.tiny else 512, new_tokens=16 if ctx.tiny else 256)
    finally:
        engine.destroy()
    return {"random_model": name, **decode}


# --------------------------------------------------------------------------- offline throughput vs HF
def offline_vs_hf(ctx: Context) -> dict:
    """`kubellm bench offline --random-model llama3-8b`: the engine against HF generate, the same workload."""
    from kubellm.bench.offline import offline

    if ctx.tiny:   # the tiny checkpoint (random_model would add a batch-1 decode of 256 tokens: slow on CPU)
        result = offline(str(checkpoint(ctx)), num_prompts=4, batch_size=2, prompt_len=(4, 16), new_tokens=(2, 8),
                         seed=0, device=ctx.device, on_engine_result=ctx.save_partial)
    else:
        result = offline("", num_prompts=64, batch_size=16, prompt_len=(8, 512), new_tokens=(8, 512), seed=0,
                         random_model="llama3-8b", device=ctx.device, on_engine_result=ctx.save_partial)
    return result


# --------------------------------------------------------------------------- quantized GEMMs
LLAMA8B_LINEARS = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
TINY_LINEARS = [("qkv", 128, 192), ("down", 256, 128)]
INT4_GROUP = 128
FP8_GROUP = 128


def quant_gemm(ctx: Context) -> dict:
    """W4A16 (int4, groups of 128, scales + mins), W8A16 (int8 per output channel) and FP8 (e4m3, a float32
    scale per 128 columns, as DeepSeek's / Qwen's *-FP8 blocks; sm89+) dequantize-GEMMs in Triton against the
    bf16 GEMM of the same (dequantized) weights, at Llama-3-8B's linear shapes."""
    quant = optional_module("kubellm.kernels.quant")
    quant_triton = optional_module("kubellm.kernels.quant_triton")
    import torch.nn.functional as F

    dev, dtype = ctx.device, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(random.randrange(2 ** 31))
    group = 32 if ctx.tiny else INT4_GROUP
    fp8 = not ctx.cuda or torch.cuda.get_device_capability() >= (8, 9)   # Triton's e4m3 conversion
    rows, checks, errors = [], {}, {}
    for name, k, n in (TINY_LINEARS if ctx.tiny else LLAMA8B_LINEARS):
        q4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev, generator=gen)
        scales = (torch.rand(n, k // group, device=dev, generator=gen) * 0.02 + 0.005).to(dtype)
        mins = -8 * scales
        w4 = quant.dequantize_int4(q4, scales, mins).to(dtype)
        q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev, generator=gen)
        s8 = (torch.rand(n, 1, device=dev, generator=gen) * 0.002 + 0.0005).to(dtype)
        qf = (torch.randn(n, k, device=dev, generator=gen) * 64).to(torch.float8_e4m3fn)
        sf = torch.rand(n, k // FP8_GROUP, device=dev, generator=gen) * 0.0002 + 0.00005
        for m in (1, 16):
            x = torch.randn(m, k, device=dev, dtype=dtype, generator=gen)
            label = f"{name} {m} x {k} -> {n}"
            e4 = rel_error(quant_triton.int4_linear(x, q4, scales, mins), quant.int4_linear(x, q4, scales, mins))
            e8 = rel_error(quant_triton.int8_linear(x, q8, s8), quant.int8_linear(x, q8, s8))
            errors[f"W4A16 {label}"], errors[f"W8A16 {label}"] = e4, e8
            checks[f"W4A16 {label}"], checks[f"W8A16 {label}"] = e4 <= BF16_REL_TOL, e8 <= BF16_REL_TOL
            bf16_ms = time_ms(lambda: F.linear(x, w4), ctx.cuda)
            w4_ms = time_ms(lambda: quant_triton.int4_linear(x, q4, scales, mins), ctx.cuda)
            w8_ms = time_ms(lambda: quant_triton.int8_linear(x, q8, s8), ctx.cuda)
            row = {"linear": name, "rows": m, "k": k, "n": n, "bf16_ms": bf16_ms, "w4a16_ms": w4_ms,
                   "w8a16_ms": w8_ms, "w4a16_speedup": bf16_ms / w4_ms, "w8a16_speedup": bf16_ms / w8_ms,
                   "bf16_GBps": 2 * n * k / bf16_ms / 1e6, "w4a16_GBps": n * k / 2 / w4_ms / 1e6,
                   "w8a16_GBps": n * k / w8_ms / 1e6}
            if fp8:
                ef = rel_error(quant_triton.fp8_linear(x, qf, sf), quant.fp8_linear(x, qf, sf))
                errors[f"FP8 {label}"], checks[f"FP8 {label}"] = ef, ef <= BF16_REL_TOL
                fp8_ms = time_ms(lambda: quant_triton.fp8_linear(x, qf, sf), ctx.cuda)
                row.update(fp8_ms=fp8_ms, fp8_speedup=bf16_ms / fp8_ms, fp8_GBps=n * k / fp8_ms / 1e6)
            rows.append(row)
            ctx.save_partial({"checks": checks, "rel_errors": errors, "rows": rows})
    try:
        importlib.import_module("kubellm.runtime.executor.layers.quantization")
        layers = "present"
    except ImportError as err:
        layers = f"not built ({err})"
    b1 = [r for r in rows if r["rows"] == 1]
    return {"checks": checks, "rel_errors": errors, "rows": rows, "int4_group": group, "quantized_layers": layers,
            "w4a16_speedup_b1": geomean([r["w4a16_speedup"] for r in b1]),
            "w8a16_speedup_b1": geomean([r["w8a16_speedup"] for r in b1]),
            "fp8_speedup_b1": geomean([r["fp8_speedup"] for r in b1]) if fp8 else None,
            "w4a16_speedup_b16": geomean([r["w4a16_speedup"] for r in rows if r["rows"] == 16])}


# --------------------------------------------------------------------------- int8 / int4 KV decode attention
INT8_DECODE_SHAPES = [(1, 8192), (16, 2048), (64, 4096)]
KV_FORMATS = {"int8": "kubellm.kernels.kv_int8", "int4": "kubellm.kernels.kv_int4"}


def int8_kv_attention(ctx: Context) -> dict:
    """Paged decode attention reading a quantized KV cache (int8: a scale per token and head; int4: a scale and
    zero) against the bf16 cache: speed, error against the reference on the same quantized cache and against
    exact bf16 attention; then, where the engine takes kv_cache_dtype, its greedy agreement with the bf16
    cache and the blocks gained. (Named for int8, its first format: earlier reports keep their keys.)"""
    formats = {kind: optional_module(name) for kind, name in KV_FORMATS.items()}
    from kubellm.bench import kernels as bench_kernels
    from kubellm.kernels import attention, attention_triton

    if "k_scale" not in inspect.signature(attention_triton.paged_decode_attention).parameters:
        raise Skipped("not built: attention_triton.paged_decode_attention takes no k_scale / v_scale (int8 KV)")
    h = dict(bench_kernels.LLAMA3_8B) if not ctx.tiny else dict(num_heads=4, num_kv_heads=2, head_dim=32)
    dtype, dev = torch.bfloat16, ctx.device
    gen = torch.Generator(device=dev).manual_seed(random.randrange(2 ** 31))
    scale = h["head_dim"] ** -0.5
    rows, checks, errors = [], {}, {}
    for batch, context in (INT8_DECODE_SHAPES if not ctx.tiny else DECODE_TINY):
        k_cache, v_cache, tables = bench_kernels._paged_cache([context] * batch, h, dtype, dev, gen)
        lens = torch.full((batch,), context, dtype=torch.long, device=dev)
        q = torch.randn(batch, h["num_heads"], h["head_dim"], device=dev, dtype=dtype, generator=gen)
        label = f"batch {batch}, context {context}"
        exact = attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        bf16_ms = time_ms(lambda: attention_triton.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale),
                          ctx.cuda)
        row = {"shape": label, "bf16_ms": bf16_ms}
        for kind, kv in formats.items():
            (kq, ks), (vq, vs) = kv.quantize(k_cache), kv.quantize(v_cache)
            scales = dict(k_scale=ks, v_scale=vs)
            got = attention_triton.paged_decode_attention(q, kq, vq, tables, lens, scale, **scales)
            ref = attention.paged_decode_attention(q, kq, vq, tables, lens, scale, **scales)
            key = label if kind == "int8" else f"{kind} {label}"
            errors[key] = rel_error(got, ref)
            checks[key] = errors[key] <= BF16_REL_TOL
            ms = time_ms(lambda: attention_triton.paged_decode_attention(q, kq, vq, tables, lens, scale, **scales),
                         ctx.cuda)
            prefix = "" if kind == "int8" else f"{kind}_"
            row.update({f"{kind}_ms": ms, f"{prefix}speedup": bf16_ms / ms,
                        f"{prefix}error_vs_exact_bf16": rel_error(got, exact)})
        rows.append(row)
    out = {"checks": checks, "rel_errors": errors, "rows": rows, "speedup_geomean": geomean([r["speedup"] for r in rows])}
    out["int4_speedup_geomean"] = geomean([r["int4_speedup"] for r in rows])
    out.update(_quantized_kv_engine(ctx, list(formats)))
    return out


def _quantized_kv_engine(ctx: Context, kinds: list[str]) -> dict:
    from kubellm.runtime.config import EngineConfig, GenerationConfig
    from kubellm.runtime.engine.engine import LLMEngine

    if "kv_cache_dtype" not in EngineConfig.model_fields:
        return {"engine": "skipped: EngineConfig has no kv_cache_dtype"}
    path = checkpoint(ctx)
    vocab = (TINY if ctx.tiny else MEDIUM)["vocab_size"]
    prompts = random_prompts(4 if ctx.tiny else 8, (5, 40) if ctx.tiny else (200, 1500), vocab, seed=11)
    new = 8 if ctx.tiny else 64
    tokens, blocks = {}, {}
    for kv in ("auto", *kinds):
        engine = LLMEngine(str(path), EngineConfig.build(dtype="bfloat16", device=ctx.device, max_batch_size=8,
                                                         kv_cache_dtype=kv), show_progress=False)
        try:
            gen = GenerationConfig(max_new_tokens=new, ignore_eos=True)
            tokens[kv] = [s.generated_ids for s in engine.generate(prompts, [gen] * len(prompts))]
            blocks[kv] = engine.runner.kv_block_bytes()   # the cache's size is capped by what a batch can use
        finally:
            engine.destroy()
    out = {"kv_block_bytes_bf16": blocks["auto"]}
    for kind in kinds:
        pairs = [(a, b) for x, y in zip(tokens["auto"], tokens[kind]) for a, b in zip(x, y)]
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                 for x, y in zip(tokens["auto"], tokens[kind])]
        prefix = "" if kind == "int8" else f"{kind}_"
        out.update({f"{prefix}engine_token_agreement": sum(a == b for a, b in pairs) / len(pairs),
                    f"{prefix}engine_tokens_before_first_difference": statistics.mean(first),
                    f"kv_block_bytes_{kind}": blocks[kind],
                    f"{prefix}kv_blocks_gain": blocks["auto"] / blocks[kind]})   # blocks in the same memory
    return out


# --------------------------------------------------------------------------- the repository's GPU tests
GPU_TESTS = ["tests/kernels/test_kernels.py", "tests/runtime/engine/test_engine_gpu.py",
             "tests/runtime/executor/test_cuda_graphs.py"]


def gpu_tests(ctx: Context) -> dict:
    """`pytest -m gpu` over the test files written for a GPU (compiled kernels at realistic shapes, the engine
    against transformers in bf16, real CUDA graphs): every test's outcome, from pytest's JUnit XML."""
    root = Path.cwd()
    files = [f for f in GPU_TESTS if (root / f).exists()]
    if not files:
        raise Skipped(f"no tests/ here ({root}): run from the repository's root")
    if not ctx.cuda:
        raise Skipped("the tests marked gpu need a CUDA device (the CPU tiers run them elsewhere)")
    report = ctx.workdir / "gpu-tests.xml"
    # Stopped before the step's own budget runs out, so that the outcomes so far are still read and kept.
    limit = max(10.0, ctx.budget_s - 15) if ctx.budget_s else None
    exit_code, output = run_pytest(root, ["-m", "gpu", *files], report, timeout=limit)
    tests = junit_outcomes(report) or verbose_outcomes(output)
    counts = {o: sum(t["outcome"] == o for t in tests.values()) for o in ("passed", "failed", "error", "skipped")}
    checks = {"every GPU test passed": exit_code == 0 and counts["passed"] > 0}
    if exit_code is None:
        checks[f"pytest finished within {limit:.0f} s"] = False
    return {"checks": checks, "pytest_exit": exit_code, "counts": counts, "tests": tests, "files": files,
            "summary": (output.strip().splitlines() or [""])[-1]}


def run_pytest(root: Path, args: list[str], junit: Path, timeout: float | None = None) -> tuple[int | None, str]:
    """(exit code, or None when stopped at `timeout`; its output so far). -v: one line per test as it ends, read
    back by verbose_outcomes when pytest is stopped before it writes the JUnit report."""
    import subprocess
    import sys

    # importlib: pytest puts no test or conftest folder first on sys.path, where the checkout's kubellm/ (the top
    # package's two files only) would shadow the installed or mapped package (e2e/gpu-check.sh's tree).
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--import-mode=importlib",
               f"--junitxml={junit}", *args]
    try:
        run = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)
        return run.returncode, run.stdout
    except subprocess.TimeoutExpired as stopped:   # subprocess.run has killed it
        out = stopped.stdout or b""
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out


def verbose_outcomes(output: str) -> dict:
    """pytest -v's lines `file::test PASSED [ 10%]` -> junit_outcomes' form (no seconds, no messages)."""
    import re

    outcomes = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "skipped",
                "XPASS": "passed"}
    tests = {}
    for line in output.splitlines():
        match = re.match(r"^(\S+::\S+(?:\[.*?\])?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if match:
            tests[match.group(1)] = {"outcome": outcomes[match.group(2)]}
    return tests


def junit_outcomes(path: Path) -> dict:
    """pytest's JUnit XML -> {"file::test": {"outcome": passed / failed / error / skipped, "seconds", "message"}}."""
    import xml.etree.ElementTree as ET

    tests = {}
    if not path.exists():
        return tests
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tests[name] = {"outcome": "passed", "seconds": float(case.get("time") or 0)}
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                tests[name].update(outcome=outcome, message=(node.get("message") or "")[:300])
                break
    return tests


STEPS = {
    "environment": environment,
    "attention_kernels": attention_kernels,
    "pointwise_kernels": pointwise_kernels,
    "engine_vs_hf": engine_vs_hf,
    "cuda_graphs": cuda_graphs,
    "roofline_8b": roofline_8b,
    "quant_gemm": quant_gemm,
    "int8_kv_attention": int8_kv_attention,
    "offline_vs_hf": offline_vs_hf,
    "gpu_tests": gpu_tests,
}
