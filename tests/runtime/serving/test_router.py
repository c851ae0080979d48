"""The router and its REST gateway, against echo replicas over real gRPC on loopback.

The echo replicas and the router run in one asyncio loop in a background thread; the tests
are ordinary synchronous gRPC / HTTP / `openai` clients, as a user would be.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from processes import free_port
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.serving.replicas import parse_leaders, resolve
from kubellm.runtime.serving.router import Router


# --------------------------------------------------------------------------- echo replicas


pytestmark = pytest.mark.multiprocess


def _prompt_text(prompt: llm_pb2.Prompt) -> str:
    if prompt.HasField("chat"):
        return prompt.chat.messages[-1].content
    if prompt.HasField("token_ids"):
        return " ".join(map(str, prompt.token_ids.ids))
    return prompt.text


class Echo(llm_pb2_grpc.LLMServicer):
    """Answers `NAME:PROMPT`; "bad" -> INVALID_ARGUMENT, "full" -> RESOURCE_EXHAUSTED,
    "hang" streams one message then waits, "deadline" answers the time left, "meta" the x-echo header."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0
        self.cancelled = 0
        self.last_request = None

    async def _check(self, request, context):
        self.calls += 1
        self.last_request = request
        texts = [_prompt_text(p) for p in request.prompts]
        if "bad" in texts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompts[0]: 'bad' is not allowed")
        if "full" in texts:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return texts

    def _answer(self, text: str, context) -> str:
        if text == "deadline":
            return str(context.time_remaining())
        if text == "meta":
            return dict(context.invocation_metadata()).get("x-echo", "")
        return f"{self.name}:{text}"

    async def Generate(self, request, context):
        texts = await self._check(request, context)
        if f"sleep-{self.name}" in texts:
            await asyncio.sleep(60)
        return llm_pb2.GenerateResponse(replica=self.name, responses=[
            llm_pb2.Response(text=self._answer(t, context), index=i, prompt_length=len(t.split()),
                             generated_length=3, finish_reason="length") for i, t in enumerate(texts)])

    async def GenerateStream(self, request, context):
        texts = await self._check(request, context)
        try:
            for i, t in enumerate(texts):
                answer = self._answer(t, context)
                parts = [answer[:3], answer[3:6], answer[6:]]
                for j, part in enumerate(parts):
                    yield llm_pb2.GenerateStreamResponse(
                        index=i, text=part, replica=self.name, prompt_length=len(t.split()),
                        generated_length=j + 1, finish_reason="stop" if j == 2 else "")
                    if t == "hang":
                        await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def ModelInfo(self, request, context):
        return llm_pb2.ModelInfoResponse(model="echo-model", replica=self.name)

    async def Terminate(self, request, context):
        return llm_pb2.TerminateResponse(accepted=True)


class EchoReplica:
    def __init__(self, name: str):
        self.servicer = Echo(name)
        self.port = 0
        self.server = None

    async def start(self) -> None:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        llm_pb2_grpc.add_LLMServicer_to_server(self.servicer, self.server)
        hs = health.aio.HealthServicer()
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)


class Cluster:
    """Echo replicas + a router in an asyncio loop of their own thread."""

    def __init__(self, n: int = 2, **router_options):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.replicas = [EchoReplica(f"replica-{i}") for i in range(n)]
        for r in self.replicas:
            self.run(r.start())
        leaders = router_options.pop("leaders", ",".join(f"127.0.0.1:{r.port}" for r in self.replicas))
        options = {"health_interval": 0.2, "health_timeout": 0.5, "wait_for_replica": 0.5, **router_options}

        async def make():
            router = Router(leaders, "echo", **options)
            await router.start(0, "127.0.0.1", rest_port=0)
            return router

        self.router = self.run(make())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.router.grpc_port}")
        self.stub = llm_pb2_grpc.LLMStub(self.channel)
        self.base = f"http://127.0.0.1:{self.router.rest_port}"

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, text: str = "hi", **kw) -> llm_pb2.GenerateResponse:
        return self.stub.Generate(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=text)]), timeout=5, **kw)

    def wait_healthy(self, index: int, healthy: bool, timeout: float = 5) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.router.replicas[index].healthy == healthy:
                return
            time.sleep(0.05)
        raise AssertionError(f"replica {index} never became healthy={healthy}")

    def close(self) -> None:
        self.channel.close()
        self.run(self.router.stop(0))
        for r in self.replicas:
            self.run(r.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


# --------------------------------------------------------------------------- routing


def test_round_robin_0101(cluster):
    assert [cluster.generate().replica for _ in range(4)] == ["replica-0", "replica-1", "replica-0", "replica-1"]
    # streams take turns too, and carry the replica's text
    chunks = list(cluster.stub.GenerateStream(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="yo")]), timeout=5))
    assert "".join(c.text for c in chunks) == f"{chunks[0].replica}:yo" and chunks[-1].finish_reason == "stop"


