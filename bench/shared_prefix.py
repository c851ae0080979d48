"""`kubellm bench serve --workload shared-prefix`: the routing policies side by side on one pair of workers.

A few long system prompts are shared by many requests with short user turns. Two workers are started
once (or given with --workers); for each policy a `kubellm router --policy P` is started in front of
them, sent its own system prompts once (warming the caches, as a deployment in service is), then the
measured requests. Per policy: TTFT p50/p99, generated tokens/s, how many replicas served each system
prompt, and each worker's prefix-cache hit rate over the measured requests (the difference of its
vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total before and after). Each policy gets
system prompts of its own (same shape, other words), so none profits from what another left cached.
The policy's own cost, the router's key + order for one request on its raw bytes, is timed in this
process on the same requests.

No torch here: workers and routers are `kubellm` processes, the load is the gRPC client's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace

from kubellm.bench.progress import Progress
from kubellm.bench.workload import SharedPrefixWorkload, make_shared_prefix_workload
from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.balancing import POLICIES
from kubellm.runtime.serving.client import Client, ClientError

from kubellm.metrics import parse

HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    proc: subprocess.Popen
    address: str
    metrics: str | None
    log: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _launch(args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
    # PYTHONSAFEPATH: the working directory's folders (a checkout's kernels/) never shadow installed packages
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", *args], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONSAFEPATH": "1", **(env or {})})


def _wait(ready, what: str, procs: list[Process], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not ready():
        for p in procs:
            if p.proc.poll() is not None:
                with open(p.log, errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
                raise RuntimeError(f"{what}: a process exited with code {p.proc.returncode}:\n{tail}")
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not ready after {timeout:g} s")
        time.sleep(0.3)


def _metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return parse(r.read().decode())


def _sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def _answers(address: str) -> bool:
    try:
        with Client(address) as client:
            client.generate("hi", max_new_tokens=1, timeout=10)
        return True
    except (ClientError, OSError):
        return False


def start_workers(model: str, n: int, engine: dict, workdir: str, timeout: float = 600.0,
                  threads: int | None = None) -> list[Process]:
    """`n` `kubellm worker` processes of `model` with the EngineConfig fields `engine`, each with /metrics."""
    config = os.path.join(workdir, "engine.json")
    with open(config, "w") as f:
        json.dump(engine, f)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    workers = []
    try:
        for i in range(n):
            port, metrics = _free_port(), _free_port()
            log = os.path.join(workdir, f"worker-{i}.log")
            proc = _launch(["worker", "--model", model, "--config", config, "--host", "127.0.0.1", "--port", str(port),
                            "--metrics-port", str(metrics), "--replica", f"bench-{i}"], log, env)
            workers.append(Process(proc, f"127.0.0.1:{port}", f"127.0.0.1:{metrics}", log))
        _wait(lambda: all(_answers(w.address) for w in workers), "workers", workers, timeout)
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


def start_router(leaders: list[str], policy: str, prefix_length: int, load_factor: float, workdir: str) -> Process:
    port, metrics = _free_port(), _free_port()
    log = os.path.join(workdir, f"router-{policy}.log")
    proc = _launch(["router", "--leaders", ",".join(leaders), "--host", "127.0.0.1", "--port", str(port),
                    "--metrics-port", str(metrics), "--deployment-name", "bench", "--health-interval", "0.5",
                    "--policy", policy, "--prefix-length", str(prefix_length), "--load-factor", repr(load_factor)],
                   log)
    router = Process(proc, f"127.0.0.1:{port}", f"127.0.0.1:{metrics}", log)

    def all_healthy() -> bool:
        try:
            return _sum(_metrics(router.metrics), "kubellm_router_healthy_replicas") == len(leaders)
        except OSError:
            return False
    try:
        _wait(all_healthy, f"router ({policy})", [router], 60)
    except BaseException:
        router.stop()
        raise
    return router


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    elapsed: float = 0.0
    served_by: dict[int, set] = field(default_factory=dict)   # system prompt -> replicas that answered it


def run_requests(address: str, work: SharedPrefixWorkload, concurrency: int, max_new_tokens: int,
                 progress=None) -> Run:
    """The workload's requests in order, `concurrency` streams at a time (each thread takes the next);
    `progress` (bench/progress.py) counts the finished ones."""
    run, lock = Run(), threading.Lock()
    pending = iter(work.requests)

    def stream_requests():
        with Client(address) as client:
            while True:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                system, prompt = item
                start, first, count, replica = time.perf_counter(), None, 0, ""
                try:
                    for delta in client.stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=True,
                                               temperature=0.0):
                        first = first or time.perf_counter()
                        count += len(delta.token_ids)
                        replica = delta.replica or replica
                except ClientError:
                    with lock:
                        run.errors += 1
                    if progress is not None:
                        progress.update()
                    continue
                with lock:
                    run.ttft.append(first - start)
                    run.tokens += count
                    run.served_by.setdefault(system, set()).add(replica)
                if progress is not None:
                    progress.update()

    threads = [threading.Thread(target=stream_requests) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.elapsed = time.perf_counter() - start
    return run


def policy_overhead_us(policy: str, work: SharedPrefixWorkload, leaders: list[str], names: list[str],
                       prefix_length: int, load_factor: float, repeat: int = 20) -> float:
    """p50 microseconds of the router's own choice for one request, on its raw bytes: `Router._key`
    (the parse and hash, prefix_affinity only) and `Router._candidates` (the policy's order), as
    forward_stream runs them, over replicas with a few requests in flight."""
    from kubellm.runtime.serving.router import Router

    router = Router(",".join(leaders), policy=policy, prefix_length=prefix_length, load_factor=load_factor)
    router.replicas = [SimpleNamespace(address=a, name=n, healthy=True, in_flight=i % 3)
                       for i, (a, n) in enumerate(zip(leaders, names))]
    router.balancer.update(router.replicas)
    raw = [llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=p)],
                                   config=llm_pb2.GenerationConfig(max_new_tokens=16)).SerializeToString()
           for _, p in work.requests]
    samples = []
    clock = time.perf_counter_ns
    for _ in range(repeat):
        for request in raw:
            start = clock()
            router._candidates(router._key("GenerateStream", request, True) if router.balancer.needs_key else None)
            samples.append(clock() - start)
    return statistics.median(samples) / 1e3


def replica_names(addresses: list[str]) -> list[str]:
    """What each worker calls itself (ModelInfo): prefix_affinity's ring places replicas by name."""
    names = []
    for address in addresses:
        with Client(address) as client:
            names.append(client.model_info(timeout=10).replica)
    return names


def prefix_split(work: SharedPrefixWorkload, replicas: list, prefix_length: int) -> list[int]:
    """How many system prompts each replica owns on prefix_affinity's ring (the bound aside): with few
    prompts the split is uneven by chance, and a replica owning more than its cache holds thrashes."""
    from kubellm.runtime.serving.balancing import PrefixAffinity

    balancer = PrefixAffinity(prefix_length)
    balancer.update(replicas)
    owners = [balancer.order(replicas, balancer.key(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=p)])))[0]
              for p in work.system_prompts]
    return [sum(o is r for o in owners) for r in replicas]


