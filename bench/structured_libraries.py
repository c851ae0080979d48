"""`python -m kubellm.bench.structured_libraries`: how structured outputs' library was picked (engine/structured.py).

xgrammar, llguidance and outlines-core, each from PyPI (`pip install xgrammar==0.2.9 llguidance==1.9.1
outlines-core==0.2.14`; a missing one is skipped), given the same JSON schema and the embedded model's tokenizer
(SmolLM2, 49,152 tokens). `--batch` (16) matchers walk 16 different valid documents token by token; at each step
the batch's next-token bitmask (int32, one row per sequence, what the sampler applies in one op) is filled, once
through the library's batch call (where it has one) and once row by row. Printed: the grammar's compile time and
the median / p90 fill time per step.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}}}
WORDS = ["alpha", "Ada", "engine", "poetry", "x", "longer words here", "42", "été", 'quote"s']


def documents(batch: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [json.dumps({"name": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
                        "age": rng.randint(0, 10 ** rng.randint(1, 8)),
                        "tags": [rng.choice(WORDS) for _ in range(rng.randint(0, 5))], "ok": rng.random() < .5},
                       ensure_ascii=False) for _ in range(batch)]


def walk(rows: list[list[int]], fill, accept) -> list[float]:
    """Fill the batch's mask, then advance every row still in its document; the fill times."""
    times = []
    for step in range(max(map(len, rows))):
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        for r, ids in enumerate(rows):
            if step < len(ids) and not accept(r, ids[step]):
                raise RuntimeError(f"row {r} refused its own document's token {step}")
    return times


def xgrammar_cases(tok, vocab, rows, batch):
    import xgrammar as xgr

    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    batched = xgr.BatchGrammarMatcher()   # its thread pool, made once (as structured.py keeps one)
    out = []
    for name, fill_of in (("xgrammar (batch)", lambda ms: lambda: batched.batch_fill_next_token_bitmask(ms, bitmask)),
                          ("xgrammar (rows)", lambda ms: lambda: [m.fill_next_token_bitmask(bitmask, i)
                                                                  for i, m in enumerate(ms)])):
        matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
        out.append((name, compile_s, walk(rows, fill_of(matchers), lambda r, t: matchers[r].accept_token(t))))
    return out


def llguidance_cases(tok, vocab, rows, batch):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": True})
    compile_s = time.perf_counter() - start
    bitmask = llguidance.torch.allocate_token_bitmask(batch, vocab)
    executor = llguidance.LLExecutor()
    out = []
    for name, fill_of in (("llguidance (batch)", lambda ms: lambda: llguidance.torch.fill_next_token_bitmask_par(
                              executor, [(m, i) for i, m in enumerate(ms)], bitmask)),
                          ("llguidance (rows)", lambda ms: lambda: [llguidance.torch.fill_next_token_bitmask(
                              m, bitmask, i) for i, m in enumerate(ms)])):
        matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(batch)]
        out.append((name, compile_s, walk(rows, fill_of(matchers), lambda r, t: matchers[r].consume_token(t))))
    return out


def _byte_level_vocabulary(tok) -> dict[bytes, list[int]]:
    """outlines-core wants each token's bytes; a byte-level BPE spells them with GPT-2's printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    to_byte = {c: b for b, c in chars.items()}
    vocabulary: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i != tok.eos_token_id:
            key = bytes(to_byte[c] for c in text) if all(c in to_byte for c in text) else text.encode()
            vocabulary.setdefault(key, []).append(i)
    return vocabulary


def outlines_cases(tok, vocab, rows, batch):
    import outlines_core
    import torch
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)),
                                outlines_core.Vocabulary(tok.eos_token_id, _byte_level_vocabulary(tok)))
    compile_s = time.perf_counter() - start
    words = -(-vocab // 32)
    bitmask = torch.zeros((batch, words), dtype=torch.int32)
    guides = [outlines_core.Guide(index) for _ in range(batch)]

    def fill():   # no batch call: one row at a time
        for i, guide in enumerate(guides):
            guide.write_mask_into(bitmask[i].data_ptr(), words, 4)

    def accept(r, t):
        guides[r].advance(t)
        return True

    return [("outlines-core (rows)", compile_s, walk(rows, fill, accept))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    from kubellm.runtime.hub.embedded import resolve_model

    path = resolve_model(args.model)
    tok, vocab = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path).vocab_size
    rows = [tok.encode(d, add_special_tokens=False) for d in documents(args.batch, args.seed)]
    print(f"{args.model}: vocabulary {vocab}, batch {args.batch}, {max(map(len, rows))} steps")
    print(f"{'library':<22} {'compile ms':>10} {'fill median ms':>15} {'fill p90 ms':>12}")
    for cases in (xgrammar_cases, llguidance_cases, outlines_cases):
        try:
            results = cases(tok, vocab, rows, args.batch)
        except ImportError as err:
            print(f"{cases.__name__.removesuffix('_cases'):<22} skipped ({err})")
            continue
        for name, compile_s, times in results:
            p90 = sorted(times)[int(len(times) * 0.9)]
            print(f"{name:<22} {compile_s * 1e3:>10.1f} {statistics.median(times) * 1e3:>15.3f} {p90 * 1e3:>12.3f}")


if __name__ == "__main__":
    main()
