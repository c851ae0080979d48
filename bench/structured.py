"""`python -m kubellm.bench.structured`: what structured outputs cost a decode step.

A batch of `--batch` sequences (16) decodes on the embedded model (SmolLM2-135M) at temperature 1, free and under
each JSON schema below, the cases in turn for `--rounds` rounds; only steps where the whole batch decodes are
timed (prefill steps excluded),
and the schemas make every output far longer than the timed steps, so no sequence leaves the batch early. Printed
side by side: the median step, the mask's own time per step (the grammars filling the batch's token bitmask,
xgrammar on the host, all rows in one call, plus unpacking and applying it to the logits), the step's overhead
against the free one, and the mask's time as a share of the free step (what the overhead is once timing noise is
taken out: on a busy machine the steps' medians differ by more than the mask costs). The target is at most 10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SCHEMAS = {
    # every output at least 200 integers: about 400 tokens or more
    "int array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9999}, "minItems": 200},
    # at least 40 objects of a bounded name and an age
    "objects": {"type": "array", "minItems": 40,
                "items": {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
                          "properties": {"name": {"type": "string", "maxLength": 16},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                  "maxItems": 3}}}},
}


class FillTimer:
    """Wraps SequenceGrammar.fill_rows (the grammars fill the batch's bitmask) and the sampler's apply_bitmask
    (unpack and mask the logits) to add up the time each takes. The apply is timed to its end on the device."""

    def __init__(self):
        import torch

        from kubellm.runtime.engine.structured import SequenceGrammar
        from kubellm.runtime.executor import sampler

        self.cls, self.original, self.seconds = SequenceGrammar, SequenceGrammar.fill_rows, []
        self.sampler, self.original_apply = sampler, sampler.apply_bitmask
        timer = self

        def timed(cls, grammars, bitmask, rows):
            start = time.perf_counter()
            timer.original.__func__(cls, grammars, bitmask, rows)
            timer.seconds.append(time.perf_counter() - start)

        def timed_apply(logits, bitmask, rows, apply_rows=None):
            start = time.perf_counter()
            out = timer.original_apply(logits, bitmask, rows, apply_rows)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            timer.seconds.append(time.perf_counter() - start)
            return out

        SequenceGrammar.fill_rows = classmethod(timed)
        sampler.apply_bitmask = timed_apply

    def restore(self):
        self.cls.fill_rows = self.original
        self.sampler.apply_bitmask = self.original_apply


def time_steps(engine, gens, prompts, steps: int, fill: FillTimer) -> tuple[list[float], list[float]]:
    """Per timed step: its wall time and its bitmask fill time (0 when free)."""
    from kubellm.runtime.engine.sequence import Status

    seqs = [engine.add_request(p, g) for p, g in zip(prompts, gens)]
    step_times, fill_times = [], []
    try:
        while len(step_times) < steps:
            decoding = all(s.status is Status.RUNNING and s.num_computed_tokens == len(s) - 1 for s in seqs)
            before = len(fill.seconds)
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if decoding:   # every sequence decodes this step (no prefill chunk in it)
                if any(s.is_finished for s in seqs):
                    raise RuntimeError("a sequence finished inside the timed steps; raise --max-new or fix the schema")
                step_times.append(elapsed)
                fill_times.append(sum(fill.seconds[before:]))
    finally:
        for s in seqs:
            engine.abort(s.request_id)
    return step_times, fill_times


def run(model: str, batch: int, steps: int, warmup: int, device: str, dtype: str, seed: int,
        rounds: int = 3) -> list[dict]:
    from kubellm.runtime.config import EngineConfig, GenerationConfig
    from kubellm.runtime.engine.engine import LLMEngine

    engine = LLMEngine(model, EngineConfig.build(device=device, dtype=dtype, max_batch_size=batch,
                                                 enable_prefix_caching=False), show_progress=False)
    fill = FillTimer()
    try:
        prompts = [[{"role": "user", "content": f"List some numbers and people, please (request {i})."}]
                   for i in range(batch)]
        max_new = max(warmup, steps) + 64
        cases = [("free", {})] + [(name, {"guided_json": schema}) for name, schema in SCHEMAS.items()]
        gens = {name: [GenerationConfig(temperature=1.0, random_seed=seed + i, max_new_tokens=max_new,
                                        ignore_eos=True, **options) for i in range(batch)] for name, options in cases}
        for name, _ in cases:   # compiles the grammars, warms caches (and CUDA graphs)
            time_steps(engine, gens[name], prompts, warmup, fill)
        times = {name: ([], []) for name, _ in cases}
        for r in range(rounds):   # the cases in turn, so that a busy machine slows them alike
            for name, _ in cases:
                step_times, fill_times = time_steps(engine, gens[name], prompts, steps, fill)
                times[name][0].extend(step_times)
                times[name][1].extend(fill_times)
                print(f"round {r + 1}/{rounds} {name}: median step {statistics.median(step_times) * 1e3:.2f} ms",
                      file=sys.stderr, flush=True)
        rows = [{"case": name, "step_ms": statistics.median(times[name][0]) * 1e3,
                 "mask_ms": statistics.median(times[name][1]) * 1e3, "steps": len(times[name][0])}
                for name, _ in cases]
        free = rows[0]["step_ms"]
        for row in rows:
            row["overhead"] = row["step_ms"] / free - 1
            row["mask_share"] = row["mask_ms"] / free
        device_name = str(engine.runner.device)
    finally:
        fill.restore()
        engine.destroy()
    for row in rows:
        row.update(batch=batch, device=device_name, model=model)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the cases in turn")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per case instead of the table")
    args = parser.parse_args(argv)
    rows = run(args.model, args.batch, args.steps, args.warmup, args.device, args.dtype, args.seed, args.rounds)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{args.model} on {rows[0]['device']}, batch {args.batch}, median of {rows[0]['steps']} decode steps per case "
          f"({args.rounds} rounds in turn)")
    print(f"{'case':<10} {'step ms':>9} {'mask ms':>9} {'step overhead':>14} {'mask / free step':>17}")
    for row in rows:
        print(f"{row['case']:<10} {row['step_ms']:>9.2f} {row['mask_ms']:>9.3f} {row['overhead']:>13.1%} "
              f"{row['mask_share']:>16.2%}")
    worst = max(rows[1:], key=lambda r: r["mask_share"])
    print(f"largest mask share {worst['mask_share']:.2%} of a free step ({worst['case']}; step overhead "
          f"{worst['overhead']:.1%}); target <= 10%: {'met' if worst['mask_share'] <= 0.10 else 'NOT met'}")


if __name__ == "__main__":
    main()