def test_dead_replica_is_skipped_and_comes_back(cluster):
    cluster.run(cluster.replicas[1].stop())
    cluster.wait_healthy(1, False)
    assert {cluster.generate().replica for _ in range(6)} == {"replica-0"}
    status = health_pb2_grpc.HealthStub(cluster.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    cluster.run(cluster.replicas[1].start())  # the same port again
    cluster.wait_healthy(1, True)
    assert {cluster.generate().replica for _ in range(4)} == {"replica-0", "replica-1"}


def test_no_healthy_replica(cluster):
    for r in cluster.replicas:
        cluster.run(r.stop())
    cluster.wait_healthy(0, False)
    cluster.wait_healthy(1, False)
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy replica of deployment echo" in err.value.details()
    status = health_pb2_grpc.HealthStub(cluster.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    live = health_pb2_grpc.HealthStub(cluster.channel).Check(health_pb2.HealthCheckRequest(service="liveness"),
                                                            timeout=5).status
    assert live == health_pb2.HealthCheckResponse.SERVING  # a liveness probe must not restart the router


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_request_waits_for_a_replica_while_none_is_healthy(method):
    """Between groups of a rolling update, or while a lone group restarts, a request is held (up
    to wait_for_replica) and served by the first replica back, not failed."""
    c = Cluster(n=1, wait_for_replica=10)
    try:
        port = c.replicas[0].port
        c.wait_healthy(0, True)
        c.run(c.replicas[0].stop())
        c.wait_healthy(0, False)
        result = {}

        def call():
            req = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="held")])
            result["reply"] = (c.stub.Generate(req, timeout=15) if method == "Generate"
                               else list(c.stub.GenerateStream(req, timeout=15))[-1])
        t = threading.Thread(target=call)
        t0 = time.monotonic()
        t.start()
        time.sleep(1.0)
        assert "reply" not in result  # held, not failed
        c.replicas[0] = EchoReplica("replica-0b")
        c.replicas[0].port = port
        c.run(c.replicas[0].start())
        t.join(10)
        assert result["reply"].replica == "replica-0b" and 1.0 <= time.monotonic() - t0 < 6
        assert c.router.replicas[0].name == "replica-0b"  # learned from ModelInfo
    finally:
        c.close()


def test_hold_is_bounded_by_the_request_deadline():
    c = Cluster(n=1, wait_for_replica=30)
    try:
        c.run(c.replicas[0].stop())
        c.wait_healthy(0, False)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Generate(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="x")]), timeout=1.5)
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert time.monotonic() - t0 < 3
    finally:
        c.close()


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_request_on_just_killed_replica_is_retried(method):
    c = Cluster(health_interval=60)  # no health check in between: the failure itself must be handled
    try:
        c.run(c.replicas[1].stop())
        assert c.router.replicas[1].healthy  # the router has not noticed yet
        if method == "Generate":
            replicas = [c.generate().replica for _ in range(4)]
        else:
            req = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="s")])
            replicas = [list(c.stub.GenerateStream(req, timeout=5))[-1].replica for _ in range(4)]
        assert replicas == ["replica-0"] * 4
        assert f'kubellm_router_retries_total{{method="{method}"}} 1' in c.router.metrics.render()
        assert not c.router.replicas[1].healthy
    finally:
        c.close()


def test_inflight_unary_on_killed_replica_is_retried(cluster):
    assert cluster.generate().replica == "replica-0"
    result = {}
    t = threading.Thread(target=lambda: result.update(reply=cluster.generate("sleep-replica-1")))
    t.start()
    end = time.monotonic() + 5
    while cluster.replicas[1].servicer.calls == 0 and time.monotonic() < end:
        time.sleep(0.01)
    cluster.run(cluster.replicas[1].stop())
    t.join(5)
    assert result["reply"].replica == "replica-0"


def test_stream_cut_after_first_message_ends_unavailable(cluster):
    start = time.monotonic()
    stream = cluster.stub.GenerateStream(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="hang")]), timeout=20)
    first = next(stream)
    victim = int(first.replica.rsplit("-", 1)[1])
    cluster.run(cluster.replicas[victim].stop())
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"127.0.0.1:{cluster.replicas[victim].port}" in err.value.details()
    assert "mid-stream" in err.value.details()
    assert time.monotonic() - start < 5


