"""gRPC server reflection, through a real grpcurl (built from github.com/fullstorydev/grpcurl by
e2e/build-control-plane.sh): list, describe and a unary Generate with a JSON body, against a real worker
and a real `kubellm router` in front of it, over loopback. The reply's text is what the Python client gets.

grpcurl is looked up on PATH, then in the e2e cache (${KUBELLM_E2E_CACHE:-~/.cache/kubellm/e2e}/<k8s
version>/bin); without one these tests skip, unless KUBELLM_E2E_REQUIRED is set (as CI does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from processes import e2e_binary, free_port, grpcurl_runner, wait_serving

pytest.importorskip("torch")

from kubellm.runtime.serving.client import Client  # noqa: E402
from kubellm.runtime.serving.worker import WorkerServer  # noqa: E402

pytestmark = pytest.mark.multiprocess

ENGINE = {"num_kv_blocks": 128, "block_size": 4, "max_batch_size": 4, "session_len": 64, "device": "cpu"}
SERVICES = {"kubellm.v1.LLM", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.fixture(scope="module")
def grpcurl():
    path = e2e_binary("grpcurl")
    if path is None:
        reason = "no grpcurl (on PATH or built by: bash e2e/build-control-plane.sh)"
        if os.environ.get("KUBELLM_E2E_REQUIRED", "") not in ("", "0"):
            pytest.fail(f"KUBELLM_E2E_REQUIRED is set but {reason}", pytrace=False)
        pytest.skip(reason)
    return grpcurl_runner(path)


@pytest.fixture(scope="module")
def servers(tiny_llama, tmp_path_factory):
    """{"worker": address, "router": address}: a real worker, and `kubellm router` in front of it."""
    worker = WorkerServer(tiny_llama, ENGINE, replica="grpcurl-0").start()
    log = open(tmp_path_factory.mktemp("grpcurl") / "router.log", "wb")
    router_port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "router", "--leaders", worker.address,
                               "--host", "127.0.0.1", "--port", str(router_port), "--health-interval", "0.3"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        worker.wait_ready()
        wait_serving(f"127.0.0.1:{router_port}", timeout=60)
        yield {"worker": worker.address, "router": f"127.0.0.1:{router_port}"}
    finally:
        router.terminate()
        router.wait(15)
        log.close()
        worker.stop()


@pytest.mark.parametrize("target", ["worker", "router"])
def test_list_names_the_llm_health_and_reflection_services(grpcurl, servers, target):
    assert set(grpcurl(servers[target], "list").split()) == SERVICES
    methods = grpcurl(servers[target], "list", "kubellm.v1.LLM").split()
    assert methods == [f"kubellm.v1.LLM.{m}" for m in ("Generate", "GenerateStream", "ModelInfo", "Terminate")]


def test_describe_is_the_same_service_on_the_worker_and_the_router(grpcurl, servers):
    worker = grpcurl(servers["worker"], "describe", "kubellm.v1.LLM")
    assert "rpc Generate ( .kubellm.v1.GenerateRequest ) returns ( .kubellm.v1.GenerateResponse );" in worker
    assert "rpc GenerateStream ( .kubellm.v1.GenerateRequest ) returns ( stream .kubellm.v1.GenerateStreamResponse );" \
        in worker
    assert grpcurl(servers["router"], "describe", "kubellm.v1.LLM") == worker
    message = grpcurl(servers["router"], "describe", "kubellm.v1.GenerationConfig")
    assert "max_new_tokens" in message and "stop_words" in message


@pytest.mark.parametrize("target", ["worker", "router"])
def test_generate_with_a_json_body_answers_what_the_python_client_gets(grpcurl, servers, target):
    body = json.dumps({"prompts": [{"text": "Hello, world!"}, {"chat": {"messages": [
        {"role": "user", "content": "Hi"}]}}], "config": {"maxNewTokens": 5, "temperature": 0, "ignoreEos": True}})
    reply = json.loads(grpcurl(servers[target], "kubellm.v1.LLM/Generate", data=body))
    with Client(servers[target], timeout=30) as client:
        want = client.generate(["Hello, world!", [{"role": "user", "content": "Hi"}]], max_new_tokens=5,
                               temperature=0.0, ignore_eos=True)
    assert [r["text"] for r in reply["responses"]] == [w.text for w in want]
    # grpcurl prints the proto's own field names (it reads lowerCamelCase and those alike)
    assert [r["generated_length"] for r in reply["responses"]] == [5, 5], reply
    assert reply["replica"] == "grpcurl-0"
    health = json.loads(grpcurl(servers[target], "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}
