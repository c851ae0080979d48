"""`kubellm bench serve`: a streaming load against a deployment, optionally side by side with a
direct worker (router overhead). No torch: it only speaks gRPC through the client."""

from __future__ import annotations

import statistics
import threading
import time

from kubellm.bench.progress import Progress
from kubellm.runtime.serving.client import Client, ClientError

PROMPTS = ["The capital of France is", "Once upon a time", "The three primary colors are",
           "Water boils at", "def fibonacci(n):", "The quick brown fox"]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(address: str, concurrency: int, requests_per_stream: int, max_new_tokens: int,
             progress: Progress | None = None) -> dict:
    """`concurrency` threads, each sending `requests_per_stream` streaming requests in turn; `progress` counts
    the finished requests."""
    ttft, tpot, errors, tokens = [], [], [], [0]
    lock = threading.Lock()

    def worker(n: int):
        client = Client(address)
        for i in range(requests_per_stream):
            prompt = PROMPTS[(n + i) % len(PROMPTS)]
            start = time.perf_counter()
            first = last = None
            count = 0
            try:
                for delta in client.stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=True):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    count += len(delta.token_ids)
            except ClientError as err:
                with lock:
                    errors.append(err.code)
                if progress is not None:
                    progress.update()
                continue
            with lock:
                ttft.append(first - start)
                if count > 1:
                    tpot.append((last - first) / (count - 1))
                tokens[0] += count
            if progress is not None:
                progress.update()
        client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": concurrency * requests_per_stream, "errors": len(errors),
            "tok_s": tokens[0] / elapsed, "ttft_p50_ms": 1e3 * _percentile(ttft, 0.5),
            "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99), "tpot_p50_ms": 1e3 * _percentile(tpot, 0.5),
            "tpot_p99_ms": 1e3 * _percentile(tpot, 0.99)}


UNARY_N, UNARY_WARMUP = 300, 20


def unary_latency(*addresses: str, n: int = UNARY_N, warmup: int = UNARY_WARMUP,
                  progress: Progress | None = None) -> list[float]:
    """p50 (ms) of a 1-token Generate against each address: what a hop adds shows up here. The
    samples are taken in turn (a, b, a, b, ...), so that load from elsewhere on the machine falls
    on every address alike instead of on whichever happened to be measured during it."""
    clients = [Client(a) for a in addresses]
    samples: list[list[float]] = [[] for _ in addresses]
    for i in range(warmup + n):
        for client, out in zip(clients, samples):
            start = time.perf_counter()
            client.generate("Hi", max_new_tokens=1)
            if i >= warmup:
                out.append(time.perf_counter() - start)
        if progress is not None:
            progress.update(len(clients))
    for client in clients:
        client.close()
    return [1e3 * statistics.median(s) for s in samples]


def sweep(address: str, direct: str | None, concurrency: list[int], requests_per_stream: int,
          max_new_tokens: int) -> str:
    lines = [f"{'target':8} {'conc':>5} {'req':>5} {'err':>4} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} "
             f"{'TPOT p50':>9} {'p99':>8}  (ms)"]
    results = {}
    progress = Progress("bench serve", "starting", total=None, unit="requests")
    for c in concurrency:
        for name, addr in (("deploy", address), ("direct", direct)):
            if addr is None:
                continue
            progress.switch(f"{name} ({addr}), {c} streams", total=c * requests_per_stream)
            r = run_load(addr, c, requests_per_stream, max_new_tokens, progress)
            results[name, c] = r
            lines.append(f"{name:8} {c:5d} {r['requests']:5d} {r['errors']:4d} {r['tok_s']:8.1f} "
                         f"{r['ttft_p50_ms']:9.1f} {r['ttft_p99_ms']:8.1f} {r['tpot_p50_ms']:9.2f} {r['tpot_p99_ms']:8.2f}")
    if direct:
        progress.switch("1-token Generate latency, deploy and direct in turn", total=2 * (UNARY_N + UNARY_WARMUP))
        via, straight = unary_latency(address, direct, progress=progress)
        lines.append(f"1-token Generate p50: deploy {via:.2f} ms, direct {straight:.2f} ms, "
                     f"added {via - straight:.2f} ms")
        for c in concurrency:
            lines.append(f"throughput at {c} streams: deploy / direct = "
                         f"{results['deploy', c]['tok_s'] / results['direct', c]['tok_s']:.2f}")
    progress.close()
    return "\n".join(lines)


def command(args) -> int:
    """`kubellm bench serve`: needs a client only (no torch)."""
    if args.workload == "shared-prefix":
        from kubellm.bench.shared_prefix import command as shared_prefix

        return shared_prefix(args)
    print(sweep(args.target or "127.0.0.1:50051", args.direct, [int(c) for c in args.concurrency.split(",")], args.requests_per_stream,
                args.max_new))
    return 0
