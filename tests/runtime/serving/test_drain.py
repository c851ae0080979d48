"""Drain on SIGTERM, with real `kubellm worker` and `kubellm router` processes over loopback: health goes
NOT_SERVING at once, new calls are refused with UNAVAILABLE, the calls in flight finish (up to
--drain-timeout), then the process exits 0; nothing in flight is silently lost."""

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kubellm.runtime.serving.client import Client, ClientError
from processes import free_port, wait_serving

pytestmark = pytest.mark.multiprocess

TOKENS = 480   # a stream's length: under the tiny model's 512 positions


def worker(procs, model, tmp_path, name: str, drain_timeout: float, max_batch_size: int = 32,
           http_port: int | None = None) -> tuple[subprocess.Popen, str]:
    config = tmp_path / f"engine-{name}.json"
    config.write_text(json.dumps({"num_kv_blocks": 1024, "block_size": 4, "max_batch_size": max_batch_size,
                                  "device": "cpu"}))
    port = free_port()
    extra = ["--http-port", str(http_port)] if http_port else []
    proc = procs("worker", "--model", str(model), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                 "--replica", name, "--drain-timeout", str(drain_timeout), *extra)
    return proc, f"127.0.0.1:{port}"


def health(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def until_not_serving(address: str, limit: float = 2.0) -> float:
    """Seconds until `address`'s readiness ("") says NOT_SERVING."""
    started = time.monotonic()
    while health(address) != "NOT_SERVING":
        assert time.monotonic() - started < limit, f"{address} still {health(address)} after {limit} s"
        time.sleep(0.01)
    return time.monotonic() - started


class Streams:
    """`n` streams of `tokens` tokens through `address`, each in its thread; `.outcomes()` once they end:
    ("OK", generated_length, finish_reason, replica) or (code, message)."""

    def __init__(self, address: str, n: int, tokens: int = TOKENS):
        self.first = [threading.Event() for _ in range(n)]
        self.pool = concurrent.futures.ThreadPoolExecutor(n)
        self.futures = [self.pool.submit(self._one, address, i, tokens) for i in range(n)]

    def _one(self, address, i, tokens):
        client = Client(address)
        try:
            last = None
            for last in client.stream(f"Once upon a time {i}", max_new_tokens=tokens, ignore_eos=True, timeout=120):
                self.first[i].set()
            return "OK", last.generated_length, last.finish_reason, last.replica
        except ClientError as err:
            return err.code, err.message
        finally:
            self.first[i].set()
            client.close()

    def wait_first(self, count: int | None = None, timeout: float = 30) -> None:
        for event in self.first[:count]:
            assert event.wait(timeout), "a stream never started"

    def outcomes(self, timeout: float = 120) -> list[tuple]:
        try:
            return [f.result(timeout) for f in self.futures]
        finally:
            self.pool.shutdown()


def test_worker_drains_its_streams_on_sigterm(procs, tiny_llama, tmp_path):
    http_port = free_port()
    # One sequence at a time: three streams in flight last a few seconds (one running, two waiting).
    proc, address = worker(procs, tiny_llama, tmp_path, "w0", drain_timeout=60, max_batch_size=1,
                           http_port=http_port)
    wait_serving(address)
    streams = Streams(address, 3)
    streams.wait_first(1)
    time.sleep(0.3)   # the other two reach the worker (and wait for the first)
    sigterm = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    assert until_not_serving(address) < 1.0   # at once (a loaded machine answers slower)
    assert health(address, "kubellm.v1.LLM") == "NOT_SERVING"
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2)
    assert http.value.code == 503
    completion = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", method="POST",
                                        headers={"Content-Type": "application/json"},
                                        data=json.dumps({"model": str(tiny_llama), "prompt": "Hi",
                                                         "max_tokens": 2}).encode())
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(completion, timeout=5)
    assert http.value.code == 503 and "shutting down" in http.value.read().decode()
    with pytest.raises(ClientError) as refused:
        Client(address).generate("a new request", max_new_tokens=2, timeout=5)
    assert refused.value.code == "UNAVAILABLE" and "shutting down" in refused.value.message
    assert proc.poll() is None   # still draining

    outcomes = streams.outcomes()
    assert outcomes == [("OK", TOKENS, "length", "w0")] * 3
    assert proc.wait(30) == 0
    took = time.monotonic() - sigterm
    assert took < 60
    log = run_log(procs)
    # Those still running or waiting at SIGTERM (the first may have finished by then: one at a time).
    assert drained_count(log, "worker w0") >= 1 and "w0 drained in" in log, log[-2000:]


def run_log(procs) -> str:
    return procs.log.read_text(errors="replace")


def drained_count(log: str, who: str) -> int:
    """N of the log's "<who> draining N requests"."""
    found = re.search(rf"{who} draining (\d+) requests", log)
    assert found, log[-2000:]
    return int(found.group(1))


def test_worker_drain_timeout_cuts_streams_with_unavailable(procs, tiny_llama, tmp_path):
    proc, address = worker(procs, tiny_llama, tmp_path, "w0", drain_timeout=0.1)
    wait_serving(address)
    streams = Streams(address, 1)   # some 0.8 s of tokens: far more than the drain timeout
    streams.wait_first()
    sigterm = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    took = time.monotonic() - sigterm
    [(code, message)] = streams.outcomes()
    # Never a silent cut: UNAVAILABLE naming the worker and why.
    assert code == "UNAVAILABLE" and "worker w0" in message and "drain timeout" in message, (code, message)
    assert 0.1 <= took < 5, took
    assert "w0 drain timeout (0.1 s): cutting 1 requests" in run_log(procs)


