"""TLS on the router (--tls-cert / --tls-key, serving/tls.py): a self-signed certificate made here for
127.0.0.1 and localhost, a real `kubellm router` over a real tiny-model `kubellm worker`, with an API key
as well. gRPC through `Client(tls=True, ca_file=)`, REST over HTTPS through the official `openai` client,
a plaintext client refused, and `/readyz` / `/livez` on the plain-HTTP metrics port (what the kubelet
probes, since its gRPC probe cannot speak TLS).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubellm.runtime.serving.client import Client, ClientError
from kubellm.runtime.serving.tls import ServerTls, channel_credentials
from processes import free_port, wait_serving
from tls_certs import self_signed

KEY = "sk-kubellm-tls-test-0123456789abcdef"


# --------------------------------------------------------------------------- the files, checked up front


def test_tls_files_are_checked_up_front_naming_the_flag(tmp_path):
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    assert ServerTls.load(None, None) is None
    tls = ServerTls.load(str(cert), str(key))
    assert tls.cert == cert.read_bytes() and tls.key_file == str(key)
    with pytest.raises(ValueError, match=r"^--tls-key: give --tls-cert FILE and --tls-key FILE together"):
        ServerTls.load(str(cert), None)
    with pytest.raises(ValueError, match=r"^--tls-cert: give --tls-cert FILE and --tls-key FILE together"):
        ServerTls.load(None, str(key))
    with pytest.raises(ValueError, match=r"^--tls-cert .*nope.crt: cannot be read \(No such file"):
        ServerTls.load(str(tmp_path / "nope.crt"), str(key))
    with pytest.raises(ValueError, match=r"not a PEM certificate chain and its private key"):
        ServerTls.load(str(cert), str(other_key))   # a key that is not the certificate's
    with pytest.raises(ValueError, match=r"not a PEM certificate chain and its private key"):
        ServerTls.load(str(key), str(key))
    with pytest.raises(ValueError, match=r"^ca_file .*nope.pem: cannot be read"):
        channel_credentials(str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match=r"^ca_file "):
        Client("127.0.0.1:1", ca_file=str(tmp_path / "nope.pem"))
    del other_cert


@pytest.mark.multiprocess
def test_a_router_with_a_bad_key_file_exits_with_a_message(tmp_path):
    cert, _ = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    proc = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "router", "--leaders", "127.0.0.1:1",
                           "--port", "0", "--tls-cert", str(cert), "--tls-key", str(other_key)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "kubellm: error: --tls-cert" in proc.stderr, proc.stderr
    assert "not a PEM certificate chain and its private key" in proc.stderr


# --------------------------------------------------------------------------- a real router and worker


def _get(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def tls_deployment(tiny_llama, tmp_path):
    """A tiny-model worker and a router in front of it serving TLS (gRPC) and HTTPS (REST), key required."""
    cert, key = self_signed(tmp_path)
    log = open(tmp_path / "processes.log", "wb")  # noqa: SIM115 - closed once the processes are gone
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"num_kv_blocks": 64, "block_size": 4, "max_batch_size": 4, "device": "cpu"}))
    worker_port, port, rest_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("KUBELLM_API_KEY", None)

    def start(*args, **extra_env):
        return subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=dict(env, **extra_env))

    worker = start("worker", "--model", str(tiny_llama), "--config", str(config), "--host", "127.0.0.1",
                   "--port", str(worker_port), "--replica", "w0")
    router = start("router", "--leaders", f"127.0.0.1:{worker_port}", "--port", str(port), "--host", "127.0.0.1",
                   "--rest-port", str(rest_port), "--metrics-port", str(metrics_port), "--deployment-name", "tiny",
                   "--health-interval", "0.3", "--tls-cert", str(cert), "--tls-key", str(key),
                   KUBELLM_API_KEY=KEY)
    d = {"cert": cert, "worker": worker, "router": router, "worker_address": f"127.0.0.1:{worker_port}",
         "address": f"127.0.0.1:{port}", "https": f"https://127.0.0.1:{rest_port}",
         "http": f"http://127.0.0.1:{rest_port}", "metrics": f"http://127.0.0.1:{metrics_port}",
         "log": tmp_path / "processes.log"}
    try:
        wait_serving(d["worker_address"], timeout=120)
        end = time.monotonic() + 30   # the router's readiness, through its plain metrics port
        while _get(d["metrics"] + "/readyz") != 200:
            assert time.monotonic() < end and router.poll() is None, d["log"].read_text()[-3000:]
            time.sleep(0.2)
        yield d
    finally:
        for p in (router, worker):
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()


@pytest.mark.multiprocess
def test_grpc_and_rest_over_tls_with_probes_on_the_plain_metrics_port(tls_deployment):
    d = tls_deployment
    with Client(d["worker_address"]) as direct:   # the worker itself: plaintext, in the cluster
        expected = direct.generate("Hello, world!", max_new_tokens=6, temperature=0)[0].text

    with Client(d["address"], api_key=KEY, tls=True, ca_file=str(d["cert"])) as client:
        reply = client.generate("Hello, world!", max_new_tokens=6, temperature=0)[0]
        assert (reply.text, reply.replica) == (expected, "w0")
        assert "".join(r.text for r in client.stream("Hello, world!", max_new_tokens=6, temperature=0)) == expected
    with Client(d["address"], api_key=KEY, ca_file=str(d["cert"])) as client:   # ca_file implies TLS
        assert client.model_info().replica == "w0"

    # Health over TLS needs no key; a plaintext client, or one that does not trust the certificate, gets nothing.
    with grpc.secure_channel(d["address"], channel_credentials(str(d["cert"]))) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with Client(d["address"], api_key=KEY) as plaintext, pytest.raises(ClientError) as err:
        plaintext.generate("Hello", max_new_tokens=2, timeout=5)
    assert err.value.code == "UNAVAILABLE"
    with Client(d["address"], api_key=KEY, tls=True) as system_roots, pytest.raises(ClientError) as err:
        system_roots.generate("Hello", max_new_tokens=2, timeout=5)
    assert err.value.code == "UNAVAILABLE"

    # REST over HTTPS, through the official client verifying the certificate.
    openai = pytest.importorskip("openai")
    import httpx2

    verified = ssl.create_default_context(cafile=str(d["cert"]))
    with httpx2.Client(verify=verified) as http_client:
        client = openai.OpenAI(base_url=d["https"] + "/v1", api_key=KEY, max_retries=0, http_client=http_client)
        completion = client.completions.create(model="tiny", prompt="Hello, world!", max_tokens=6, temperature=0)
        assert completion.choices[0].text == expected
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.content is not None and chat.usage.completion_tokens == 4
        wrong = openai.OpenAI(base_url=d["https"] + "/v1", api_key="sk-wrong", max_retries=0, http_client=http_client)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert _get(d["https"] + "/health", verified) == 200
    with pytest.raises(OSError):   # plain HTTP on the HTTPS port: the connection is dropped
        _get(d["http"] + "/health")

    # Probes and Prometheus: plain HTTP on the metrics port, no key.
    assert _get(d["metrics"] + "/readyz") == 200 and _get(d["metrics"] + "/livez") == 200
    assert _get(d["metrics"] + "/metrics") == 200
    d["worker"].kill()
    d["worker"].wait()
    end = time.monotonic() + 10
    while _get(d["metrics"] + "/readyz") != 503:   # no replica: not ready, as its "" gRPC health says
        assert time.monotonic() < end, "/readyz still 200 10 s after the only worker died"
        time.sleep(0.2)
    assert _get(d["metrics"] + "/livez") == 200   # the process runs: not restarted for it
    assert KEY not in d["log"].read_text()
