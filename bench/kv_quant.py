"""`python -m kubellm.bench.kv_quant`: the quantized KV caches (kv_cache_dtype='int8' / 'int4', LMDeploy's
quant_policy=8 / 4) against the cache in the model's dtype, on the same model and prompts: greedy token
agreement (tokens equal up to the first difference, per prompt), the logprob difference of the tokens both
chose, the KV blocks each cache holds in the same memory budget, and the attention output's error with the
keys stored as they are and rotated (as the engine stores them, kernels/key_rotation.py), side by side: a
steadier measure than agreement, which one near-tie ends.

    python -m kubellm.bench.kv_quant --model smollm2-135m --new-tokens 200 [--kinds int8,int4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is to a new programmer.",
    "What are the three primary colours, and why?",
    "Give me a recipe for a simple tomato soup.",
    "Summarise the plot of a detective story in a few sentences.",
]


def _run(model: str, kv_cache_dtype: str, new_tokens: int, dtype: str, device: str, memory_gb: float,
         quantization: str | None) -> dict:
    from kubellm.runtime.config import EngineConfig, GenerationConfig
    from kubellm.runtime.engine.engine import LLMEngine

    config = EngineConfig.build(kv_cache_dtype=kv_cache_dtype, dtype=dtype, device=device, cpu_memory_gb=memory_gb,
                                max_batch_size=len(PROMPTS), quantization=quantization)
    engine = LLMEngine(model, config, show_progress=False)
    try:
        chats = [[{"role": "user", "content": p}] for p in PROMPTS]
        gen = GenerationConfig(max_new_tokens=new_tokens, logprobs=0, ignore_eos=True)
        from kubellm.bench.progress import Progress

        started = time.perf_counter()
        seqs = [engine.add_request(chat, gen) for chat in chats]
        with Progress("bench kv_quant", f"the {kv_cache_dtype} KV cache", total=len(chats) * new_tokens,
                      unit="tokens") as progress:
            while engine.has_unfinished():
                progress.update(len(engine.step()))
        result = {"kv_cache_dtype": kv_cache_dtype, "blocks": engine.block_manager.num_blocks,
                  "seconds": time.perf_counter() - started,
                  "tokens": [s.generated_ids for s in seqs], "logprobs": [s.logprobs for s in seqs],
                  "text": [s.text for s in seqs]}
        if kv_cache_dtype == "auto":   # the float cache's answers, read once more to record what attention sees
            result["attention_inputs"] = _record_attention_inputs(engine, [s.token_ids for s in seqs])
        return result
    finally:
        engine.destroy()


def _record_attention_inputs(engine, token_ids: list[list[int]]) -> list[tuple]:
    """Every layer's (q, k, v, scale) over whole answers (prompt and generated tokens, one prefill each), as the
    float cache's attention receives them: what attention_error quantizes."""
    from kubellm.runtime.config import GenerationConfig

    records = []

    def record(layer, args):
        q, k, v = (x.detach().to("cpu", torch.float64) for x in args)
        records.append((q, k, v, layer.scale))

    hooks = [layer.register_forward_pre_hook(record) for layer in engine.runner.attention_layers]
    try:
        for ids in token_ids:   # one at a time: each prefill is one whole answer
            engine.generate([ids], [GenerationConfig(max_new_tokens=1)])
    finally:
        for hook in hooks:
            hook.remove()
    return records


def attention_error(records: list[tuple], kind: str) -> dict:
    """The attention output's error when the keys and values come from a `kind` cache, relative to the float
    cache's (the norm of the difference over the norm, averaged over layers and answers; causal, every head),
    with the keys stored as they are and rotated as the engine stores them (kernels/key_rotation.py)."""
    from kubellm.kernels import key_rotation, kv_int4, kv_int8

    kv = {"int8": kv_int8, "int4": kv_int4}[kind]

    def round_trip(x):
        return kv.dequantize(*kv.quantize(x), x.dtype)

    errors = {"plain": [], "rotated": []}
    for q, k, v, scale in records:
        exact = _causal_attention(q, k, v, scale)
        rotation = key_rotation.rotation(k.shape[-1], k.dtype)
        values = round_trip(v)
        for name, keys in (("plain", round_trip(k)), ("rotated", round_trip(k @ rotation) @ rotation.T)):
            error = (_causal_attention(q, keys, values, scale) - exact).norm() / exact.norm()
            errors[name].append(error.item())
    return {name: sum(e) / len(e) for name, e in errors.items()}


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention (torch's SDPA, GQA): q [T, Hq, D], k / v [T, Hkv, D] -> [T, Hq, D]."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def compare(base: dict, quantized: dict) -> dict:
    """Agreement per prompt: the tokens equal before the first difference; logprob differences over those."""
    agreed, diffs = [], []
    for a, b, la, lb in zip(base["tokens"], quantized["tokens"], base["logprobs"], quantized["logprobs"]):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreed.append(same)
        diffs += [abs(x - y) for x, y in zip(la[:same], lb[:same])]
    total = sum(len(t) for t in base["tokens"])
    return {"agreed_tokens": agreed, "agreement": sum(agreed) / total,
            "logprob_diff_mean": sum(diffs) / max(len(diffs), 1), "logprob_diff_max": max(diffs, default=0.0),
            "blocks": {"base": base["blocks"], quantized["kv_cache_dtype"]: quantized["blocks"]},
            "blocks_ratio": quantized["blocks"] / base["blocks"]}


KINDS = ("int8", "int4")


def parse_kinds(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    wrong = [k for k in kinds if k not in KINDS]
    if wrong or not kinds:
        raise ValueError(f"--kinds {value!r}: give one or more of {', '.join(KINDS)}, comma-separated")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubellm.bench.kv_quant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--kinds", default=",".join(KINDS), help="the quantized caches to compare (int8, int4)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-gb", type=float, default=0.25,
                        help="the KV budget every cache gets (cpu_memory_gb); blocks are counted in it")
    parser.add_argument("--quantization", default="float",
                        help="the weights (EngineConfig.quantization; float: the GGUF de-quantized, so only the KV "
                             "cache differs between the runs); 'none' keeps the checkpoint's own")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as err:
        parser.error(str(err))
    quantization = None if args.quantization == "none" else args.quantization
    runs = {kind: _run(args.model, kind, args.new_tokens, args.dtype, args.device, args.memory_gb, quantization)
            for kind in ("auto", *kinds)}
    results = {kind: {**compare(runs["auto"], runs[kind]),
                      "attention_error": attention_error(runs["auto"]["attention_inputs"], kind)} for kind in kinds}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"model {args.model}, {args.dtype} on {args.device}, {len(PROMPTS)} prompts x {args.new_tokens} tokens")
    for kind, result in results.items():
        print(f"{kind}: token agreement with the {args.dtype} cache {result['agreement']:.1%} "
              f"(tokens before the first difference, per prompt: {result['agreed_tokens']}); logprob difference "
              f"over the agreed tokens: mean {result['logprob_diff_mean']:.4f}, max {result['logprob_diff_max']:.4f}; "
              f"KV blocks in {args.memory_gb} GB: {result['blocks']['base']} ({args.dtype}) vs "
              f"{result['blocks'][kind]}: {result['blocks_ratio']:.2f}x; attention output error "
              f"{result['attention_error']['rotated']:.4f} with the keys rotated, against "
              f"{result['attention_error']['plain']:.4f} stored as they are")
    for i, prompt in enumerate(PROMPTS):
        print(f"--- prompt {i}: {prompt!r}")
        for kind in ("auto", *kinds):
            print(f"  {args.dtype if kind == 'auto' else kind}: {runs[kind]['text'][i][:160]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