def _prefix_cache(before: list[dict], after: list[dict]) -> list[tuple[float, float]]:
    """(hit tokens, queried tokens) per worker between two scrapes."""
    return [(_sum(a, HITS) - _sum(b, HITS), _sum(a, QUERIES) - _sum(b, QUERIES)) for b, a in zip(before, after)]


def shared_prefix(*, model: str = "smollm2-135m", workers: list[str] | None = None,
                  worker_metrics: list[str] | None = None, policies=POLICIES, num_system_prompts: int = 8,
                  system_words: int = 256, user_words: int = 12, num_requests: int = 64, concurrency: int = 4,
                  max_new_tokens: int = 16, seed: int = 0, engine: dict | None = None, prefix_length: int = 256,
                  load_factor: float = 1.25, worker_threads: int | None = None) -> dict:
    """Run the comparison; returns {"policies": [per-policy results], "setup": ...}."""
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"--policies: {policy!r} is not one of {', '.join(POLICIES)}")
    workdir = tempfile.mkdtemp(prefix="kubellm-bench-")
    started: list[Process] = []
    progress = Progress("bench serve shared-prefix", "starting 2 workers" if workers is None else "starting",
                        total=None, unit="requests")
    if workers is None:
        started = start_workers(model, 2, engine or {}, workdir, threads=worker_threads)
        workers, worker_metrics = [w.address for w in started], [w.metrics for w in started]
    results = []
    try:
        names = replica_names(workers)
        idle = [SimpleNamespace(address=a, name=n, in_flight=0) for a, n in zip(workers, names)]
        for n, policy in enumerate(policies):
            # Each policy its own system prompts (seed + n): what one left in the caches helps no other.
            work = make_shared_prefix_workload(num_system_prompts, system_words, user_words, num_requests,
                                               seed=seed + 1000 * (n + 1))
            progress.switch(f"router --policy {policy}: starting", total=None)
            router = start_router(workers, policy, prefix_length, load_factor, workdir)
            try:
                warm = SharedPrefixWorkload(work.system_prompts,
                                            [(i, f"{s}\n\nUser: hello\nAssistant:") for i, s in
                                             enumerate(work.system_prompts)])
                run_requests(router.address, warm, 1, 1)
                before = [_metrics(m) for m in worker_metrics] if worker_metrics else []
                progress.switch(f"router --policy {policy} ({n + 1}/{len(policies)})", total=len(work.requests))
                run = run_requests(router.address, work, concurrency, max_new_tokens, progress)
                after = [_metrics(m) for m in worker_metrics] if worker_metrics else []
            finally:
                router.stop()
            results.append({
                "policy": policy, "requests": len(work.requests), "errors": run.errors,
                "ttft_p50_ms": 1e3 * _percentile(run.ttft, 0.5), "ttft_p99_ms": 1e3 * _percentile(run.ttft, 0.99),
                "tok_s": run.tokens / run.elapsed if run.elapsed else 0.0,
                "replicas_per_prefix": statistics.mean(len(v) for v in run.served_by.values()) if run.served_by
                else float("nan"),
                "prefix_cache": (cache := _prefix_cache(before, after)),
                "hit_rate": [hits / queries if queries else float("nan") for hits, queries in cache],
                "choose_us_p50": policy_overhead_us(policy, work, workers, names, prefix_length, load_factor),
                "ring_split": prefix_split(work, idle, prefix_length),
            })
    finally:
        progress.close()
        for w in started:
            w.stop()
    shutil.rmtree(workdir, ignore_errors=True)   # the processes' logs: kept only when a run fails
    return {"policies": results, "setup": {
        "model": model, "workers": workers, "engine": engine or {}, "system_prompts": num_system_prompts,
        "system_words": system_words, "user_words": user_words, "requests": num_requests,
        "concurrency": concurrency, "max_new_tokens": max_new_tokens, "prefix_length": prefix_length,
        "load_factor": load_factor}}