def test_stream_whose_upstream_channel_closes_ends_unavailable(cluster):
    """A leader that leaves (its pod terminating) has its channel closed under the calls in flight:
    the client gets UNAVAILABLE naming the replica, never a hang."""
    start = time.monotonic()
    stream = cluster.stub.GenerateStream(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="hang")]), timeout=20)
    first = next(stream)
    victim = next(r for r in cluster.router.replicas if r.name == first.replica)
    cluster.run(victim.channel.close(grace=None))
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert first.replica in err.value.details() and "mid-stream" in err.value.details()
    assert time.monotonic() - start < 5


def test_client_cancel_cancels_upstream(cluster):
    stream = cluster.stub.GenerateStream(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="hang")]), timeout=20)
    first = next(stream)
    stream.cancel()
    servicer = cluster.replicas[int(first.replica.rsplit("-", 1)[1])].servicer
    end = time.monotonic() + 5
    while servicer.cancelled == 0 and time.monotonic() < end:
        time.sleep(0.05)
    assert servicer.cancelled == 1


def test_errors_pass_through_unretried(cluster):
    for text, code in (("bad", grpc.StatusCode.INVALID_ARGUMENT), ("full", grpc.StatusCode.RESOURCE_EXHAUSTED)):
        before = sum(r.servicer.calls for r in cluster.replicas)
        with pytest.raises(grpc.RpcError) as err:
            cluster.generate(text)
        assert err.value.code() == code
        assert sum(r.servicer.calls for r in cluster.replicas) == before + 1
    assert err.value.details() == "queue full"
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub.GenerateStream(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="bad")]), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'bad' is not allowed" in err.value.details()


def test_metadata_deadline_and_terminate(cluster):
    assert cluster.generate("meta", metadata=[("x-echo", "hello")]).responses[0].text == "hello"
    left = cluster.stub.Generate(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="deadline")]), timeout=2)
    assert 0 < float(left.responses[0].text) <= 2.1  # the client's deadline reached the replica
    no_deadline = cluster.stub.Generate(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="deadline")]))
    assert no_deadline.responses[0].text == "None"
    with pytest.raises(grpc.RpcError) as err:
        cluster.stub.Terminate(llm_pb2.TerminateRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = cluster.stub.ModelInfo(llm_pb2.ModelInfoRequest(), timeout=5)
    assert info.model == "echo-model"


def test_grpc_requests_and_replies_pass_as_bytes(cluster):
    """The router forwards what it gets without re-encoding it: a field it does not know (a newer
    client's) reaches the replica byte for byte; ModelInfo is still understood for /v1/models."""
    sent = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="raw")]).SerializeToString()
    sent += b"\xc0\x3e\x07"  # field 1000 (varint) = 7: unknown to every side
    generate = cluster.channel.unary_unary("/kubellm.v1.LLM/Generate")  # bytes in, bytes out
    reply = llm_pb2.GenerateResponse.FromString(generate(sent, timeout=5))
    servicer = cluster.replicas[int(reply.replica.rsplit("-", 1)[1])].servicer
    assert servicer.last_request.SerializeToString() == sent
    assert reply.responses[0].text == f"{reply.replica}:raw"
    stream = cluster.channel.unary_stream("/kubellm.v1.LLM/GenerateStream")
    chunks = [llm_pb2.GenerateStreamResponse.FromString(b) for b in stream(sent, timeout=5)]
    assert "".join(c.text for c in chunks).endswith(":raw")
    assert cluster.stub.ModelInfo(llm_pb2.ModelInfoRequest(), timeout=5).model == "echo-model"
    assert cluster.router.model_info.model == "echo-model"  # parsed once for the gateway


def test_latency_histogram_is_cumulative():
    from kubellm.runtime.serving.router import RouterMetrics

    m = RouterMetrics()
    for seconds in (0.003, 0.007, 0.01, 200.0):
        m.observe("Generate", seconds)
    text = m.render()
    for le, n in (("0.005", 1), ("0.01", 3), ("0.025", 3), ("120", 3), ("+Inf", 4)):
        assert f'kubellm_router_request_duration_seconds_bucket{{method="Generate",le="{le}"}} {n}' in text
    assert 'kubellm_router_request_duration_seconds_count{method="Generate"} 4' in text


def test_terminate_when_allowed():
    c = Cluster(allow_terminate=True)
    try:
        assert c.stub.Terminate(llm_pb2.TerminateRequest(), timeout=5).accepted
        c.run(asyncio.wait_for(c.router.wait_for_termination(), 5))
    finally:
        c.close()


