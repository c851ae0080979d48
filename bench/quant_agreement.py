"""The embedded SmolLM2-135M served from its GGUF: 4-bit as stored, int8, and float32, side by side.

    python -m kubellm.bench.quant_agreement [--tokens 200] [--json]

For each weight form (`quantization` None: the GGUF's Q4_1 layers and Q8_0 embedding as stored;
"int8": re-quantized per output channel on load; "float": de-quantized to float32 on load, the
reference) it prints the answer to the README's prompt, then greedy-decodes five prompts for --tokens
tokens each and reports, against float32, the share of positions whose token agrees up to the first
difference (the common prefix) and overall, plus the weight bytes the layers hold and decode tok/s.
Slow on a CPU (a few minutes): a benchmark, not a unit test. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

README_PROMPT = "The capital of France is"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "Once upon a time, there was a little robot who", "The three primary colors are"]
FORMS = {"gguf (Q4_1 + Q8_0 head)": None, "int8": "int8", "float32": "float"}


def _weight_bytes(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if ".quantized." in f".{name}")
    return params + packed


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(tokens: int = 200, progress=sys.stderr) -> dict:
    from kubellm.runtime.config import EngineConfig, GenerationConfig
    from kubellm.runtime.engine.engine import LLMEngine
    from kubellm.runtime.hub.embedded import DEFAULT_MODEL, pull

    path = pull(DEFAULT_MODEL)
    results, started = {}, time.monotonic()
    for i, (label, quantization) in enumerate(FORMS.items()):
        eta = f" (about {(time.monotonic() - started) / i * (len(FORMS) - i):.0f} s left)" if i else ""
        print(f"[{i + 1}/{len(FORMS)}] {label}: loading and decoding {len(PROMPTS)} x {tokens} tokens{eta}",
              file=progress, flush=True)
        engine = LLMEngine(path, EngineConfig.build(quantization=quantization, max_num_batched_tokens=256),
                           show_progress=False)
        try:
            answer = engine.generate([README_PROMPT], [GenerationConfig(max_new_tokens=24)])[0].text
            t0 = time.perf_counter()
            seqs = engine.generate(PROMPTS, [GenerationConfig(max_new_tokens=tokens, ignore_eos=True)] * len(PROMPTS))
            elapsed = time.perf_counter() - t0
            results[label] = {"quantization": quantization, "answer": answer,
                              "tokens": [s.generated_ids for s in seqs], "weight_bytes": _weight_bytes(engine.runner.model),
                              "tok_per_s": len(PROMPTS) * tokens / elapsed}
        finally:
            engine.destroy()
    reference = results["float32"]["tokens"]
    for r in results.values():
        same = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(r["tokens"], reference))
        prefix = sum(_prefix(a, b) for a, b in zip(r["tokens"], reference))
        total = sum(len(b) for b in reference)
        r["agreement"], r["common_prefix"] = same / total, prefix / total
        r["prefixes"] = [_prefix(a, b) for a, b in zip(r["tokens"], reference)]
    return {"model": DEFAULT_MODEL, "tokens_per_prompt": tokens, "prompts": PROMPTS, "results": results}


def format_result(result: dict) -> str:
    lines = [f"{result['model']} from its GGUF, {len(result['prompts'])} prompts x {result['tokens_per_prompt']} "
             "greedy tokens, agreement with float32 (positions equal; common prefix per prompt)"]
    for label, r in result["results"].items():
        lines.append(f"{label:<26} weights {r['weight_bytes'] / 1e6:7.1f} MB  agreement {r['agreement']:6.1%}  "
                     f"prefix {r['common_prefix']:6.1%} {r['prefixes']}  {r['tok_per_s']:5.1f} tok/s (5 concurrent)")
        lines.append(f"{'':<26} {README_PROMPT!r} -> {r['answer']!r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubellm.bench.quant_agreement", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.tokens)
    if args.json:
        for r in result["results"].values():
            r.pop("tokens")
        print(json.dumps(result))
    else:
        print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
