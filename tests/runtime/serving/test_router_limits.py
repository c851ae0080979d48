"""The router's limits over real gRPC and HTTP on loopback (docs/limits.md): a request past max_request_bytes is
RESOURCE_EXHAUSTED / 413; the per-caller token bucket is shared by gRPC and REST and kept per API key; past
max_streams_per_connection a connection's further calls wait; what the router's own methods cannot parse is
INVALID_ARGUMENT. The last tests run a real `kubellm router` process with the flags."""

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
from processes import free_port, wait_serving

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.local.deployments import _limit_flags
from kubellm.runtime.serving.auth import ApiKeys
from kubellm.runtime.serving.limits import Limits
from kubellm.runtime.serving.router import Router

pytestmark = pytest.mark.multiprocess


class Slow(llm_pb2_grpc.LLMServicer):
    """A replica answering `echo:PROMPT`; a prompt "sleep:S" sleeps S seconds first."""

    def __init__(self):
        self.calls = 0
        self.active = self.peak = 0   # calls running at once, and the most there were

    async def Generate(self, request, context):
        self.calls += 1
        text = request.prompts[0].text
        if text.startswith("sleep:"):
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                await asyncio.sleep(float(text.split(":")[1]))
            finally:
                self.active -= 1
        return llm_pb2.GenerateResponse(replica="slow", responses=[llm_pb2.Response(text=f"echo:{text}",
                                                                                     finish_reason="stop")])

    async def GenerateStream(self, request, context):
        self.calls += 1
        yield llm_pb2.GenerateStreamResponse(text=f"echo:{request.prompts[0].text}", finish_reason="stop")

    async def ModelInfo(self, request, context):
        return llm_pb2.ModelInfoResponse(model="slow", replica="slow", session_len=4096)


class Deployment:
    """A Slow replica and a Router (REST on) with `limits`, in an asyncio loop of their own thread."""

    def __init__(self, limits: Limits, api_keys: ApiKeys | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.replica = Slow()

        async def start():
            server = grpc.aio.server()
            llm_pb2_grpc.add_LLMServicer_to_server(self.replica, server)
            from grpc_health.v1 import health, health_pb2_grpc
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            router = Router(f"127.0.0.1:{port}", "limits", health_interval=0.2, limits=limits, api_keys=api_keys)
            await router.start(0, "127.0.0.1", rest_port=0)
            return server, router

        self.server, self.router = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.address = f"127.0.0.1:{self.router.grpc_port}"
        self.base = f"http://127.0.0.1:{self.router.rest_port}"

    def close(self):
        async def stop():
            await self.router.stop(0)
            await self.server.stop(0)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def deploy():
    made = []

    def make(**options):
        made.append(Deployment(**options))
        return made[-1]
    yield make
    for d in made:
        d.close()


def request(text: str) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=text)], config=llm_pb2.GenerationConfig(max_new_tokens=2))


def generate(address: str, text: str = "hi", metadata=(), stream: bool = False):
    """("OK", text) or (code, details, trailing metadata)."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        try:
            if stream:
                return "OK", "".join(m.text for m in stub.GenerateStream(request(text), metadata=metadata, timeout=10))
            return "OK", stub.Generate(request(text), metadata=metadata, timeout=10).responses[0].text
        except grpc.RpcError as err:
            return err.code(), err.details(), dict(err.trailing_metadata() or ())


def http(base: str, path: str, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_a_request_past_max_request_bytes_is_refused_on_both_ports(deploy):
    d = deploy(limits=Limits(max_request_bytes=4096))
    assert generate(d.address, "x" * 3000) == ("OK", "echo:" + "x" * 3000)
    code, details, _ = generate(d.address, "x" * 5000)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    status, _, body = http(d.base, "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "4096 bytes" in body["error"]["message"]
    assert d.replica.calls == 1   # neither reached the replica


def test_one_bucket_per_caller_for_grpc_and_rest(deploy):
    d = deploy(limits=Limits(rate_limit=0.5, rate_limit_burst=3))
    assert generate(d.address)[0] == "OK"
    assert generate(d.address, stream=True)[0] == "OK"
    assert http(d.base, "/v1/completions", {"prompt": "hi"})[0] == 200
    code, details, trailing = generate(d.address)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "0.5 requests per second" in details
    assert trailing["retry-after"] == "2"
    code, _, trailing = generate(d.address, stream=True)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailing["retry-after"] == "2"
    status, headers, body = http(d.base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 429 and headers["Retry-After"] == "2" and body["error"]["code"] == "rate_limit_exceeded"
    with grpc.insecure_channel(d.address) as channel:   # ModelInfo is not counted
        assert llm_pb2_grpc.LLMStub(channel).ModelInfo(llm_pb2.ModelInfoRequest(), timeout=5).model == "slow"
    assert d.replica.calls == 3


def test_with_api_keys_each_key_has_its_own_bucket(deploy):
    d = deploy(limits=Limits(rate_limit=0.1, rate_limit_burst=1), api_keys=ApiKeys(["key-a", "key-b"]))
    a, b = (("authorization", "Bearer key-a"),), (("authorization", "Bearer key-b"),)
    assert generate(d.address, metadata=a)[0] == "OK"
    assert generate(d.address, metadata=a)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert generate(d.address, metadata=b)[0] == "OK"   # same address, another key
    assert http(d.base, "/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer key-b"})[0] == 429
    # Without a key: 401 before any bucket is touched.
    assert http(d.base, "/v1/completions", {"prompt": "hi"})[0] == 401


def _concurrent(d: Deployment, n: int) -> tuple[int, list]:
    """n concurrent slow calls on ONE channel: (the most the replica ran at once, the calls' outcomes)."""
    with grpc.insecure_channel(d.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        stub.Generate(request("warm"), timeout=10)   # connected, its SETTINGS known
        time.sleep(0.2)
        d.replica.peak = 0
        calls = [stub.Generate.future(request("sleep:0.4"), timeout=30) for _ in range(n)]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(call.result().responses[0].text)
            except grpc.RpcError as err:
                outcomes.append((err.code(), err.details()))
        return d.replica.peak, outcomes


def test_past_max_streams_per_connection_the_next_calls_wait(deploy):
    peak, outcomes = _concurrent(deploy(limits=Limits()), 6)
    assert peak == 6 and outcomes == ["echo:sleep:0.4"] * 6
    peak, outcomes = _concurrent(deploy(limits=Limits(max_streams_per_connection=2)), 6)
    assert peak == 2   # never more than 2 of the connection's calls at once
    ok = [o for o in outcomes if o == "echo:sleep:0.4"]
    # The others waited for a stream; one opened in the instant another ended may be refused by HTTP/2
    # (REFUSED_STREAM: UNAVAILABLE, never processed, safe to retry), as grpc-core's server does.
    assert len(ok) >= 2 and all(o[0] == grpc.StatusCode.UNAVAILABLE and "RST_STREAM" in o[1]
                                for o in outcomes if o not in ok), outcomes


def test_what_the_router_itself_cannot_parse_is_invalid_argument(deploy):
    d = deploy(limits=Limits())
    with grpc.insecure_channel(d.address) as channel:
        for method in ("/kubellm.v1.LLM/Terminate", "/grpc.health.v1.Health/Check"):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(method)(b"\x0a\x05ab", timeout=5)   # a length past the end
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            list(channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                iter([b"\xff\xff\xff"]), timeout=5))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A Health/Check that parses still answers.
        assert channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5) == b"\x08\x01"   # SERVING


