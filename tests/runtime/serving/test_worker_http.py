"""A worker's own OpenAI HTTP port (serving/worker_http.py): a real worker (WorkerServer, tiny model) with
http_port=0, driven by the real `openai` client and compared with the same worker's gRPC API."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from kubellm.metrics import parse  # noqa: E402
from kubellm.runtime.serving.client import Client  # noqa: E402
from kubellm.runtime.serving.worker import WorkerServer  # noqa: E402

pytestmark = pytest.mark.multiprocess

ENGINE = {"num_kv_blocks": 256, "block_size": 4, "max_batch_size": 8, "session_len": 128, "device": "cpu"}
SERVED = "tiny-chat"
PROMPTS = ["Hello, world!", "The capital of France is"]
CHAT = [{"role": "user", "content": "What is the meaning of life?"}]


@pytest.fixture(scope="module")
def worker(tiny_llama):
    with WorkerServer(tiny_llama, ENGINE, http_port=0, served_model_name=SERVED, replica="http-0",
                      generation_defaults={"max_new_tokens": 12}) as server:
        yield server.wait_ready()


@pytest.fixture(scope="module")
def grpc_client(worker):   # the same worker's gRPC API: what the HTTP answers are compared with
    with Client(worker.address, timeout=30) as c:
        yield c


def _openai(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oai(worker):
    with _openai(worker.http_port) as c:
        yield c


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except json.JSONDecodeError:   # aiohttp's own 404 of a route that is not there
            return err.code, {"text": raw.decode()}


def _wait_idle(worker: WorkerServer, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        free, total, running, waiting = worker.call_engine(
            lambda e: (e.block_manager.num_free, e.block_manager.num_blocks, len(e.scheduler.running),
                       len(e.scheduler.waiting)))
        if (free, running, waiting) == (total, 0, 0) or time.monotonic() > deadline:
            return free, total, running, waiting
        time.sleep(0.02)


def test_completions_equal_grpc_generate(oai, grpc_client):
    for prompt in PROMPTS:
        [want] = grpc_client.generate(prompt, max_new_tokens=8, temperature=0.0)
        got = oai.completions.create(model=SERVED, prompt=prompt, max_tokens=8, temperature=0)
        assert got.model == SERVED and got.object == "text_completion" and got.system_fingerprint == "http-0"
        assert got.choices[0].text == want.text and want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_length, want.generated_length)
        assert got.usage.total_tokens == want.prompt_length + want.generated_length
    batch = oai.completions.create(model=SERVED, prompt=PROMPTS, max_tokens=6, temperature=0)
    singles = grpc_client.generate(PROMPTS, max_new_tokens=6, temperature=0.0)
    assert [c.text for c in batch.choices] == [r.text for r in singles]
    assert batch.usage.prompt_tokens == sum(r.prompt_length for r in singles)


def test_chat_equals_grpc_generate_of_the_conversation(oai, grpc_client):
    [want] = grpc_client.generate(CHAT, max_new_tokens=10, temperature=0.0)
    got = oai.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=10, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and want.text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_length, want.generated_length)


def test_streams_concatenate_to_the_unary_text_with_the_same_usage(oai, grpc_client):
    [want] = grpc_client.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True, temperature=0.0)
    chunks = list(oai.completions.create(model=SERVED, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.prompt_length, want.generated_length) == (
        want.prompt_length, 10)

    [chat] = grpc_client.generate(CHAT, max_new_tokens=8, temperature=0.0)
    deltas = list(oai.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=8, temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.text


def test_the_model_field_is_checked(oai, worker, tiny_llama):
    # The served name and the model's own name (its path here) are both this worker's.
    for name in (SERVED, str(tiny_llama)):
        assert oai.completions.create(model=name, prompt="Hello", max_tokens=2).model == name
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="gpt-4o", prompt="Hello", max_tokens=2)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "The model `gpt-4o` does not exist" in error["message"]
    assert f"`{SERVED}`" in error["message"] and f"`{tiny_llama}`" in error["message"]   # names the valid ones
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="other", messages=CHAT, max_tokens=2)
    # Checked first, as vLLM does: a wrong model is 404 even when the rest of the body is wrong too.
    status, body = _post(worker.http_port, "/v1/completions", {"model": "other", "max_tokens": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # Absent (vLLM accepts that): the served name answers.
    status, body = _post(worker.http_port, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and body["model"] == SERVED
    status, body = _post(worker.http_port, "/v1/completions", {"model": 7, "prompt": "Hello"})
    assert status == 400 and body["error"]["param"] == "model"


def test_models_lists_the_names_it_accepts(oai, tiny_llama):
    assert [m.id for m in oai.models.list()] == [SERVED, str(tiny_llama)]


def test_only_openai_routes_on_a_worker(worker):
    status, _ = _post(worker.http_port, f"/mii/{SERVED}", {"prompts": ["Hello"]})
    assert status == 404


def test_metrics_on_the_http_port(oai, worker):
    before = parse(_get(worker.http_port, "/metrics")[1])
    oai.completions.create(model=SERVED, prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    status, text = _get(worker.http_port, "/metrics")
    after = parse(text)
    assert status == 200 and "# TYPE kubellm_requests_total counter" in text
    assert after['kubellm_requests_total{code="OK"}'] == before.get('kubellm_requests_total{code="OK"}', 0) + 1
    assert after["kubellm_generation_tokens_total"] - before["kubellm_generation_tokens_total"] == 3
    assert after["kubellm_generation_tokens_total"] == worker.metrics.generation_tokens


def test_a_client_that_leaves_mid_stream_frees_its_blocks(oai, worker):
    stream = oai.completions.create(model=SERVED, prompt="Once upon a time", max_tokens=100, stream=True,
                                    extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    free, total, running, waiting = _wait_idle(worker)
    assert (free, running, waiting) == (total, 0, 0)
    assert oai.completions.create(model=SERVED, prompt="Hello", max_tokens=2).choices[0].text is not None


def test_health_503_while_loading_then_200(tiny_llama):
    gate = threading.Event()
    server = WorkerServer(tiny_llama, ENGINE, http_port=0, load_gate=gate).start()
    try:
        status, body = _get(server.http_port, "/health")
        assert status == 503 and json.loads(body)["status"] == "unavailable"
        with _openai(server.http_port) as c, pytest.raises(openai.InternalServerError) as caught:
            c.completions.create(model=str(tiny_llama), prompt="Hello", max_tokens=2)
        assert caught.value.status_code == 503 and "still loading" in caught.value.body["message"]
        gate.set()
        server.wait_ready()
        status, body = _get(server.http_port, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
    finally:
        gate.set()
        server.stop()


def test_a_broken_engine_is_503_on_requests_and_health(tiny_llama):
    """A rank that died breaks the engine: the request and /health say so (what a Gateway's health check and
    endpoint picker act on), as gRPC's UNAVAILABLE and NOT_SERVING do."""
    def break_executor(engine):
        from kubellm.runtime.errors import ExecutorBrokenError

        def execute(batch, sampling):
            raise ExecutorBrokenError("parallel rank 1 (pid 1) died (signal 9); the group is broken")
        engine.executor.execute = execute

    with WorkerServer(tiny_llama, ENGINE, http_port=0) as server:
        server.wait_ready().call_engine(break_executor)
        assert _get(server.http_port, "/health")[0] == 200
        status, body = _post(server.http_port, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
        assert status == 503 and "parallel rank 1" in body["error"]["message"], body
        assert body["error"]["code"] == "unavailable"
        assert _get(server.http_port, "/health")[0] == 503


def test_stopping_ends_an_inflight_stream_with_the_workers_unavailable_message(tiny_llama):
    server = WorkerServer(tiny_llama, ENGINE, http_port=0).start()
    server.wait_ready()
    try:
        with _openai(server.http_port) as c:
            stream = iter(c.completions.create(model=str(tiny_llama), prompt="Once upon a time", max_tokens=100,
                                               stream=True, extra_body={"ignore_eos": True}))
            next(stream)
            # Hold the engine thread so the stream is still in flight when the worker stops.
            server._worker.engine_loop.call(lambda engine: time.sleep(2.5))
            stopper = threading.Thread(target=server.stop)
            started = time.monotonic()
            stopper.start()
            time.sleep(0.3)
            # Draining: new requests are turned away at once (a Gateway retries them elsewhere), health too.
            status, body = _post(server.http_port, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
            assert status == 503 and "shutting down" in body["error"]["message"], body
            assert _get(server.http_port, "/health")[0] == 503
            with pytest.raises(openai.APIError) as caught:
                for _ in stream:
                    pass
            assert "shutting down" in caught.value.message
            stopper.join(30)
            assert not stopper.is_alive() and time.monotonic() - started < 20
    finally:
        server.stop()
    assert server.stopped
