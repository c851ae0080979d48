"""LoRA adapters in local deployments (real processes): `kubellm.serve(model, adapters={name: source})` and
`kubellm serve MODEL --lora NAME=SOURCE` hand every worker its `--lora` flags; a source is a directory or an
hf:// repository (here: e2e/hf_mirror.py serving a peft adapter), which each worker downloads into the cache
while it loads. The client's adapter= picks one; a manifest's spec.adapters run locally too, except pvc://."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lora_adapters import make_adapter

ROOT = Path(__file__).resolve().parents[3]

from e2e.hf_mirror import HFMirror  # noqa: E402

pytestmark = pytest.mark.multiprocess

ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 128, "block_size": 4, "max_batch_size": 4}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"sql": make_adapter(tiny_llama, root / "sql", rank=4, seed=1),
            "chat": make_adapter(tiny_llama, root / "chat", rank=4, seed=2)}


def tokens(client, **options) -> list[int]:
    return client.generate(PROMPT, max_new_tokens=10, ignore_eos=True, **options)[0].token_ids


def test_serve_with_a_directory_and_an_hf_adapter(tiny_llama, adapters, cache, tmp_path, monkeypatch):
    import kubellm
    from kubellm.runtime.local import deployments

    with HFMirror(adapters["chat"], "org/chat-lora") as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)          # the workers inherit it
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        # Two workers share the cache: one downloads the hf:// adapter while the other waits for it.
        c = kubellm.serve(str(tiny_llama), deployment_name="lora", replica_num=2,
                          adapters={"sql": str(adapters["sql"]), "chat": "hf://org/chat-lora"}, **ENGINE)
        try:
            assert c.model_info().adapters == ["chat", "sql"]
            base, sql, chat = tokens(c), tokens(c, adapter="sql"), tokens(c, adapter="chat")
            assert len({tuple(base), tuple(sql), tuple(chat)}) == 3
            assert [tokens(c, adapter="chat") for _ in range(2)] == [chat, chat]   # the other replica: the same
            deltas = [d.token_ids for d in c.stream(PROMPT, max_new_tokens=10, ignore_eos=True, adapter="chat")]
            assert sum(deltas, []) == chat
            # the worker downloaded the hf:// adapter into the deployment's cache, byte for byte
            downloaded = Path(os.environ["KUBELLM_CACHE"]) / "adapters" / "hf" / "org" / "chat-lora"
            assert (downloaded / "adapter_model.safetensors").read_bytes() == \
                (adapters["chat"] / "adapter_model.safetensors").read_bytes()
            entry = json.loads((deployments.registry_dir() / "lora.json").read_text())
            assert entry["adapters"] == {"sql": str(adapters["sql"]), "chat": "hf://org/chat-lora"}
            for i in (0, 1):
                assert "LoRA adapters: sql" in (Path(entry["log_dir"]) / f"worker-{i}.log").read_text()
            fetched = [path for method, path, _ in mirror.requests if method == "GET" and "/resolve/" in path]
            assert len([p for p in fetched if p.endswith("adapter_model.safetensors")]) == 1   # downloaded once
        finally:
            c.terminate_server()


def test_kubellm_serve_lora_flag_and_a_manifests_adapters(tiny_llama, adapters, cache, tmp_path):
    import kubellm

    manifest = tmp_path / "llm.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "from-file"},
        "spec": {"model": {"source": str(tiny_llama)}, "device": "cpu",
                 "engine": {"dtype": "float32", "maxLoraRank": 8},
                 "adapters": [{"name": "sql", "source": str(adapters["sql"])}]}}))
    run = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "serve", "-f", str(manifest),
                          "--lora", f"chat={adapters['chat']}", "--num-kv-blocks", "128", "--block-size", "4"],
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert run.returncode == 0, run.stderr
    c = kubellm.client("from-file")
    try:
        assert c.model_info().adapters == ["chat", "sql"]   # the manifest's and the flag's
        assert tokens(c, adapter="sql") != tokens(c)
        assert c.entry["engine"]["max_lora_rank"] == 8
    finally:
        c.terminate_server()


def test_bad_adapters_fail_before_anything_starts(tiny_llama, cache, tmp_path):
    import kubellm
    from kubellm.runtime.local import deployments

    with pytest.raises(ValueError, match=r"adapters: adapter 'sql': '/nonexistent' is not a directory"):
        kubellm.serve(str(tiny_llama), deployment_name="bad", adapters={"sql": "/nonexistent"}, **ENGINE)
    with pytest.raises(ValueError, match="adapters: adapter name 'a,b'"):
        kubellm.serve(str(tiny_llama), deployment_name="bad", adapters={"a,b": str(tmp_path)}, **ENGINE)
    assert deployments.list_deployments() == []   # nothing was started or registered
    manifest = tmp_path / "llm.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "LLMDeployment", "metadata": {"name": "x"}, "spec": {
        "model": {"source": str(tiny_llama)}, "adapters": [{"name": "sql", "source": "pvc://loras/sql"}]}}))
    run = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "serve", "-f", str(manifest)],
                         capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert run.returncode == 2 and "spec.adapters[0].source 'pvc://loras/sql' is a PersistentVolumeClaim" in run.stderr
