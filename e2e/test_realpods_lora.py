"""LoRA adapters on the real-pod tier: an LLMDeployment of a tiny Llama on a PersistentVolumeClaim (a static
hostPath volume on the node) with two `spec.adapters`: one `hf://` adapter on a local Hugging Face mirror (a test
fixture on the node IP, checking the token of the Secret that `model.tokenSecret` names: allowed there for the
adapter's sake alone), one on the model's own claim. A two-stage pipeline group (two pods): each rank's
`download-adapter-0` init container fetches the hf:// adapter, each worker runs with both `--lora` flags, and
through the router's Service a request naming an adapter gets the tokens the local engine gives for it (each
other than the base model's, which match too); the leader's /metrics has vllm:lora_requests_info. Shares
test_realpods.py's release (its module fixture, set up again for this module)."""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_realpods import FIGURES, NS, apply, get, port_forward, release, wait_ready  # noqa: F401 - fixtures

pytestmark = [pytest.mark.e2e, pytest.mark.realpods]

PROMPTS = ["The capital of France is", "Kubernetes schedules pods"]
SECRET, TOKEN = "lora-hf-token", "hf_lora_e2e_token_checked_by_the_mirror"
PV, CLAIM = "kubellm-e2e-lora-models", "lora-models"


@pytest.fixture(scope="module")
def adapter(release, tmp_path_factory):
    """The tiny model and its `chat` adapter on a claim (a hostPath PersistentVolume readable by the pods' uid),
    the `sql` adapter on the mirror; with the local engine's greedy tokens for the base model and each adapter."""
    from lora_adapters import make_adapter
    from tiny_models import make_checkpoint

    import kubellm

    c = release
    volume = Path(tempfile.mkdtemp(prefix="kubellm-lora-pv-", dir="/tmp"))
    model = make_checkpoint(volume / "tiny", "llama")
    chat = make_adapter(model, volume / "chat-lora", rank=8, seed=4, targets=("q_proj", "v_proj"))
    sql = make_adapter(model, tmp_path_factory.mktemp("lora") / "sql-lora", rank=4, seed=3)
    for path in (volume, *volume.rglob("*")):   # the pods run as uid 1000
        path.chmod(0o755 if path.is_dir() else 0o644)
    pipe = kubellm.pipeline(str(model), device="cpu", dtype="float32", adapters={"sql": str(sql), "chat": str(chat)})
    want = {name: [r.token_ids for r in pipe(PROMPTS, max_new_tokens=12, temperature=0.0, adapter=name)]
            for name in (None, "sql", "chat")}
    pipe.destroy()
    assert len({str(tokens) for tokens in want.values()}) == 3, want
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": PV},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(volume), "type": "Directory"},
                  "claimRef": {"namespace": NS, "name": CLAIM}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM, "namespace": NS},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": PV,
                  "resources": {"requests": {"storage": "1Gi"}}}}]))
    e2e_cluster = sys.modules["kubellm_e2e_cluster"]  # loaded by conftest.py
    mirror_mod, node_ip = e2e_cluster.sibling("hf_mirror"), e2e_cluster.sibling("node").NODE_IP
    c.kubectl("delete", "secret", SECRET, "-n", NS, "--ignore-not-found")
    c.kubectl("create", "secret", "generic", SECRET, "-n", NS, f"--from-literal=HF_TOKEN={TOKEN}")
    try:
        with mirror_mod.HFMirror(sql, "kubellm-e2e/sql-lora", token=TOKEN, host=node_ip) as mirror:
            yield {"mirror": mirror, "want": want}
    finally:
        c.kubectl("delete", "pvc", CLAIM, "-n", NS, "--ignore-not-found", "--wait=false", check=False)
        c.kubectl("delete", "pv", PV, "--ignore-not-found", "--wait=false", check=False)
        shutil.rmtree(volume, ignore_errors=True)


def test_an_hf_adapter_is_fetched_by_every_rank_and_served_by_name(release, adapter):
    c, mirror = release, adapter["mirror"]
    t0 = time.monotonic()
    apply(c, {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "lora"},
              "spec": {"model": {"source": f"pvc://{CLAIM}/tiny", "endpoint": mirror.url, "tokenSecret": SECRET},
                       "adapters": [{"name": "sql", "source": "hf://kubellm-e2e/sql-lora"},
                                    {"name": "chat", "source": f"pvc://{CLAIM}/chat-lora"}],
                       "device": "cpu", "replicas": 1, "pipelineParallel": 2, "gpusPerPod": 1,
                       "engine": {"dtype": "float32", "maxBatchSize": 4, "kvCacheFraction": 0.1, "maxLoraRank": 8},
                       "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}}})
    try:
        wait_ready(c, "lora", timeout=600)
        FIGURES["lora_apply_to_ready_s"] = round(time.monotonic() - t0, 1)
        for pod in ("lora-g0-0", "lora-g0-1"):   # every rank downloads the adapter and serves it
            log = c.kubectl("logs", "-n", NS, pod, "-c", "download-adapter-0").stdout
            assert "downloaded kubellm-e2e/sql-lora" in log or "already holds a complete adapter" in log, log
            command = get(c, "pod", pod)["spec"]["containers"][0]["command"]
            flags = [command[i + 1] for i, word in enumerate(command) if word == "--lora"]
            assert flags == ["sql=/adapters/hf/kubellm-e2e/sql-lora", "chat=/models/chat-lora"], command
        assert mirror.requests and all(authorized for _, _, authorized in mirror.requests), mirror.requests

        from kubellm.runtime.serving.client import Client

        with port_forward(c, "svc/lora", 50051) as ports, Client(f"127.0.0.1:{ports[50051]}", timeout=60) as client:
            assert client.model_info().adapters == ["chat", "sql"]
            for name in (None, "sql", "chat"):
                got = [client.generate(p, max_new_tokens=12, temperature=0.0, adapter=name)[0].token_ids
                       for p in PROMPTS]
                assert got == adapter["want"][name], (name, got, adapter["want"][name])
        with port_forward(c, "pod/lora-g0-0", 9090) as ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[9090]}/metrics", timeout=10) as reply:
                text = reply.read().decode()
        assert re.search(r'^vllm:lora_requests_info\{max_lora="2",waiting_lora_adapters="",'
                         r'running_lora_adapters=""\} \d', text, re.M), text[-2000:]
        assert 'kubellm_lora_requests_total{adapter="sql"} 2' in text
        print(f"\nLoRA deployment (2 pipeline stages, an hf:// and a pvc:// adapter) Ready {FIGURES['lora_apply_to_ready_s']} s "
              "after kubectl apply")
    finally:
        c.kubectl("delete", "llmd", "lora", "-n", NS, "--wait=false", check=False)
