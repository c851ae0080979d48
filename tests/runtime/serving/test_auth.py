"""API keys on the router (serving/auth.py): the keys' sources and their constant-time check (pure), then a
real `kubellm router` process over echo replicas (real gRPC and HTTP over loopback): REST 401s in OpenAI's
shape and the official `openai` client with `api_key=`, gRPC UNAUTHENTICATED and `Client(api_key=)`,
health, metrics and reflection open, a kubelet-style rotation of the keys Secret taking effect in the same
process, and no key in the router's argv, logs or the replicas' metadata.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.serving import auth
from kubellm.runtime.serving.auth import ApiKeys, bearer_token, env_keys, key_id, parse_keys
from kubellm.runtime.serving.client import Client, ClientError
from processes import free_port, wait_serving

KEY_A = "sk-kubellm-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-kubellm-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
KEY_ENV = "sk-kubellm-from-the-environment-0123456789"


# --------------------------------------------------------------------------- the keys (pure)


@pytest.mark.parametrize("text, keys", [
    ("sk-1", ["sk-1"]),
    ("sk-1\n", ["sk-1"]),
    ("  sk-1  \r\n\n\tsk-2\n\n", ["sk-1", "sk-2"]),
    ("\n \n", []),
    ("", []),
])
def test_a_secret_file_holds_one_key_a_line(text, keys):
    assert parse_keys(text) == keys


@pytest.mark.parametrize("value, keys", [
    (None, []), ("", []), ("sk-1", ["sk-1"]), (" sk-1 , sk-2,,", ["sk-1", "sk-2"]),
])
def test_the_environment_gives_comma_separated_keys(value, keys):
    assert env_keys(value) == keys


@pytest.mark.parametrize("header, token", [
    ("Bearer sk-1", "sk-1"), ("bearer sk-1", "sk-1"), ("BEARER   sk-1 ", "sk-1"),
    (None, None), ("", None), ("Bearer", None), ("Bearer  ", None), ("Basic c2stMQ==", None), ("sk-1", None),
])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_key_id_is_short_stable_and_not_the_key():
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:8] == key_id(KEY_A)
    assert key_id(KEY_A) != key_id(KEY_B) and len(key_id(KEY_A)) == 8 and key_id(KEY_A) not in KEY_A


def test_check_answers_the_key_id_or_none():
    keys = ApiKeys([KEY_A, KEY_B])
    assert keys.check(KEY_A) == key_id(KEY_A) and keys.check(KEY_B) == key_id(KEY_B)
    for wrong in (None, "", KEY_A[:-1], KEY_A + "x", KEY_A.upper(), "\ud800"):
        assert keys.check(wrong) is None
    assert keys.ids == [key_id(KEY_A), key_id(KEY_B)]
    assert ApiKeys([KEY_A, KEY_A]).ids == [key_id(KEY_A)]   # duplicates compared once


def test_check_compares_digests_against_every_key_without_an_early_exit(monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys([KEY_A, KEY_B, KEY_ENV])
    for presented, expected in ((KEY_A, key_id(KEY_A)), (KEY_ENV, key_id(KEY_ENV)), ("short", None),
                                ("x" * 10_000, None)):
        calls.clear()
        assert keys.check(presented) == expected
        # Every key, the first one matching or none; fixed-length digests: neither which key nor its length shows.
        assert calls == [(32, 32)] * 3, (presented[:10], calls)


def test_no_source_means_auth_off_and_a_missing_directory_is_an_error(tmp_path):
    assert ApiKeys.from_sources(None, environ={}) is None
    assert ApiKeys.from_sources(None, environ={"KUBELLM_API_KEY": " , "}) is None
    env_only = ApiKeys.from_sources(None, environ={"KUBELLM_API_KEY": f"{KEY_A},{KEY_B}"})
    assert env_only.ids == [key_id(KEY_A), key_id(KEY_B)]
    with pytest.raises(ValueError, match=r"--api-keys-dir .*nope: no such directory \(mount the Secret"):
        ApiKeys.from_sources(tmp_path / "nope", environ={})


def kubelet_secret(directory: Path, files: dict[str, str], generation: int) -> None:
    """Write `files` into `directory` as kubelet projects a Secret: a timestamped directory, `..data` a
    link to it swapped atomically through `..data_tmp`, and each key a link through `..data`."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..2026_01_01_00_00_{generation:02d}.000000001"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for name in os.listdir(directory):   # keys the new version dropped
        if not name.startswith(".") and name not in files and (directory / name).is_symlink():
            (directory / name).unlink()
    for old in directory.glob("..2026_*"):
        if old != version:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def test_a_kubelet_rotation_is_read_within_the_reload_interval(tmp_path):
    secret = tmp_path / "keys"
    kubelet_secret(secret, {"api-key": KEY_A, "more": f"\n{KEY_ENV}\n"}, 1)
    (secret / ".hidden").write_text("sk-ignored")
    (secret / "subdir").mkdir()
    keys = ApiKeys(directory=secret, reload_interval=0.3)
    assert keys.check(KEY_A) and keys.check(KEY_ENV) and not keys.check("sk-ignored")

    kubelet_secret(secret, {"api-key": KEY_B}, 2)
    assert keys.check(KEY_A)   # not looked at again before the interval
    time.sleep(0.35)
    assert keys.check(KEY_A) is None and keys.check(KEY_ENV) is None   # removed keys stop working
    assert keys.check(KEY_B) == key_id(KEY_B)

    kubelet_secret(secret, {}, 3)   # an empty Secret: every request refused, not auth off
    time.sleep(0.35)
    assert keys.check(KEY_B) is None and keys.ids == []


