"""A router in front of a deployment scaled to zero (`--scale-from-zero`, `--max-waiting`, `--model-name`):
ready with no replica, ModelInfo and /v1/models answered by the router at once, calls held (and counted
in kubellm_router_requests_waiting) until the first worker serves them, and past the hold or the bound
UNAVAILABLE / 503 with a retry-after. Real gRPC and HTTP over loopback; the last test runs real
`kubellm router` and `kubellm worker` processes with a tiny model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.serving.gateway import _from_upstream
from kubellm.runtime.serving.router import RETRY_AFTER, Router
from kubellm.runtime.serving.upstream import UpstreamError
from processes import free_port, wait_serving

from kubellm.metrics import parse

WAITING = "kubellm_router_requests_waiting"


# --------------------------------------------------------------------------- helpers


def health(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def http(base: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of GET `path` (or POST `body`), error statuses included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def waiting(base: str) -> float:
    """The router's kubellm_router_requests_waiting, read from its /metrics as an autoscaler would."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as reply:
        return parse(reply.read().decode())[WAITING]


def until_waiting(base: str, count: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while waiting(base) != count:
        assert time.monotonic() < end, f"{WAITING} is {waiting(base)}, not {count}, after {timeout} s"
        time.sleep(0.05)


def generate_request(text: str, max_new_tokens: int = 8) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=text)],
                                   config=llm_pb2.GenerationConfig(max_new_tokens=max_new_tokens, temperature=0))


def grpc_outcome(address: str, call: str = "Generate", timeout: float = 30) -> tuple:
    """("OK", reply) or (code, details, trailing metadata) of one call through `address`."""
    with grpc.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        try:
            if call == "GenerateStream":
                return "OK", list(stub.GenerateStream(generate_request("held"), timeout=timeout))
            return "OK", stub.Generate(generate_request("held"), timeout=timeout)
        except grpc.RpcError as err:
            return err.code(), err.details(), dict(err.trailing_metadata() or ())


COMPLETION = {"model": "tiny", "prompt": "held", "max_tokens": 8, "temperature": 0}


class RouterThread:
    """A Router (REST on) in an asyncio loop of its own thread, its leader an address where nothing listens."""

    def __init__(self, **options):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.leader = f"127.0.0.1:{free_port()}"

        async def make():
            router = Router(self.leader, "zero", health_interval=0.2, health_timeout=0.5, **options)
            await router.start(0, "127.0.0.1", rest_port=0)
            return router

        self.router = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        self.address = f"127.0.0.1:{self.router.grpc_port}"
        self.base = f"http://127.0.0.1:{self.router.rest_port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.router.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def make_router():
    started: list[RouterThread] = []

    def make(**options) -> RouterThread:
        started.append(RouterThread(**options))
        return started[-1]

    yield make
    for r in started:
        r.close()


# --------------------------------------------------------------------------- at zero (no model)


def test_at_zero_the_router_is_ready_and_answers_model_info_at_once(make_router):
    r = make_router(scale_from_zero=True, model_name="hf://org/tiny-model")
    assert health(r.address) == "SERVING"   # the Service keeps its endpoints: calls reach a router
    assert health(r.address, "kubellm.v1.LLM") == "SERVING"
    assert health(r.address, "liveness") == "SERVING"
    assert r.router.healthy_replicas() == []

    t0 = time.monotonic()
    with grpc.insecure_channel(r.address) as channel:
        info = llm_pb2_grpc.LLMStub(channel).ModelInfo(llm_pb2.ModelInfoRequest(), timeout=5)
    assert time.monotonic() - t0 < 1.0   # not held
    assert (info.model, info.replica) == ("hf://org/tiny-model", "")

    t0 = time.monotonic()
    status, _, models = http(r.base, "/v1/models")
    assert time.monotonic() - t0 < 1.0
    assert status == 200 and [m["id"] for m in models["data"]] == ["zero", "hf://org/tiny-model"]

    status, _, body = http(r.base, "/health")
    assert status == 200 and body["scaled_to_zero"] is True and body["healthy_replicas"] == 0
    assert waiting(r.base) == 0