def test_leaders_and_dns():
    assert parse_leaders("a:1, b:2") == (None, ["a:1", "b:2"])
    assert parse_leaders("dns:///llm-leaders.ns.svc.cluster.local:50051") == (
        "llm-leaders.ns.svc.cluster.local:50051", [])
    with pytest.raises(ValueError):
        parse_leaders("nohost")
    assert resolve("localhost:1234") == ["127.0.0.1:1234"]


def test_router_over_dns_name():
    c = Cluster(n=1)
    try:
        async def make():
            router = Router(f"dns:///localhost:{c.replicas[0].port}", "echo", health_interval=0.2)
            await router.start(0, "127.0.0.1")
            return router

        router = c.run(make())
        try:
            assert [r.address for r in router.replicas] == [f"127.0.0.1:{c.replicas[0].port}"]
            with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as ch:
                reply = llm_pb2_grpc.LLMStub(ch).Generate(
                    llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="x")]), timeout=5)
            assert reply.replica == "replica-0"
        finally:
            c.run(router.stop(0))
    finally:
        c.close()


# --------------------------------------------------------------------------- REST gateway


def _post(url: str, body) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_openai_package(cluster):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cluster.base + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="echo", prompt="hi", max_tokens=5)
    assert out.choices[0].text.endswith(":hi") and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3
    text = "".join(c.choices[0].text for c in client.completions.create(model="echo", prompt="hey", stream=True))
    assert text.endswith(":hey")
    chat = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hello"}],
                                          temperature=0.5, top_p=0.9, stop=["\n"], max_tokens=8)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content.endswith(":hello")
    chunks = list(client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "yo"}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).endswith(":yo")
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {m.id for m in client.models.list()} == {"echo", "echo-model"}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="echo", prompt="bad")  # the replica's INVALID_ARGUMENT
    assert "'bad' is not allowed" in str(err.value)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "full"}])
    with pytest.raises(openai.BadRequestError):
        list(client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "bad"}], stream=True))


def test_mii_endpoint_and_errors(cluster):
    status, body = _post(cluster.base + "/mii/echo", {"prompts": ["a b", "c"], "max_length": 128})
    assert status == 200
    assert [r["generated_text"].split(":")[1] for r in body] == ["a b", "c"]
    assert body[0]["prompt_length"] == 2 and body[0]["generated_length"] == 3 and body[0]["finish_reason"] == "length"
    status, body = _post(cluster.base + "/mii/nope", {"prompts": ["a"]})
    assert status == 404 and "nope" in body["error"]["message"]
    for path, bad, param in (("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
                             ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
                             ("/v1/completions", {"prompt": 5}, "prompt"),
                             ("/v1/chat/completions", {"messages": "hi"}, "messages"),
                             ("/mii/echo", {"prompts": []}, "prompts")):
        status, body = _post(cluster.base + path, bad)
        assert status == 400, (path, bad, body)
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
        assert body["error"]["message"]
    status, body = _post(cluster.base + "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    for r in cluster.replicas:
        cluster.run(r.stop())
    cluster.wait_healthy(0, False)
    cluster.wait_healthy(1, False)
    status, body = _post(cluster.base + "/v1/completions", {"prompt": "x"})
    assert status == 503 and "no healthy replica" in body["error"]["message"]
    with urllib.request.urlopen(cluster.base + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert "kubellm_router_healthy_replicas 0" in metrics
    assert 'code="OK"' in metrics and "kubellm_router_request_duration_seconds_bucket" in metrics


def test_no_torch_import():
    code = ("import sys, kubellm.runtime.serving.router, kubellm.runtime.serving.gateway, kubellm.runtime.cli.main; "
            "kubellm.runtime.cli.main.build_parser(); "
            "bad = [m for m in ('torch', 'transformers', 'kubellm.runtime.engine.engine') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_kubellm_router_process():
    """`kubellm router` as the router pod runs it: a real process, gRPC + REST, stopped by SIGTERM."""
    c = Cluster(n=2)
    port, rest, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "router", "--deployment-name", "echo",
                             "--leaders", ",".join(f"127.0.0.1:{r.port}" for r in c.replicas),
                             "--port", str(port), "--rest-port", str(rest), "--host", "127.0.0.1",
                             "--metrics-port", str(metrics),
                             "--health-interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=20)
            stub = llm_pb2_grpc.LLMStub(ch)
            replies = [stub.Generate(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="p")]), timeout=5,
                                     wait_for_ready=True).replica for _ in range(4)]
        assert replies == ["replica-0", "replica-1", "replica-0", "replica-1"]
        status, body = _post(f"http://127.0.0.1:{rest}/mii/echo", {"prompt": "q"})
        assert status == 200 and body[0]["generated_text"] == "replica-0:q"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'kubellm_router_requests_total{replica="127.0.0.1:%d",method="Generate",code="OK"} 3' % (
            c.replicas[0].port) in text
        assert "kubellm_router_healthy_replicas 2" in text
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        c.close()


def test_two_real_workers(tiny_llama):
    """Two real workers on the tiny checkpoint behind the router: 0,1,0,1; streamed text == unary text."""
    pytest.importorskip("torch")
    from kubellm.runtime.serving.worker import WorkerServer

    engine = {"num_kv_blocks": 128, "block_size": 4, "max_batch_size": 4, "session_len": 64, "device": "cpu"}
    workers = [WorkerServer(tiny_llama, engine, replica=f"worker-{i}",
                            generation_defaults={"max_new_tokens": 8}).start() for i in range(2)]
    c = None
    try:
        for w in workers:
            w.wait_ready()
        c = Cluster(n=0, leaders=",".join(w.address for w in workers))
        req = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="Hello, world!")],
                                      config=llm_pb2.GenerationConfig(temperature=0.0, max_new_tokens=8))
        replies = [c.stub.Generate(req, timeout=30) for _ in range(4)]
        assert [r.replica for r in replies] == ["worker-0", "worker-1", "worker-0", "worker-1"]
        assert replies[0].responses[0].text == replies[1].responses[0].text
        streamed = "".join(m.text for m in c.stub.GenerateStream(req, timeout=30))
        assert streamed == replies[0].responses[0].text
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=c.base + "/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="echo", prompt="Hello, world!", max_tokens=8, temperature=0)
        assert out.choices[0].text == replies[0].responses[0].text
        with pytest.raises(openai.BadRequestError) as err:  # the worker's INVALID_ARGUMENT, as a 400
            client.completions.create(model="echo", prompt="hello " * 200, max_tokens=8)
        assert err.value.status_code == 400
    finally:
        if c is not None:
            c.close()
        for w in workers:
            w.stop()


