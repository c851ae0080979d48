"""`kubellm bench fuzz --requests N [--seed S] [--target NAME]`: N generated hostile requests against a local
deployment of 2 replicas, and what must still hold afterwards.

Without --target, 2 `kubellm worker` processes of a tiny random-weight model (the llama3-tiny shape, a chat
template of its own; nothing downloaded) and a `kubellm router` with its REST gateway are started, as `kubellm
serve` starts them, but without --allow-terminate, so that Terminate is fuzzed too (and refused). --target names
a running local deployment (`kubellm serve ... --rest`) instead; Terminate is then never sent.

The requests (bench/fuzz_inputs.py, seeded: request i of seed s is the same on every run) go through REST, every
route, bodies generated from the gateway's own /openapi.json (valid ones, then one field mutated: wrong types,
huge numbers, NaN, negative, huge strings, deep nesting, surrogates, thousands of stop words, huge top_k, logprobs
beyond the cap; whole hostile bodies; raw bytes: invalid UTF-8, truncated, past the size limit; raw HTTP) and
through gRPC, every RPC (typed messages with hostile fields, raw mutated bytes). Checked:

- every answer is 2xx or 4xx (gRPC: OK or a client-error code), and a valid body is answered 2xx / OK;
- no 5xx (a 503 counts too: nothing restarts during the run, so there is no documented reason for one);
- no process dies;
- no request hangs past its deadline (--timeout, 30 s; DEADLINE_EXCEEDED counts as a hang);
- the router's and each worker's RSS (/proc/<pid>/status VmRSS) grow by less than 50 MB over the run (from after
  a warm-up of valid requests to the end);
- a good greedy request gives the same text afterwards as before, through gRPC and REST.

Printed: the counts by route and status, the failures (the first few of each kind), the RSS figures.
No torch in this process beyond building the tiny checkpoint; the load is aiohttp's and grpc.aio's.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import aiohttp
import grpc

from kubellm.bench.fuzz_inputs import Case, make_case, valid_case
from kubellm.bench.progress import Progress
from kubellm.bench.shared_prefix import Process, _free_port, _launch, _wait, start_workers
from kubellm.protos.v1 import llm_pb2

RSS_GROWTH_LIMIT = 50 * 1024 * 1024
RAW_HTTP_WAIT = 3.0   # seconds a raw HTTP request waits for an answer (an incomplete one is never answered)
# gRPC codes that say the request was at fault (or refused by a limit), not the server.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ALREADY_EXISTS}
# The tiny model's engine: small enough that 2 workers share 2 CPU cores with the router and the load.
ENGINE = {"device": "cpu", "session_len": 128, "num_kv_blocks": 512, "block_size": 16, "max_batch_size": 16,
          "max_num_batched_tokens": 512}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
GOOD_PROMPT = "the model of the river and the city"


# --------------------------------------------------------------------------- the deployment under test


@dataclass
class Deployment:
    name: str
    grpc: str                       # router gRPC host:port
    rest: str                       # http://host:port of its REST gateway
    pids: dict[str, int]            # "router", "worker-0", ... -> pid
    terminate: bool                 # whether Terminate may be sent (the router refuses it)
    processes: list[Process] = field(default_factory=list)   # started here (stopped at the end)
    workdir: str | None = None

    def alive(self) -> dict[str, bool]:
        return {name: _running(pid) for name, pid in self.pids.items()}

    def rss(self) -> dict[str, int]:
        return {name: rss_bytes(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` in bytes (0 when it is gone)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def tiny_model(directory: str) -> str:
    """The llama3-tiny random-weight checkpoint (bench/roofline.py), with a chat template for the chat route."""
    from kubellm.bench.roofline import make_random_checkpoint

    path = make_random_checkpoint(directory, "llama3-tiny")
    tokenizer = path / "tokenizer_config.json"
    data = json.loads(tokenizer.read_text())
    data["chat_template"] = CHAT_TEMPLATE
    tokenizer.write_text(json.dumps(data))
    # The vocabulary the tokenizer has (a few dozen words), so that every token generated decodes to text.
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"])
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def start_deployment(model: str | None = None, engine: dict | None = None, replicas: int = 2,
                     worker_threads: int = 1, router_args: tuple[str, ...] = ()) -> Deployment:
    """`replicas` workers of `model` (default: the tiny random one) and a router with REST, no Terminate."""
    workdir = tempfile.mkdtemp(prefix="kubellm-fuzz-")
    engine = dict(engine or ENGINE)
    if model is None:
        model = tiny_model(os.path.join(workdir, "model"))
        engine.setdefault("load_format", "random")
    workers = start_workers(model, replicas, engine, workdir, threads=worker_threads)
    port, rest = _free_port(), _free_port()
    log = os.path.join(workdir, "router.log")
    proc = _launch(["router", "--leaders", ",".join(w.address for w in workers), "--host", "127.0.0.1",
                    "--port", str(port), "--rest-port", str(rest), "--deployment-name", "fuzz",
                    "--health-interval", "0.5", *router_args], log)
    router = Process(proc, f"127.0.0.1:{port}", None, log)
    deployment = Deployment("fuzz", router.address, f"http://127.0.0.1:{rest}",
                            {"router": proc.pid, **{f"worker-{i}": w.proc.pid for i, w in enumerate(workers)}},
                            terminate=True, processes=[*workers, router], workdir=workdir)
    try:
        _wait(lambda: _healthy_replicas(deployment.rest) == replicas, "router", [router, *workers], 120)
    except BaseException:
        deployment.stop()
        raise
    return deployment


def target_deployment(name: str) -> Deployment:
    """A running local deployment (`kubellm serve NAME --rest`), from its registry entry."""
    from kubellm.runtime.local.registry import read_entry, with_liveness

    entry = read_entry(name)
    if entry is None or not with_liveness(entry)["alive"]:
        raise ValueError(f"--target {name!r}: no running local deployment of that name (kubellm status lists them)")
    if not entry.get("rest_port"):
        raise ValueError(f"--target {name!r}: the deployment has no REST gateway; serve it with --rest")
    host = entry["address"].rpartition(":")[0]
    pids = {"router": entry["router_pid"], **{f"worker-{i}": p for i, p in enumerate(entry["worker_pids"])}}
    # Its router runs with --allow-terminate (local deployments do): a fuzzed Terminate would stop it.
    return Deployment(name, entry["address"], f"http://{host}:{entry['rest_port']}", pids, terminate=False)


def _healthy_replicas(rest: str) -> int:
    try:
        with urllib.request.urlopen(rest + "/health", timeout=2) as reply:
            return json.loads(reply.read())["healthy_replicas"]
    except (OSError, ValueError, KeyError):
        return -1


# --------------------------------------------------------------------------- one request


@dataclass
class Outcome:
    status: str          # "200", "413", "OK", "INVALID_ARGUMENT", "hung", "connection: ...", "error-event: ..."
    failed: bool
    why: str = ""


def _rest_status(status: int, text: str, valid: bool) -> Outcome:
    if status >= 500:
        return Outcome(str(status), True, f"{status}: {text[:300]}")
    if valid and not 200 <= status < 300:
        return Outcome(str(status), True, f"a valid body got {status}: {text[:300]}")
    return Outcome(str(status), False)


def _sse_problem(text: str) -> str | None:
    """An SSE reply's first error event of a server's fault (an internal error), if any."""
    for line in text.splitlines():
        if line.startswith('data: {"error"'):
            err = json.loads(line[6:])["error"]
            if err.get("code") not in {c.name.lower() for c in CLIENT_ERRORS}:
                return f"error event after 200: {err}"
    return None


async def rest_call(session: aiohttp.ClientSession, base: str, case: Case, timeout: float) -> Outcome:
    if case.raw_http is not None:
        return await raw_http_call(base, case.raw_http, timeout)
    data = case.body
    if case.chunked and data is not None:
        body = data

        async def chunks():
            for i in range(0, len(body), 65536):
                yield body[i:i + 65536]
        data = chunks()
    try:
        async with session.request(case.method, base + case.path, data=data, headers=case.headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
            text = await reply.text(errors="replace")
            outcome = _rest_status(reply.status, text, case.valid)
            if not outcome.failed and reply.content_type == "text/event-stream":
                if problem := _sse_problem(text):
                    return Outcome("200+error", True, problem)
                if not text.rstrip().endswith("data: [DONE]"):
                    return Outcome("200+cut", True, f"a stream without its [DONE]: {text[-200:]!r}")
            return outcome
    except asyncio.TimeoutError:
        return Outcome("hung", True, f"no answer within {timeout:g} s")
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as err:
        # A body the server refused before reading it all (413) may meet a closed socket while still being sent.
        if case.body is not None and len(case.body) > (1 << 20):
            return Outcome("closed-while-sending", False)
        return Outcome(f"connection: {type(err).__name__}", True, str(err)[:300])


async def raw_http_call(base: str, data: bytes, timeout: float) -> Outcome:
    """Send raw bytes on a fresh connection; the answer must be an HTTP status < 500 or a closed connection."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (OSError, asyncio.TimeoutError) as err:
        return Outcome("connection: refused", True, str(err))
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(64), min(timeout, RAW_HTTP_WAIT))
    except asyncio.TimeoutError:
        # A request the server waits to complete (a lying Content-Length): it must keep waiting, not crash;
        # the client gives up. Not a hang of the server's making.
        return Outcome("waiting-for-client", False)
    except OSError:
        return Outcome("closed", False)
    finally:
        writer.close()
    if not head:
        return Outcome("closed", False)
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        status = int(parts[1])
        return Outcome(str(status), status >= 500, f"raw HTTP got {head[:64]!r}" if status >= 500 else "")
    return Outcome("not-http", True, f"answer {head!r}")