def test_router_retries_around_a_draining_worker_under_load(procs, tiny_llama, tmp_path):
    """8 clients streaming without pause through a router over two workers; SIGTERM one: 0 requests fail."""
    w0, a0 = worker(procs, tiny_llama, tmp_path, "w0", drain_timeout=30)
    w1, a1 = worker(procs, tiny_llama, tmp_path, "w1", drain_timeout=30)
    router_port = free_port()
    procs("router", "--leaders", f"{a0},{a1}", "--port", str(router_port), "--deployment-name", "tiny",
          "--health-interval", "0.3")
    address = f"127.0.0.1:{router_port}"
    for a in (a0, a1, address):
        wait_serving(a)
    time.sleep(1.0)   # the router sees both

    stop = threading.Event()
    results: list[tuple] = []
    lock = threading.Lock()

    def client_loop(i):
        client = Client(address)
        try:
            while not stop.is_set():
                try:
                    last = None
                    for last in client.stream(f"Story {i}", max_new_tokens=150, ignore_eos=True, timeout=60):
                        pass
                    outcome = ("OK", last.generated_length, last.finish_reason, last.replica, time.monotonic())
                except ClientError as err:
                    outcome = (err.code, err.message)
                with lock:
                    results.append(outcome)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        loops = [pool.submit(client_loop, i) for i in range(8)]
        time.sleep(1.5)
        sigterm = time.monotonic()
        w1.send_signal(signal.SIGTERM)
        time.sleep(3.0)
        stop.set()
        for f in loops:
            f.result(timeout=90)
    failed = [r for r in results if r[0] != "OK" or r[1:3] != (150, "length")]
    print(f"\n{len(results)} streams, {len(failed)} failed")
    assert not failed, failed
    assert w1.wait(30) == 0
    assert any(r[3] == "w1" for r in results)   # w1 served before it was stopped...
    assert any(r[3] == "w0" and r[4] > sigterm + 1.0 for r in results)   # ...and w0 took over
    assert w0.poll() is None


def test_router_drains_on_sigterm(procs, tiny_llama, tmp_path):
    w0, a0 = worker(procs, tiny_llama, tmp_path, "w0", drain_timeout=30, max_batch_size=1)
    router_port = free_port()
    router = procs("router", "--leaders", a0, "--port", str(router_port), "--deployment-name", "tiny",
                   "--health-interval", "0.3", "--drain-timeout", "60")
    address = f"127.0.0.1:{router_port}"
    wait_serving(a0)
    wait_serving(address)
    streams = Streams(address, 3)
    streams.wait_first(1)
    time.sleep(0.3)
    router.send_signal(signal.SIGTERM)

    assert until_not_serving(address) < 1.0
    assert health(address, "kubellm.v1.LLM") == "NOT_SERVING"
    assert health(address, "liveness") == "SERVING"   # a draining router is not restarted
    with pytest.raises(ClientError) as refused:
        Client(address).generate("a new request", max_new_tokens=2, timeout=5)
    assert refused.value.code == "UNAVAILABLE" and "shutting down" in refused.value.message
    assert router.poll() is None

    assert streams.outcomes() == [("OK", TOKENS, "length", "w0")] * 3
    assert router.wait(30) == 0
    assert drained_count(run_log(procs), "router of tiny") >= 1
    assert w0.poll() is None   # the workers are not the router's to stop


def test_a_two_pod_group_drains_as_one_when_both_pods_get_sigterm(procs, tiny_llama, tmp_path):
    """A rolling update or scale-down deletes every pod of a group at once: the follower pod keeps its rank
    running while rank 0 drains (a stream needs every rank), and exits when rank 0 has gone."""
    import os

    config = tmp_path / "engine-tp2.json"
    config.write_text(json.dumps({"num_kv_blocks": 1024, "block_size": 4, "max_batch_size": 8, "device": "cpu",
                                  "tensor_parallel": 2}))
    master_port, ports = free_port(), [free_port(), free_port()]
    pods = []
    for index in (1, 0):
        env = {**os.environ, "POD_INDEX": str(index), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
               "KUBELLM_GPUS_PER_POD": "1"}
        log = open(tmp_path / f"pod-{index}.log", "wb")
        pods.append(subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "worker", "--model",
                                      str(tiny_llama), "--config", str(config), "--host", "127.0.0.1", "--port",
                                      str(ports[index]), "--replica", "g0", "--drain-timeout", "60"],
                                     stdout=log, stderr=subprocess.STDOUT, env=env))
    follower, leader = pods
    try:
        wait_serving(f"127.0.0.1:{ports[0]}", timeout=120)
        streams = Streams(f"127.0.0.1:{ports[0]}", 2, tokens=200)
        streams.wait_first()
        for pod in (follower, leader):   # as the kubelet does, each pod its own SIGTERM
            pod.send_signal(signal.SIGTERM)
        assert until_not_serving(f"127.0.0.1:{ports[0]}") < 1.0
        assert streams.outcomes() == [("OK", 200, "length", "g0")] * 2
        assert leader.wait(30) == 0
        follower.wait(30)   # it goes with rank 0 (its exit code says the group ended, not a failure of its own)
        text = (tmp_path / "pod-1.log").read_text(errors="replace")
        assert "SIGTERM; following rank 0 while it drains" in text, text[-2000:]
    finally:
        for pod in pods:
            if pod.poll() is None:
                pod.kill()
            pod.wait(10)