def test_fuzzed_rest_requests_answer_200_or_400():
    """Hypothesis-generated REST bodies (bounded): each answers 200 or a 400 in OpenAI's shape, never 500."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                       st.text(max_size=8))
    value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                         max_leaves=6)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                     "content": st.one_of(st.text(max_size=10), value)})
    keys = ["max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "max_length",
            "min_new_tokens", "ignore_eos", "do_sample", "repetition_penalty", "stream_options", "model"]
    options = st.dictionaries(st.sampled_from(keys), value, max_size=4)
    bodies = st.one_of(
        st.tuples(st.just("/v1/completions"), st.builds(lambda p, o: {**o, "prompt": p},
                                                          st.one_of(st.text(max_size=10), value), options)),
        st.tuples(st.just("/v1/chat/completions"), st.builds(lambda m, o: {**o, "messages": m},
                                                               st.one_of(st.lists(message, max_size=3), value),
                                                               options)),
        st.tuples(st.just("/mii/echo"), st.builds(lambda p, o: {**o, "prompts": p},
                                                   st.one_of(st.lists(st.text(max_size=10), max_size=3), value),
                                                   options)))
    c = Cluster(n=2)
    try:
        @hypothesis.settings(max_examples=80, deadline=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(bodies)
        def check(case):
            path, body = case
            req = urllib.request.Request(c.base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    status, raw = resp.status, resp.read()
            except urllib.error.HTTPError as err:
                status, raw = err.code, err.read()
            assert status in (200, 400), (status, raw)
            if status == 400:
                error = json.loads(raw)["error"]
                assert error["type"] == "invalid_request_error" and error["message"]

        check()
        assert all(r.healthy for r in c.router.replicas)
    finally:
        c.close()


def test_sse_stream_cut_ends_with_error_event(cluster):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cluster.base + "/v1", api_key="unused", max_retries=0, timeout=20)
    start = time.monotonic()
    stream = iter(client.completions.create(model="echo", prompt="hang", stream=True))
    first = next(stream)
    assert first.choices[0].text == "rep"
    for r in cluster.replicas:  # whichever got it
        cluster.run(r.stop())
    with pytest.raises(openai.APIError) as err:
        list(stream)
    assert "mid-stream" in str(err.value)
    assert time.monotonic() - start < 5