# --------------------------------------------------------------------------- a real `kubellm router`


def test_kubellm_router_takes_the_flags(tmp_path):
    leader = f"127.0.0.1:{free_port()}"   # nothing there: the limits answer before any replica is needed
    port, rest = free_port(), free_port()
    log = open(tmp_path / "router.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "router", "--leaders", leader,
                             "--host", "127.0.0.1", "--port", str(port), "--rest-port", str(rest),
                             "--scale-from-zero", "--wait-for-replica", "0.2", "--max-request-bytes", "2048",
                             "--rate-limit", "0.2", "--rate-limit-burst", "1", "--max-prompts-per-request", "4"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", 30)
        base = f"http://127.0.0.1:{rest}"
        status, _, body = http(base, "/v1/completions", {"prompt": "x" * 3000})
        assert status == 413 and "2048 bytes" in body["error"]["message"]
        status, _, body = http(base, "/v1/completions", {"prompt": ["a"] * 5})   # takes the one token
        assert status == 400 and "max_prompts_per_request (4" in body["error"]["message"]
        status, headers, _ = http(base, "/v1/completions", {"prompt": "hi"})
        assert status == 429 and headers["Retry-After"] == "5"
        code, _, trailing = generate(f"127.0.0.1:{port}")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and trailing["retry-after"] == "5"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("flags, words", [
    (["--max-request-bytes", "0"], ["--max-request-bytes", "1 or more"]),
    (["--rate-limit", "0"], ["--rate-limit", "more than 0"]),
    (["--rate-limit-burst", "3"], ["--rate-limit-burst", "needs rate_limit"]),
])
def test_kubellm_router_refuses_bad_limits_naming_the_flag(flags, words):
    result = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "router", "--leaders", "127.0.0.1:1",
                             "--port", "0", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and all(w in result.stderr for w in words), result.stderr


def test_local_deployments_pass_the_limits_to_their_router():
    assert _limit_flags(4096, 10, 2.5, None, 8) == ["--max-request-bytes", "4096", "--max-streams-per-connection",
                                                    "10", "--rate-limit", "2.5", "--max-prompts-per-request", "8"]
    assert _limit_flags(None, None, None, None, None) == []
    with pytest.raises(ValueError, match="rate_limit_burst"):
        _limit_flags(None, None, None, 5, None)


def test_kubellm_serve_f_takes_spec_limits(tmp_path):
    import yaml

    from kubellm.runtime.cli.local import read_manifest, serve_options

    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment",
                                    "metadata": {"name": "llm"}, "spec": {
                                        "model": {"source": str(tmp_path)},
                                        "limits": {"maxRequestBytes": 4096, "maxConcurrentStreamsPerConnection": 8,
                                                   "rateLimit": {"requestsPerSecond": 2.5},
                                                   "maxPromptsPerRequest": 8}}}))
    options = serve_options(read_manifest(str(path))[1])
    assert {k: options[k] for k in ("max_request_bytes", "max_streams_per_connection", "rate_limit",
                                    "rate_limit_burst", "max_prompts_per_request")} == {
        "max_request_bytes": 4096, "max_streams_per_connection": 8, "rate_limit": 2.5, "rate_limit_burst": 3,
        "max_prompts_per_request": 8}