def test_environment_keys_stay_beside_the_directory(tmp_path):
    secret = tmp_path / "keys"
    secret.mkdir()
    (secret / "k").write_text(KEY_A)
    keys = ApiKeys.from_sources(secret, environ={"KUBELLM_API_KEY": KEY_ENV})
    assert keys.check(KEY_A) and keys.check(KEY_ENV)


# --------------------------------------------------------------------------- a real router process


class Echo(llm_pb2_grpc.LLMServicer):
    """A replica answering `echo:PROMPT`; the prompt "metadata" answers the metadata keys it received."""

    @staticmethod
    def _text(request, context) -> str:
        prompt = request.prompts[0]
        text = prompt.chat.messages[-1].content if prompt.HasField("chat") else prompt.text
        if text == "metadata":
            return ",".join(sorted(k for k, _ in context.invocation_metadata()))
        return f"echo:{text}"

    async def Generate(self, request, context):
        return llm_pb2.GenerateResponse(replica="echo-0", responses=[llm_pb2.Response(
            text=self._text(request, context), prompt_length=1, generated_length=2, finish_reason="length")])

    async def GenerateStream(self, request, context):
        text = self._text(request, context)
        for i, part in enumerate((text[:3], text[3:])):
            yield llm_pb2.GenerateStreamResponse(text=part, replica="echo-0", prompt_length=1, generated_length=i + 1,
                                                 finish_reason="length" if i else "")

    async def ModelInfo(self, request, context):
        return llm_pb2.ModelInfoResponse(model="echo-model", replica="echo-0")


@pytest.fixture(scope="module")
def echo_leader():
    """An echo replica (with grpc.health.v1) in an asyncio loop of its own thread; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        llm_pb2_grpc.add_LLMServicer_to_server(Echo(), server)
        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


class RouterProcess:
    def __init__(self, proc: subprocess.Popen, log: Path, port: int, rest_port: int, metrics_port: int):
        self.proc, self.log = proc, log
        self.address = f"127.0.0.1:{port}"
        self.base = f"http://127.0.0.1:{rest_port}"
        self.metrics = f"http://127.0.0.1:{metrics_port}"


@pytest.fixture
def start_router(tmp_path, echo_leader):
    """start_router(keys_dir, env_keys) -> a `kubellm router` process over the echo leader, REST and metrics on."""
    started: list[subprocess.Popen] = []

    def start(keys_dir: Path | None, env_key: str | None = None) -> RouterProcess:
        port, rest_port, metrics_port = free_port(), free_port(), free_port()
        log = tmp_path / f"router-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if k != "KUBELLM_API_KEY"}
        if env_key is not None:
            env["KUBELLM_API_KEY"] = env_key
        args = [sys.executable, "-m", "kubellm.runtime.cli.main", "router", "--leaders", echo_leader,
                "--port", str(port), "--host", "127.0.0.1", "--rest-port", str(rest_port),
                "--metrics-port", str(metrics_port), "--deployment-name", "echo", "--health-interval", "0.3"]
        if keys_dir is not None:
            args += ["--api-keys-dir", str(keys_dir)]
        with open(log, "wb") as out:
            started.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env))
        router = RouterProcess(started[-1], log, port, rest_port, metrics_port)
        wait_serving(router.address, timeout=60)   # health needs no key
        return router

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http(url: str, body: dict | None = None, key: str | None = None, header: str | None = None):
    """(status, headers, JSON or text body) of GET `url` (POST `body`), error statuses included."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if header is not None:
        headers["Authorization"] = header
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, head, raw = reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, dict(err.headers), err.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw.decode()