def test_model_info_at_zero_names_the_deployment_without_a_model_name():
    assert Router("127.0.0.1:1", "llm", scale_from_zero=True).own_model_info() == llm_pb2.ModelInfoResponse(
        model="llm", replica="")


def test_without_scale_from_zero_readiness_follows_the_replicas(make_router):
    r = make_router()
    assert health(r.address) == "NOT_SERVING"
    assert health(r.address, "kubellm.v1.LLM") == "NOT_SERVING"
    assert health(r.address, "liveness") == "SERVING"
    status, _, body = http(r.base, "/health")
    assert status == 503 and body["status"] == "unavailable" and body["scaled_to_zero"] is False


@pytest.mark.parametrize("call", ["Generate", "GenerateStream"])
def test_past_the_hold_grpc_fails_unavailable_with_a_retry_after(make_router, call):
    r = make_router(scale_from_zero=True, wait_for_replica=1.5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        held = pool.submit(grpc_outcome, r.address, call)
        until_waiting(r.base, 1)   # counted from the moment it is held
        code, details, trailing = held.result(10)
        took = time.monotonic() - t0
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith("no healthy replica of deployment zero after waiting 2 s"), details
    assert "scaled to zero, or its replicas are starting" in details and "retry later" in details
    assert trailing.get("retry-after") == "5"
    assert 1.4 <= took < 5, took
    assert waiting(r.base) == 0


def test_past_the_hold_rest_is_503_with_retry_after(make_router):
    r = make_router(scale_from_zero=True, wait_for_replica=1.5)
    t0 = time.monotonic()
    for stream in (False, True):   # a stream fails before its headers: the same status
        status, headers, body = http(r.base, "/v1/completions", {**COMPLETION, "stream": stream})
        assert status == 503 and headers["Retry-After"] == str(int(RETRY_AFTER)) == "5"
        assert body["error"]["type"] == "service_unavailable" and body["error"]["code"] == "unavailable"
        assert "no healthy replica of deployment zero" in body["error"]["message"]
        assert "scaled to zero" in body["error"]["message"]
    assert 2.8 <= time.monotonic() - t0 < 8


def test_the_hold_is_bounded_by_the_call_deadline(make_router):
    r = make_router(scale_from_zero=True, wait_for_replica=30)
    t0 = time.monotonic()
    with grpc.insecure_channel(r.address) as channel, pytest.raises(grpc.RpcError) as err:
        llm_pb2_grpc.LLMStub(channel).Generate(generate_request("x"), timeout=1.0)
    assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert time.monotonic() - t0 < 3
    until_waiting(r.base, 0, timeout=3)   # a call given up by its client leaves the count too


@pytest.mark.parametrize("scale_from_zero", [True, False])
def test_max_waiting_refuses_a_call_past_the_bound_at_once(make_router, scale_from_zero):
    r = make_router(scale_from_zero=scale_from_zero, wait_for_replica=3, max_waiting=2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(grpc_outcome, r.address), pool.submit(http, r.base, "/v1/completions", COMPLETION)]
        until_waiting(r.base, 2)
        t0 = time.monotonic()
        code, details, trailing = grpc_outcome(r.address)
        assert time.monotonic() - t0 < 0.5   # at once, not held
        assert code == grpc.StatusCode.UNAVAILABLE and trailing.get("retry-after") == "5"
        assert details == "2 requests already waiting for a replica of deployment zero (max_waiting); retry later"
        status, headers, body = http(r.base, "/v1/completions", COMPLETION)
        assert status == 503 and headers["Retry-After"] == "5" and "2 requests already waiting" in body["error"]["message"]
        assert waiting(r.base) == 2   # the refused ones were never counted
        # The two held ones end at the hold's end, as any other.
        assert held[0].result(10)[0] == grpc.StatusCode.UNAVAILABLE
        assert held[1].result(10)[0] == 503
    assert waiting(r.base) == 0


def test_max_waiting_zero_holds_nothing_and_a_negative_bound_is_refused(make_router):
    r = make_router(scale_from_zero=True, wait_for_replica=30, max_waiting=0)
    t0 = time.monotonic()
    code, details, _ = grpc_outcome(r.address)
    assert time.monotonic() - t0 < 0.5 and code == grpc.StatusCode.UNAVAILABLE and "0 requests already waiting" in details
    with pytest.raises(ValueError, match=r"max_waiting \(--max-waiting\) -1: give a whole number, 0 or more"):
        Router("127.0.0.1:1", "llm", max_waiting=-1)


@pytest.mark.parametrize("retry_after, header", [(None, None), (0.2, "1"), (5.0, "5"), (12.5, "13")])
def test_retry_after_header(retry_after, header):
    response = _from_upstream(UpstreamError(grpc.StatusCode.UNAVAILABLE, "no replica", retry_after=retry_after))
    assert response.status == 503 and response.headers.get("Retry-After") == header
    assert json.loads(response.body) == {"error": {"message": "no replica", "type": "service_unavailable",
                                                   "param": None, "code": "unavailable"}}


# --------------------------------------------------------------------------- the first worker (real processes)


@pytest.mark.multiprocess
def test_calls_held_at_zero_are_answered_by_the_first_worker(procs, tiny_llama, tmp_path):
    worker_port, router_port, rest_port = free_port(), free_port(), free_port()
    worker_address, address = f"127.0.0.1:{worker_port}", f"127.0.0.1:{router_port}"
    base = f"http://127.0.0.1:{rest_port}"
    procs("router", "--leaders", worker_address, "--port", str(router_port), "--host", "127.0.0.1",
          "--rest-port", str(rest_port), "--deployment-name", "tiny", "--model-name", "hf://org/tiny-llama",
          "--scale-from-zero", "--wait-for-replica", "180", "--health-interval", "0.3")
    wait_serving(address, timeout=60)   # ready with no worker at all
    with grpc.insecure_channel(address) as channel:
        assert llm_pb2_grpc.LLMStub(channel).ModelInfo(llm_pb2.ModelInfoRequest(), timeout=2).model == "hf://org/tiny-llama"
    assert waiting(base) == 0

    prompt_grpc, prompt_rest = "Hello there", "Once upon a time"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        def grpc_call():
            with grpc.insecure_channel(address) as channel:
                return llm_pb2_grpc.LLMStub(channel).Generate(generate_request(prompt_grpc), timeout=200)

        held_grpc = pool.submit(grpc_call)
        held_rest = pool.submit(http, base, "/v1/completions",
                                {"model": "tiny", "prompt": prompt_rest, "max_tokens": 8, "temperature": 0}, 200)
        until_waiting(base, 2)   # both held, both counted: what the autoscaler scales from zero on
        time.sleep(0.5)
        assert not held_grpc.done() and not held_rest.done()

        config = tmp_path / "engine.json"
        config.write_text(json.dumps({"num_kv_blocks": 256, "block_size": 4, "max_batch_size": 8, "device": "cpu"}))
        worker = procs("worker", "--model", str(tiny_llama), "--config", str(config), "--host", "127.0.0.1",
                       "--port", str(worker_port), "--replica", "w0")
        reply = held_grpc.result(200)
        status, _, completion = held_rest.result(200)
    assert waiting(base) == 0
    assert status == 200, completion

    with grpc.insecure_channel(worker_address) as channel:   # the worker's own answers, no router between
        stub = llm_pb2_grpc.LLMStub(channel)
        direct_grpc = stub.Generate(generate_request(prompt_grpc), timeout=60)
        direct_rest = stub.Generate(generate_request(prompt_rest), timeout=60)
        worker_info = stub.ModelInfo(llm_pb2.ModelInfoRequest(), timeout=10)
    assert reply.replica == "w0" and reply.responses[0].text == direct_grpc.responses[0].text
    assert reply.responses[0].generated_length == 8
    assert completion["choices"][0]["text"] == direct_rest.responses[0].text
    assert completion["system_fingerprint"] == "w0" and completion["usage"]["completion_tokens"] == 8

    # Back to zero: still ready, and ModelInfo is the last one the worker gave, at once.
    worker.kill()
    worker.wait()
    time.sleep(1.0)   # a few health checks: the router sees it gone
    assert health(address) == "SERVING"
    t0 = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        info = llm_pb2_grpc.LLMStub(channel).ModelInfo(llm_pb2.ModelInfoRequest(), timeout=5)
    assert time.monotonic() - t0 < 1.0 and info == worker_info and info.replica == "w0"
