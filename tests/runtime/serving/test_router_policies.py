"""The router's policies over real gRPC on loopback: echo replicas (test_router.py's), and two real
workers on the tiny checkpoint for prefix affinity's point, the prefix cache."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.balancing import POLICIES
from test_router import Cluster

from kubellm.metrics import parse

pytestmark = pytest.mark.multiprocess

SYSTEM = "You are a meticulous assistant for a company that sells garden tools; answer briefly. " * 3


def request(text: str) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=text)])


def in_flight(c: Cluster) -> dict[str, int]:
    samples = parse(c.router.metrics.render())
    return {r.servicer.name: int(samples[f'kubellm_router_in_flight{{replica="127.0.0.1:{r.port}"}}'])
            for r in c.replicas}


def wait_for(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition never held")
        time.sleep(0.02)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_skips_an_unhealthy_replica(policy):
    c = Cluster(policy=policy)
    try:
        c.run(c.replicas[1].stop())
        c.wait_healthy(1, False)
        assert {c.generate(f"prompt {i} " + SYSTEM).replica for i in range(8)} == {"replica-0"}
    finally:
        c.close()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_every_policy_retries_before_the_first_token(policy, method):
    c = Cluster(policy=policy, health_interval=60)   # no health check in between: the failure itself counts
    try:
        c.run(c.replicas[1].stop())
        assert c.router.replicas[1].healthy
        texts = [f"prefix {i}: hello" for i in range(16)]   # distinct prefixes: some hash to replica-1
        if method == "Generate":
            answered = [c.stub.Generate(request(t), timeout=5).replica for t in texts]
        else:
            answered = [list(c.stub.GenerateStream(request(t), timeout=5))[-1].replica for t in texts]
        assert answered == ["replica-0"] * 16
        assert f'kubellm_router_retries_total{{method="{method}"}} 1' in c.router.metrics.render()
        assert not c.router.replicas[1].healthy
    finally:
        c.close()


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica():
    c = Cluster(policy="prefix_affinity", prefix_length=len(SYSTEM))
    try:
        same = {c.generate(SYSTEM + f"question {i}").replica for i in range(10)}
        assert len(same) == 1
        streamed = {list(c.stub.GenerateStream(request(SYSTEM + f"q{i}"), timeout=5))[-1].replica for i in range(4)}
        assert streamed == same       # streams and unary calls agree
        spread = {c.generate(f"system prompt {i:02d}. " + SYSTEM).replica for i in range(24)}
        assert spread == {"replica-0", "replica-1"}
        # typed requests (the REST gateway's path) hash alike: the OpenAI completions route
        import json
        import urllib.request
        body = json.dumps({"model": "echo", "prompt": SYSTEM + "via REST", "max_tokens": 3}).encode()
        with urllib.request.urlopen(urllib.request.Request(c.base + "/v1/completions", body,
                                                           {"Content-Type": "application/json"}), timeout=5) as r:
            assert json.loads(r.read())["choices"][0]["text"].startswith(next(iter(same)))
    finally:
        c.close()


def test_prefix_affinity_bound_spills_a_flood_to_the_other_replica():
    """Six held streams of one prefix: the key's replica takes what the bound allows (4 of 6 with
    load factor 1.25), the rest spill; the router's in-flight gauge shows it, and drops back to 0."""
    c = Cluster(policy="prefix_affinity", load_factor=1.25)
    streams = []
    try:
        balancer = c.router.balancer
        owner = balancer.ring.walk(balancer.key(request("hang")))[0]   # placed by name: replica-0 / replica-1
        other = ({"replica-0", "replica-1"} - {owner}).pop()
        for _ in range(6):
            stream = c.stub.GenerateStream(request("hang"), timeout=20)
            streams.append((stream, next(stream).replica))   # its first message: it is in flight
        placed = [replica for _, replica in streams]
        assert placed.count(owner) == 4 and placed.count(other) == 2, placed
        assert in_flight(c) == {owner: 4, other: 2}
    finally:
        for stream, _ in streams:
            stream.cancel()
    try:
        wait_for(lambda: in_flight(c) == {"replica-0": 0, "replica-1": 0})
    finally:
        c.close()


def test_least_loaded_avoids_a_replica_busy_with_a_long_request():
    for policy, expected in (("least_loaded", ["replica-1"] * 4),
                             ("round_robin", ["replica-1", "replica-0", "replica-1", "replica-0"])):
        c = Cluster(policy=policy)
        try:
            stream = c.stub.GenerateStream(request("hang"), timeout=20)
            assert next(stream).replica == "replica-0"     # the first turn; now held there
            assert [c.generate(f"short {i}").replica for i in range(4)] == expected, policy
            stream.cancel()
        finally:
            c.close()


def test_least_loaded_counts_concurrent_unary_calls():
    """In-flight counts include unary calls still being answered, not only streams."""
    c = Cluster(policy="least_loaded")
    try:
        ended = {}

        def slow_call():
            try:
                c.stub.Generate(request("sleep-replica-0"), timeout=2)   # replica-0 sleeps on it: held
            except grpc.RpcError as err:
                ended["code"] = err.code()
        t = threading.Thread(target=slow_call)
        t.start()
        wait_for(lambda: c.replicas[0].servicer.calls == 1)
        assert in_flight(c) == {"replica-0": 1, "replica-1": 0}
        assert [c.generate(f"x{i}").replica for i in range(3)] == ["replica-1"] * 3
        t.join(5)
        assert ended["code"] == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: in_flight(c)["replica-0"] == 0)   # a call that ended by its deadline is counted out
    finally:
        c.close()


def test_bad_policy_settings_fail_with_the_flag_named():
    from kubellm.runtime.serving.router import Router

    with pytest.raises(ValueError, match="--policy: 'fastest' is not one of"):
        Router("127.0.0.1:1", policy="fastest")
    with pytest.raises(ValueError, match="--load-factor: must be a number >= 1"):
        Router("127.0.0.1:1", policy="prefix_affinity", load_factor=0.5)


def test_prefix_affinity_with_real_workers_hits_one_prefix_cache(tiny_llama):
    """Two workers on the tiny checkpoint: one system prompt's requests all reach one worker, whose
    prefix cache then serves the shared blocks (its vllm:prefix_cache_hits_total grows); the other
    worker sees none of them."""
    pytest.importorskip("torch")
    from kubellm.runtime.serving.worker import WorkerServer

    engine = {"num_kv_blocks": 128, "block_size": 4, "max_batch_size": 4, "session_len": 128, "device": "cpu"}
    workers = [WorkerServer(tiny_llama, engine, replica=f"worker-{i}", metrics_port=0,
                            generation_defaults={"max_new_tokens": 2}).start() for i in range(2)]
    c = None
    try:
        for w in workers:
            w.wait_ready()
        c = Cluster(n=0, leaders=",".join(w.address for w in workers), policy="prefix_affinity", prefix_length=40)
        system = "the model of the city river music light paper stone garden winter system market story "
        replies = [c.stub.Generate(request(system + f"story {i}"), timeout=30) for i in range(5)]
        assert len({r.replica for r in replies}) == 1
        chosen = next(w for w in workers if w.replica == replies[0].replica)
        idle = next(w for w in workers if w is not chosen)
        import urllib.request

        def hits(w) -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=5) as r:
                samples = parse(r.read().decode())
            return sum(v for k, v in samples.items() if k.startswith("vllm:prefix_cache_hits_total"))

        assert hits(chosen) > 0 and hits(idle) == 0
    finally:
        if c is not None:
            c.close()
        for w in workers:
            w.stop()