COMPLETION = {"model": "echo", "prompt": "hi", "max_tokens": 2}


@pytest.fixture
def keys_dir(tmp_path) -> Path:
    kubelet_secret(tmp_path / "api-keys", {"api-key": KEY_A}, 1)
    return tmp_path / "api-keys"


@pytest.mark.multiprocess
def test_rest_without_a_valid_key_is_401_in_openais_shape_and_probes_stay_open(start_router, keys_dir):
    router = start_router(keys_dir)
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", {"messages": [
            {"role": "user", "content": "hi"}]}), ("/v1/models", None), ("/mii/echo", {"prompts": ["hi"]})):
        for kind, auth_header in (("none", None), ("wrong", "Bearer sk-wrong"), ("not bearer", f"Basic {KEY_A}"),
                                  ("empty", "Bearer ")):
            status, headers, reply = http(router.base + path, body, header=auth_header)
            assert status == 401, (path, kind, reply)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert set(reply) == {"error"} and reply["error"]["type"] == "invalid_request_error"
            assert reply["error"]["code"] == "invalid_api_key" and reply["error"]["param"] is None
            assert "Authorization: Bearer <key>" in reply["error"]["message"]
            assert KEY_A not in json.dumps(reply)
        status, _, reply = http(router.base + path, body, key=KEY_A)
        assert status == 200, (path, reply)
    assert http(router.base + "/v1/completions", COMPLETION)[2]["error"]["message"].startswith(
        "You didn't provide an API key")
    assert http(router.base + "/v1/completions", COMPLETION, key="sk-x")[2]["error"]["message"].startswith(
        "Incorrect API key provided")

    # Probes, Prometheus and the schema: no key. They generate nothing.
    status, _, reply = http(router.base + "/health")
    assert status == 200 and reply["healthy_replicas"] == 1
    assert http(router.base + "/metrics")[0] == 200 and "kubellm_router" in http(router.base + "/metrics")[2]
    assert http(router.metrics + "/metrics")[0] == 200
    assert http(router.metrics + "/readyz")[0] == 200 and http(router.metrics + "/livez")[0] == 200


@pytest.mark.multiprocess
def test_the_openai_client_works_with_api_key(start_router, keys_dir):
    openai = pytest.importorskip("openai")
    router = start_router(keys_dir)
    client = openai.OpenAI(base_url=router.base + "/v1", api_key=KEY_A, max_retries=0)
    completion = client.completions.create(model="echo", prompt="hello", max_tokens=2)
    assert completion.choices[0].text == "echo:hello"
    chat = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hey"}], max_tokens=2)
    assert chat.choices[0].message.content == "echo:hey"
    stream = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "yo"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo:yo"
    assert [m.id for m in client.models.list()] == ["echo", "echo-model"]

    wrong = openai.OpenAI(base_url=router.base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model="echo", prompt="hello", max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def _grpc_code(address: str, method: str, metadata=None):
    with grpc.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        request = {"Generate": llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="hi")]),
                   "GenerateStream": llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="hi")]),
                   "ModelInfo": llm_pb2.ModelInfoRequest(), "Terminate": llm_pb2.TerminateRequest()}[method]
        try:
            reply = getattr(stub, method)(request, timeout=10, metadata=metadata)
            if method == "GenerateStream":
                list(reply)
        except grpc.RpcError as err:
            return err.code(), err.details()
        return grpc.StatusCode.OK, ""


