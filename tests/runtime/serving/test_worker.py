"""The gRPC worker over loopback: real servers (background threads or a `kubellm worker` process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from processes import free_port

grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from kubellm.runtime.serving.client import Client, ClientError  # noqa: E402
from kubellm.metrics import parse  # noqa: E402
from kubellm.runtime.serving.worker import WorkerServer  # noqa: E402

ENGINE = {"num_kv_blocks": 256, "block_size": 4, "max_batch_size": 8, "session_len": 64, "device": "cpu"}
PROMPTS = ["Hello, world!", "The capital of France is", "Once upon a time"]
CHAT = [{"role": "user", "content": "What is the meaning of life?"}]


pytestmark = pytest.mark.multiprocess


def _health(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _engine_state(worker: WorkerServer):
    return worker.call_engine(lambda e: (e.block_manager.num_free, e.block_manager.num_blocks,
                                         len(e.scheduler.running), len(e.scheduler.waiting)))


def _wait_idle(worker: WorkerServer, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        free, total, running, waiting = _engine_state(worker)
        if (free, running, waiting) == (total, 0, 0) or time.monotonic() > deadline:
            return free, total, running, waiting
        time.sleep(0.02)


@pytest.fixture(scope="module")
def worker(tiny_llama):
    server = WorkerServer(tiny_llama, ENGINE, metrics_port=0, replica="test-replica",
                          generation_defaults={"max_new_tokens": 12}).start()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(worker):
    c = Client(worker.address, timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    import kubellm

    pipe = kubellm.pipeline(tiny_llama, show_progress=False, **ENGINE)
    out = {"plain": pipe(PROMPTS, max_new_tokens=12), "chat": pipe([CHAT], max_new_tokens=12)}
    pipe.destroy()
    return out


def test_health_not_serving_while_loading_then_serving(tiny_llama):
    gate = threading.Event()
    server = WorkerServer(tiny_llama, ENGINE, load_gate=gate).start()
    never = WorkerServer(tiny_llama, ENGINE, load_gate=threading.Event()).start()
    never.stop()   # stopping before the model loads does not hang
    assert never.stopped
    try:
        assert _health(server.address) == "NOT_SERVING"
        assert _health(server.address, "kubellm.v1.LLM") == "NOT_SERVING"
        with Client(server.address) as c, pytest.raises(ClientError) as err:
            c.generate("Hello", max_new_tokens=2)
        assert err.value.code == "UNAVAILABLE" and "loading" in err.value.message
        gate.set()
        server.wait_ready()
        deadline = time.monotonic() + 5
        while _health(server.address) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _health(server.address) == "SERVING"
        assert _health(server.address, "kubellm.v1.LLM") == "SERVING"
    finally:
        server.stop()


def test_generate_matches_pipeline(client, reference):
    responses = client.generate(PROMPTS)   # max_new_tokens=12 comes from the deployment's defaults
    assert [r.index for r in responses] == [0, 1, 2]
    for got, want in zip(responses, reference["plain"]):
        assert got.text == want.text
        assert got.token_ids == want.token_ids
        assert got.prompt_length == want.input_token_len and got.generated_length == want.generate_token_len
        assert got.finish_reason == want.finish_reason
        assert got.replica == "test-replica"
        assert got.input_token_len == got.prompt_length and got.generate_token_len == got.generated_length


def test_logprobs_and_token_id_prompts(client, tiny_llama):
    [r] = client.generate([[5, 17, 42, 99]], max_new_tokens=4, ignore_eos=True, logprobs=0)
    assert r.prompt_length == 4 and len(r.token_ids) == 4
    assert len(r.logprobs) == 4 and all(lp <= 0 for lp in r.logprobs)
    [plain] = client.generate([[5, 17, 42, 99]], max_new_tokens=4, ignore_eos=True)
    assert plain.logprobs is None and plain.token_ids == r.token_ids


def test_chat_prompt_matches_pipeline(client, reference):
    [got] = client.generate(CHAT)   # one conversation
    want = reference["chat"][0]
    assert (got.text, got.token_ids) == (want.text, want.token_ids)
    two = client.generate([CHAT, CHAT])   # a list of conversations
    assert [r.text for r in two] == [want.text, want.text]


def test_stream_concatenation_equals_generate(client):
    full = client.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    texts, ids, finish = {}, {}, {}
    for delta in client.stream(PROMPTS, max_new_tokens=10, ignore_eos=True):
        assert delta.replica == "test-replica"
        assert delta.index not in finish, "no delta after a prompt's last one"
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        ids.setdefault(delta.index, []).extend(delta.token_ids)
        if delta.finish_reason:
            finish[delta.index] = delta.finish_reason
    assert [texts[i] for i in range(3)] == [r.text for r in full]
    assert [ids[i] for i in range(3)] == [r.token_ids for r in full]
    assert [finish[i] for i in range(3)] == ["length"] * 3


def test_model_info(client, worker, tiny_llama):
    import kubellm

    info = client.model_info()
    assert info.model == str(tiny_llama)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.tensor_parallel, info.pipeline_parallel) == (1, 1)
    assert info.max_batch_size == 8 and info.session_len == 64
    assert info.replica == "test-replica" and info.version == kubellm.__version__


@pytest.mark.parametrize("prompts, options, field", [
    ("", {}, "prompts[0]"),
    (["ok", ""], {}, "prompts[1]"),
    ([], {}, "prompts"),
    ("Hello", {"top_p": 0.0}, "top_p"),
    ("Hello", {"max_new_tokens": 0}, "max_new_tokens"),
    ("the quick brown fox " * 40, {}, "session_len"),
    ([[5, 100000]], {}, "prompts[0]"),
])
def test_invalid_argument_names_the_field(client, prompts, options, field):
    with pytest.raises(ClientError) as err:
        client.generate(prompts, **options)
    assert err.value.code == "INVALID_ARGUMENT"
    assert field in err.value.message
    assert client.generate("Hello", max_new_tokens=2)[0].generated_length == 2   # still serving


def test_unknown_option_fails_before_any_rpc(client):
    with pytest.raises(ValueError, match="temprature"):
        client.generate("Hello", temprature=0.5)


def test_cancelled_stream_frees_blocks(client, worker):
    stream = client.stream(["Once upon a time"] * 8, max_new_tokens=55, ignore_eos=True)
    got = [next(stream) for _ in range(3)]
    assert all(d.finish_reason is None for d in got)
    seqs = worker.call_engine(lambda e: list(e.scheduler.running) + list(e.scheduler.waiting))
    assert len(seqs) == 8 and not any(s.is_finished for s in seqs)   # still generating
    stream.close()                                                     # the client goes away mid-stream
    free, total, running, waiting = _wait_idle(worker)
    assert (free, running, waiting) == (total, 0, 0)
    assert {s.finish_reason for s in seqs} == {"abort"}


def test_deadline_aborts_engine_requests(client, worker):
    before = worker.metrics.generation_tokens
    with pytest.raises(ClientError) as err:
        client.generate(["Once upon a time"] * 8, max_new_tokens=55, ignore_eos=True, timeout=0.05)
    assert err.value.code == "DEADLINE_EXCEEDED"
    free, total, running, waiting = _wait_idle(worker)
    assert (free, running, waiting) == (total, 0, 0)
    assert worker.metrics.generation_tokens - before < 8 * 55   # aborted, not run to the end


def test_engine_step_failure_is_internal_and_worker_keeps_serving(client, worker):
    def break_once(engine):
        real = engine.step

        def step():
            engine.step = real
            raise RuntimeError("injected failure")
        engine.step = step

    worker.call_engine(break_once)
    with pytest.raises(ClientError) as err:
        client.generate("Hello", max_new_tokens=3)
    assert err.value.code == "INTERNAL" and "injected failure" in err.value.message
    assert _wait_idle(worker)[2:] == (0, 0)
    assert client.generate("Hello", max_new_tokens=3)[0].generated_length == 3


def _kill_engine_thread(engine):
    def boom():
        raise SystemError("injected death")
    engine.has_unfinished = boom


def _break_executor(engine):
    from kubellm.runtime.errors import ExecutorBrokenError

    def execute(batch, sampling):
        raise ExecutorBrokenError("parallel rank 1 (pid 1) died (signal 9); the group is broken")
    engine.executor.execute = execute


@pytest.mark.parametrize("inject, message", [(_kill_engine_thread, "injected death"),
                                             (_break_executor, "parallel rank 1")],
                         ids=["dead-engine-thread", "broken-executor"])
def test_a_dead_engine_means_not_serving_and_unavailable(tiny_llama, inject, message):
    """A dead engine thread, or the executor's one rank-failure error (a rank died), which ends the
    engine thread: health NOT_SERVING, the request and every later one UNAVAILABLE. Any other step
    failure stays INTERNAL (above)."""
    server = WorkerServer(tiny_llama, ENGINE).start().wait_ready()
    try:
        server.call_engine(inject)
        with Client(server.address, timeout=10) as c:
            with pytest.raises(ClientError) as err:
                c.generate("Hello", max_new_tokens=3)
            assert err.value.code == "UNAVAILABLE" and message in err.value.message
            deadline = time.monotonic() + 5
            while _health(server.address) != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _health(server.address) == "NOT_SERVING"
            assert _health(server.address, "kubellm.v1.LLM") == "NOT_SERVING"
            with pytest.raises(ClientError) as err:
                c.generate("Hello", max_new_tokens=3)
            assert err.value.code == "UNAVAILABLE"
    finally:
        server.stop()


def test_metrics(client, worker):
    client.generate(PROMPTS, max_new_tokens=5, ignore_eos=True)
    with pytest.raises(ClientError):
        client.generate("Hello", top_p=0.0)   # counted as INVALID_ARGUMENT
    _wait_idle(worker)
    text = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).read().decode()
    m = parse(text)
    assert m['kubellm_requests_total{code="OK"}'] >= 1
    assert m['kubellm_requests_total{code="INVALID_ARGUMENT"}'] >= 1
    assert m["kubellm_prompt_tokens_total"] > 0 and m["kubellm_generation_tokens_total"] >= 15
    assert m["kubellm_running"] == 0 and m["kubellm_waiting"] == 0 and m["kubellm_kv_cache_usage"] == 0
    assert m["kubellm_time_to_first_token_seconds_count"] >= 3
    assert 0 < m["kubellm_time_to_first_token_seconds_sum"] < 60
    assert m["kubellm_time_per_output_token_seconds_count"] >= 3
    assert m['kubellm_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["kubellm_time_to_first_token_seconds_count"]
    assert "# TYPE kubellm_time_per_output_token_seconds histogram" in text


def test_terminate_refused_without_permission(client, worker):
    with pytest.raises(ClientError) as err:
        client.terminate_server()
    assert err.value.code == "PERMISSION_DENIED" and "allow_terminate" in err.value.message
    assert not worker.stopped and client.generate("Hi", max_new_tokens=1)


def test_queue_full_then_terminate(tiny_llama):
    server = WorkerServer(tiny_llama, {**ENGINE, "max_queue_size": 2}, allow_terminate=True).start().wait_ready()
    try:
        with Client(server.address, timeout=30) as c:
            with pytest.raises(ClientError) as err:
                c.generate(["Hello"] * 6, max_new_tokens=4)
            assert err.value.code == "RESOURCE_EXHAUSTED"
            # Many clients at once: some are refused, the others answered, nothing breaks.
            codes = []

            def one():
                try:
                    c.generate(["Hello", "world"], max_new_tokens=20, ignore_eos=True)
                    codes.append("OK")
                except ClientError as e:
                    codes.append(e.code)

            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes
            free, total, running, waiting = _wait_idle(server)
            assert (free, running, waiting) == (total, 0, 0)
            assert c.generate("Hello", max_new_tokens=2)[0].generated_length == 2
            assert c.terminate_server() is True
        assert server.wait_stopped(15)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    finally:
        server.stop()


def test_client_imports_no_torch():
    code = "import sys, kubellm.runtime.serving.client; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_worker_process(tiny_llama, tmp_path):
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"dtype": "float32", "max_batch_size": 4, "block_size": 4, "session_len": 64,
                                  "enable_prefix_caching": True, "tensor_parallel": 1, "pipeline_parallel": 1,
                                  "kv_cache_fraction": 0.05}))
    defaults = tmp_path / "generation.json"
    defaults.write_text(json.dumps({"max_new_tokens": 3}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "worker", "--model", str(tiny_llama),
                             "--config", str(config), "--port", str(port), "--host", "127.0.0.1",
                             "--allow-terminate", "--generation-defaults", str(defaults)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = _health(address)
            except grpc.RpcError:
                status = None
            if status == "SERVING":
                break
            time.sleep(0.1)
        assert status == "SERVING", proc.stdout.read().decode() if proc.poll() is not None else "not serving"
        with Client(address, timeout=30) as c:
            [r] = c.generate("Hello")
            assert r.generated_length == 3 and r.replica.endswith(f":{port}")
            assert c.model_info().max_batch_size == 4
            assert c.terminate_server() is True
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_worker_rejects_a_tensor_parallel_size_the_heads_do_not_split(tiny_llama, capsys):
    from kubellm.runtime.cli.main import main

    # 4 attention heads and 2 KV heads: 3 ranks cannot share them; the worker exits 2 with the
    # field, the reason and the valid sizes, before starting any rank.
    assert main(["worker", "--model", str(tiny_llama), "--tensor-parallel", "3", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "tensor_parallel: 3" in err and "valid sizes are [1, 2]" in err
