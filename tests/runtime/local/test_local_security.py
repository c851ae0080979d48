"""A local deployment with an API key and TLS (`kubellm serve --api-key --tls-cert --tls-key`, real processes):
`kubellm.client(name)` connects, the key reaches the router through its environment only (not its argv,
not the workers, not the registry file), and `terminate_server(name)` still stops everything."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from processes import free_port
from tls_certs import self_signed

pytest.importorskip("grpc")
pytest.importorskip("torch")

pytestmark = pytest.mark.multiprocess

KEY = "sk-kubellm-local-0123456789abcdef"


def _cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy())


def test_serve_with_an_api_key_and_tls(tiny_llama, cache, tmp_path, monkeypatch):
    import kubellm
    from kubellm.runtime.local import deployments, registry

    cert, key_file = self_signed(tmp_path)
    rest = free_port()
    served = _cli("serve", str(tiny_llama), "--name", "locked", "--api-key", KEY, "--tls-cert", str(cert),
                  "--tls-key", str(key_file), "--rest-port", str(rest), "--device", "cpu", "--num-kv-blocks", "64",
                  "--block-size", "4", "--max-batch-size", "4", "--session-len", "64", "--max-new-tokens", "8")
    assert served.returncode == 0, served.stderr
    assert "tls:        on" in served.stdout and "api key:    required" in served.stdout
    assert KEY not in served.stdout + served.stderr

    entry_file = deployments.registry_dir() / "locked.json"
    entry = json.loads(entry_file.read_text())
    cache.update(registry.entry_pids(entry))
    assert KEY not in entry_file.read_text()   # the registry says a key is needed, never which
    assert entry["api_key_required"] is True and entry["tls"] is True and entry["ca_file"] == str(cert)
    assert entry["rest_url"] == f"https://127.0.0.1:{rest}/mii/locked"

    router_pid = entry["router_pid"]
    assert KEY.encode() not in Path(f"/proc/{router_pid}/cmdline").read_bytes()   # ps shows no key
    assert f"KUBELLM_API_KEY={KEY}".encode() in Path(f"/proc/{router_pid}/environ").read_bytes().split(b"\0")
    for pid in entry["worker_pids"]:   # the workers check no key: they are given none
        assert KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

    # kubellm.client(name): the key from api_key= or $KUBELLM_API_KEY, TLS from the registry.
    with pytest.raises(deployments.DeploymentError, match=r"requires an API key: give kubellm.client\('locked', "
                                                          r"api_key=...\) or set \$KUBELLM_API_KEY"):
        kubellm.client("locked")
    c = kubellm.client("locked", api_key=KEY)
    text = c.generate("Hello, world!", max_new_tokens=8)[0].text
    assert c.generate("Hello, world!", max_new_tokens=8)[0].generated_length == 8
    c.close()
    monkeypatch.setenv("KUBELLM_API_KEY", KEY)
    with kubellm.client("locked") as c:
        assert c.generate("Hello, world!", max_new_tokens=8)[0].text == text
    wrong = kubellm.client("locked", api_key="sk-wrong")
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        wrong.generate("Hello")
    wrong.close()

    # REST over HTTPS with the key, as the openai client would send it.
    request = urllib.request.Request(entry["rest_url"], method="POST",
                                     data=json.dumps({"prompts": ["Hello, world!"], "max_new_tokens": 8}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(request, timeout=30, context=context) as reply:
        assert json.loads(reply.read())[0]["generated_text"] == text
    request.remove_header("Authorization")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30, context=context)
    assert err.value.code == 401

    logs = "".join(p.read_text(errors="replace") for p in Path(entry["log_dir"]).glob("*.log"))
    assert KEY not in logs

    # terminate_server(name) with auth on: Terminate carries the key ($KUBELLM_API_KEY), everything stops.
    pids = registry.entry_pids(entry)
    start = time.monotonic()
    assert kubellm.terminate_server("locked")
    assert time.monotonic() - start < 15
    assert not any(registry.pid_alive(p) for p in pids)
    assert not entry_file.exists()


def test_serve_refuses_bad_keys_and_tls_files_up_front(cache, tmp_path):
    import kubellm

    cert, key_file = self_signed(tmp_path)
    with pytest.raises(ValueError, match="api_key: must not contain commas or whitespace"):
        kubellm.serve("/nonexistent", api_key="sk-a,sk-b")
    with pytest.raises(ValueError, match="api_key: give the key as a non-empty string"):
        kubellm.serve("/nonexistent", api_key="")
    with pytest.raises(ValueError, match="^tls_key: give"):
        kubellm.serve("/nonexistent", tls_cert=str(cert))
    with pytest.raises(ValueError, match="^tls_cert .*nope: cannot be read"):
        kubellm.serve("/nonexistent", tls_cert=str(tmp_path / "nope"), tls_key=str(key_file))


def test_serve_file_refuses_a_manifest_whose_secrets_it_cannot_read(cache, tmp_path, monkeypatch):
    import yaml

    manifest = tmp_path / "deploy.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "LLMDeployment", "metadata": {"name": "locked"}, "spec": {
        "model": {"source": "/nonexistent"}, "restApi": {"enabled": True, "apiKeySecret": "llm-keys"},
        "router": {"tlsSecretName": "llm-tls"}}}))
    out = _cli("serve", "-f", str(manifest), timeout=60)
    assert out.returncode == 2
    assert (f"kubellm: error: {manifest}: spec.restApi.apiKeySecret (llm-keys) is a Kubernetes Secret, which a "
            "local deployment cannot read: give --api-key KEY or set KUBELLM_API_KEY") in out.stderr
    out = _cli("serve", "-f", str(manifest), "--api-key", KEY, timeout=60)
    assert out.returncode == 2 and "spec.router.tlsSecretName (llm-tls)" in out.stderr
    assert "give --tls-cert FILE --tls-key FILE" in out.stderr