@pytest.mark.multiprocess
def test_grpc_needs_the_key_as_metadata_and_health_and_reflection_stay_open(start_router, keys_dir, monkeypatch):
    router = start_router(keys_dir, env_key=KEY_ENV)
    for method in ("Generate", "GenerateStream", "ModelInfo", "Terminate"):
        code, details = _grpc_code(router.address, method)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
        assert details.startswith("no API key: send one of this deployment's keys as the metadata "
                                  "'authorization: Bearer <key>'"), details
        code, details = _grpc_code(router.address, method, metadata=[("authorization", "Bearer sk-wrong")])
        assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("the API key is not valid")
    assert _grpc_code(router.address, "Generate", [("authorization", f"Bearer {KEY_A}")])[0] == grpc.StatusCode.OK
    # Terminate passes the key check; then the router's own rule (not started with --allow-terminate).
    code, _ = _grpc_code(router.address, "Terminate", [("authorization", f"Bearer {KEY_A}")])
    assert code == grpc.StatusCode.PERMISSION_DENIED

    monkeypatch.delenv("KUBELLM_API_KEY", raising=False)
    with Client(router.address, api_key=KEY_A) as client:
        assert client.generate("hi")[0].text == "echo:hi"
        assert "".join(r.text for r in client.stream("there")) == "echo:there"
        assert client.model_info().model == "echo-model"
    with Client(router.address, api_key=KEY_ENV) as client:   # the router's $KUBELLM_API_KEY beside the Secret's
        assert client.generate("env")[0].text == "echo:env"
    monkeypatch.setenv("KUBELLM_API_KEY", f"{KEY_A},{KEY_B}")   # the client's default: its first key
    with Client(router.address) as client:
        assert client.generate("default")[0].text == "echo:default"
    monkeypatch.delenv("KUBELLM_API_KEY")
    with Client(router.address) as client, pytest.raises(ClientError) as err:
        client.generate("hi")
    assert err.value.code == "UNAUTHENTICATED" and "this client sent no key" in err.value.message
    with Client(router.address, api_key="sk-wrong") as client, pytest.raises(ClientError) as err:
        list(client.stream("hi"))
    assert err.value.code == "UNAUTHENTICATED" and "this client's key was refused" in err.value.message

    with grpc.insecure_channel(router.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=5))
        assert "kubellm.v1.LLM" in {s.name for s in answer.list_services_response.service}


@pytest.mark.multiprocess
def test_the_key_goes_nowhere_but_the_router(start_router, keys_dir):
    router = start_router(keys_dir, env_key=KEY_ENV)
    with Client(router.address, api_key=KEY_A) as client:
        received = client.generate("metadata")[0].text.split(",")
    assert "authorization" not in received and received   # checked by the router, never forwarded
    status, _, reply = http(router.base + "/v1/completions", {**COMPLETION, "prompt": "metadata"}, key=KEY_A)
    assert status == 200 and "authorization" not in reply["choices"][0]["text"]
    http(router.base + "/v1/completions", COMPLETION, key=KEY_B)   # refused: a key that is not (yet) one
    _grpc_code(router.address, "Generate", [("authorization", f"Bearer {KEY_B}")])

    cmdline = Path(f"/proc/{router.proc.pid}/cmdline").read_bytes().decode()
    log = router.log.read_text()
    for key in (KEY_A, KEY_B, KEY_ENV):
        assert key not in cmdline and key not in log
    assert key_id(KEY_A) in log and key_id(KEY_ENV) in log   # what the log says instead: the ids


@pytest.mark.multiprocess
def test_a_rotated_secret_takes_effect_in_the_same_process(start_router, keys_dir):
    router = start_router(keys_dir)
    assert http(router.base + "/v1/completions", COMPLETION, key=KEY_A)[0] == 200
    assert _grpc_code(router.address, "Generate", [("authorization", f"Bearer {KEY_A}")])[0] == grpc.StatusCode.OK
    assert http(router.base + "/v1/completions", COMPLETION, key=KEY_B)[0] == 401

    kubelet_secret(keys_dir, {"api-key": KEY_B}, 2)   # as kubelet does: a new ..data, swapped atomically
    rotated = time.monotonic()
    while http(router.base + "/v1/completions", COMPLETION, key=KEY_A)[0] != 401:
        assert time.monotonic() - rotated < 3.0, "key A still works 3 s after the rotation"
        time.sleep(0.1)
    assert http(router.base + "/v1/completions", COMPLETION, key=KEY_B)[0] == 200
    assert _grpc_code(router.address, "Generate", [("authorization", f"Bearer {KEY_A}")])[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _grpc_code(router.address, "Generate", [("authorization", f"Bearer {KEY_B}")])[0] == grpc.StatusCode.OK
    assert router.proc.poll() is None   # the same process, never restarted
    assert f"API keys reloaded from {keys_dir}: 1 (ids {key_id(KEY_B)})" in router.log.read_text()


@pytest.mark.multiprocess
def test_a_router_without_keys_asks_for_none(start_router):
    router = start_router(None)
    assert http(router.base + "/v1/completions", COMPLETION)[0] == 200
    assert _grpc_code(router.address, "Generate")[0] == grpc.StatusCode.OK


@pytest.mark.multiprocess
def test_a_missing_keys_directory_stops_the_router_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "router", "--leaders", "127.0.0.1:1",
                           "--port", "0", "--api-keys-dir", str(tmp_path / "nope")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"kubellm: error: --api-keys-dir {tmp_path / 'nope'}: no such directory" in proc.stderr