def format_shared_prefix(result: dict) -> str:
    s = result["setup"]
    lines = [(f"shared-prefix: {s['system_prompts']} system prompts of {s['system_words']} words, "
              f"{s['requests']} requests of {s['user_words']} user words, {s['concurrency']} streams, "
              f"{s['max_new_tokens']} new tokens, 2 replicas, engine {json.dumps(s['engine'])}"),
             (f"{'policy':16} {'req':>4} {'err':>4} {'TTFT p50':>9} {'p99':>8} {'tok/s':>7} {'repl/prefix':>11} "
              f"{'prefix-cache hits per replica':>30} {'choose p50':>10}")]
    for r in result["policies"]:
        hits = " / ".join(f"{100 * h:.0f}%" for h in r["hit_rate"]) or "n/a"
        split = f"  (ring: {' / '.join(map(str, r['ring_split']))} system prompts)" \
            if r["policy"] == "prefix_affinity" else ""
        lines.append(f"{r['policy']:16} {r['requests']:4d} {r['errors']:4d} {r['ttft_p50_ms']:7.0f}ms "
                     f"{r['ttft_p99_ms']:6.0f}ms {r['tok_s']:7.1f} {r['replicas_per_prefix']:11.2f} {hits:>30} "
                     f"{r['choose_us_p50']:8.1f}us{split}")
    by = {r["policy"]: r for r in result["policies"]}
    if "round_robin" in by and "prefix_affinity" in by:
        rr, pa = by["round_robin"], by["prefix_affinity"]
        lines.append(f"prefix_affinity vs round_robin: TTFT p50 {rr['ttft_p50_ms'] / pa['ttft_p50_ms']:.2f}x lower, "
                     f"throughput {pa['tok_s'] / rr['tok_s']:.2f}x")
    return "\n".join(lines)


def command(args) -> int:
    engine = {"device": args.device or "auto", "block_size": args.block_size or 16, "max_batch_size": args.batch_size}
    if args.num_kv_blocks:
        engine["num_kv_blocks"] = args.num_kv_blocks
    if args.dtype and args.dtype != "auto":
        engine["dtype"] = args.dtype
    def split(value):
        return [v.strip() for v in value.split(",") if v.strip()] if value else None

    result = shared_prefix(model=args.model, workers=split(args.workers), worker_metrics=split(args.worker_metrics),
                           policies=split(args.policies) or POLICIES, num_system_prompts=args.system_prompts,
                           system_words=args.system_words, user_words=args.user_words, num_requests=args.num_prompts,
                           concurrency=int(args.concurrency.split(",")[0]), max_new_tokens=args.max_new,
                           seed=args.seed, engine=engine, prefix_length=args.prefix_length,
                           load_factor=args.load_factor, worker_threads=args.worker_threads)
    print(json.dumps(result) if args.json else format_shared_prefix(result))
    return 0