async def grpc_call(channel: grpc.aio.Channel, case: Case, timeout: float) -> Outcome:
    try:
        if case.rpc.endswith("/ServerReflectionInfo"):
            call = channel.stream_stream(case.rpc)(iter([case.payload]), timeout=timeout)
            async for _ in call:
                break
            call.cancel()
            return Outcome("OK", False)
        if case.stream:
            call = channel.unary_stream(case.rpc)(case.payload, timeout=timeout)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(case.rpc)(case.payload, timeout=timeout)
        return Outcome("OK", False)
    except grpc.aio.AioRpcError as err:
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome("hung", True, f"no answer within {timeout:g} s (DEADLINE_EXCEEDED)")
        failed = code not in CLIENT_ERRORS or case.valid
        return Outcome(code.name, failed, f"{code.name}: {err.details()}"[:300] if failed else "")


# --------------------------------------------------------------------------- the run


def _greedy(deployment: Deployment) -> tuple[str, str]:
    """The text of one good greedy request, through gRPC and through REST."""
    request = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=GOOD_PROMPT)], config=llm_pb2.GenerationConfig(
        max_new_tokens=12, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(deployment.grpc) as channel:
        reply = channel.unary_unary("/kubellm.v1.LLM/Generate", response_deserializer=llm_pb2.GenerateResponse.FromString)(
            request.SerializeToString(), timeout=60)
    body = json.dumps({"prompt": GOOD_PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).encode()
    http = urllib.request.Request(deployment.rest + "/v1/completions", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(http, timeout=60) as answer:
        rest = json.loads(answer.read())["choices"][0]["text"]
    return reply.responses[0].text, rest


def _openapi(deployment: Deployment) -> dict:
    with urllib.request.urlopen(deployment.rest + "/openapi.json", timeout=10) as reply:
        return json.loads(reply.read())


async def _drive(deployment: Deployment, document: dict, seed: int, indices: range, concurrency: int,
                 timeout: float, counts: dict, failures: list, progress=None, make=None) -> None:
    """Send the cases of `indices` (`make(i)`, default the fuzzed request i), `concurrency` at a time."""
    make = make or (lambda i: make_case(document, seed, i, deployment=deployment.name,
                                        terminate=deployment.terminate))
    pending = iter(indices)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session, \
            grpc.aio.insecure_channel(deployment.grpc, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        async def worker():
            for i in pending:
                case = make(i)
                start = time.monotonic()
                if case.rpc:
                    outcome = await grpc_call(channel, case, timeout)
                else:
                    outcome = await rest_call(session, deployment.rest, case, timeout)
                counts[case.route][outcome.status] += 1
                if outcome.failed:
                    failures.append({"index": i, "route": case.route, "kind": case.kind, "status": outcome.status,
                                     "why": outcome.why, "seconds": round(time.monotonic() - start, 2)})
                if progress is not None:
                    progress(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def fuzz(requests: int, seed: int = 0, *, target: str | None = None, model: str | None = None,
         engine: dict | None = None, concurrency: int = 8, timeout: float = 30.0, warmup: int = 100,
         worker_threads: int = 1, verbose: bool = False) -> dict:
    """Run `requests` fuzzed requests (after `warmup` valid ones); returns the counts, failures and checks."""
    if requests < 1:
        raise ValueError(f"--requests {requests}: give 1 or more")
    bar = Progress("bench fuzz", f"connecting to {target}" if target else "starting 2 workers + router", total=None,
                   unit="requests", enabled=verbose)
    deployment = target_deployment(target) if target else start_deployment(model, engine,
                                                                            worker_threads=worker_threads)
    keep_logs = False
    try:
        document = _openapi(deployment)
        greedy_before = _greedy(deployment)
        counts: dict = collections.defaultdict(collections.Counter)
        failures: list = []
        # Warm-up: valid requests of every route (caches, pools, first-use allocations), not counted.
        warm_counts: dict = collections.defaultdict(collections.Counter)
        bar.switch("warm-up (valid requests)", total=warmup)
        asyncio.run(_drive(deployment, document, seed, range(warmup), concurrency, timeout, warm_counts, failures,
                           lambda i: bar.update(), make=lambda i: valid_case(document, seed, i)))
        if failures:
            raise RuntimeError(f"valid requests failed before any hostile one was sent: {failures[:3]}")
        rss_before = deployment.rss()
        start = time.monotonic()

        bar.switch("hostile requests (REST + gRPC)", total=requests)
        asyncio.run(_drive(deployment, document, seed, range(requests), concurrency, timeout, counts, failures,
                           lambda i: bar.update(note=f"{len(failures)} failed")))
        elapsed = time.monotonic() - start
        alive = deployment.alive()
        rss_after = deployment.rss()
        greedy_after = _greedy(deployment) if all(alive.values()) else ("", "")
    except BaseException:
        keep_logs = True
        raise
    finally:
        bar.close()
        deployment.stop()
        if deployment.workdir and not keep_logs:
            shutil.rmtree(deployment.workdir, ignore_errors=True)
    growth = {name: rss_after[name] - rss_before[name] for name in rss_before}
    checks = {
        "every answer 2xx/4xx or a client-error code, valid bodies 2xx/OK, none hung": not failures,
        "no process died": all(alive.values()),
        f"RSS grew by less than {RSS_GROWTH_LIMIT >> 20} MB": all(g < RSS_GROWTH_LIMIT for g in growth.values()),
        "the same greedy text afterwards (gRPC and REST)": greedy_before == greedy_after,
    }
    return {"requests": requests, "seed": seed, "elapsed_s": elapsed, "counts": {r: dict(c) for r, c in counts.items()},
            "failures": failures, "alive": alive, "rss_before": rss_before, "rss_after": rss_after,
            "rss_growth": growth, "greedy": {"before": greedy_before, "after": greedy_after},
            "checks": checks, "ok": all(checks.values()), "target": target or "started: 2 workers + router"}


def format_fuzz(result: dict) -> str:
    lines = [f"fuzz: {result['requests']} requests (seed {result['seed']}) against {result['target']} in "
             f"{result['elapsed_s']:.0f} s ({result['requests'] / max(result['elapsed_s'], 1e-9):.0f} requests/s)",
             f"{'route':34} {'total':>6}  statuses"]
    for route in sorted(result["counts"]):
        statuses = result["counts"][route]
        text = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"{route:34} {sum(statuses.values()):6d}  {text}")
    lines.append("RSS (MB): " + ", ".join(
        f"{name} {result['rss_before'][name] / 2**20:.1f} -> {result['rss_after'][name] / 2**20:.1f} "
        f"({result['rss_growth'][name] / 2**20:+.1f})" for name in result["rss_before"]))
    if result["failures"]:
        lines.append(f"{len(result['failures'])} failures; the first of each kind:")
        seen = set()
        for f in result["failures"]:
            if (f["route"], f["kind"], f["status"]) in seen:
                continue
            seen.add((f["route"], f["kind"], f["status"]))
            lines.append(f"  #{f['index']} {f['route']} {f['kind']}: {f['status']} {f['why']}")
            if len(seen) >= 25:
                break
    for check, ok in result["checks"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {check}")
    return "\n".join(lines)


def command(args) -> int:
    """`kubellm bench fuzz`: exit status 1 when a check fails."""
    result = fuzz(args.requests, args.seed, target=args.target, timeout=args.timeout, verbose=not args.json)
    print(json.dumps(result) if args.json else format_fuzz(result))
    return 0 if result["ok"] else 1
