"""LoRA adapters through a real `kubellm worker --lora NAME=DIR` process over gRPC: ModelInfo lists them, a
request naming one (the Python client's adapter=, GenerateRequest.adapter) gets that adapter's tokens, unary and
streamed alike, one naming none the base model's, an unknown one is refused by name; and /metrics exports vLLM's
vllm:lora_requests_info (running and waiting adapters, max_lora, the time published) and kubellm's requests per
adapter. The adapters are peft's own files (tests/lora_adapters.py); their parity with peft is
tests/runtime/executor/test_lora.py's."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest
from lora_adapters import make_adapter

from kubellm.runtime.serving.client import Client, ClientError
from processes import free_port, wait_serving

pytestmark = pytest.mark.multiprocess

PROMPTS = ["Hello, world!", "The capital of France is"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"sql": make_adapter(tiny_llama, root / "sql", rank=4, seed=1),
            "chat": make_adapter(tiny_llama, root / "chat", rank=8, seed=2, targets=("q_proj", "v_proj"))}


def start_worker(procs, model, tmp_path, adapters: dict, **engine) -> tuple[str, str]:
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"num_kv_blocks": 512, "block_size": 4, "device": "cpu", "dtype": "float32",
                                  **engine}))
    port, metrics_port = free_port(), free_port()
    flags = [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]
    procs("worker", "--model", str(model), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
          "--metrics-port", str(metrics_port), "--max-lora-rank", "8", *flags)
    address = f"127.0.0.1:{port}"
    wait_serving(address, timeout=180)
    return address, f"http://127.0.0.1:{metrics_port}/metrics"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def lora_info(text: str) -> list[tuple[dict, float]]:
    """vllm:lora_requests_info's samples: (labels, value)."""
    samples = []
    for labels, value in re.findall(r'^vllm:lora_requests_info\{(.*)\} (\S+)$', text, re.M):
        samples.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return samples


def greedy(client: Client, **options) -> list[list[int]]:
    return [r.token_ids for r in client.generate(PROMPTS, max_new_tokens=12, ignore_eos=True, **options)]


def streamed(client: Client, **options) -> list[list[int]]:
    tokens: dict[int, list[int]] = {}
    for delta in client.stream(PROMPTS, max_new_tokens=12, ignore_eos=True, **options):
        tokens.setdefault(delta.index, []).extend(delta.token_ids)
    return [tokens[i] for i in sorted(tokens)]


def test_requests_name_their_adapter_over_grpc(procs, tiny_llama, tmp_path, adapters):
    started = time.time()
    address, metrics = start_worker(procs, tiny_llama, tmp_path, adapters)
    with Client(address, timeout=60) as client:
        assert client.model_info().adapters == ["chat", "sql"]
        base, sql, chat = greedy(client), greedy(client, adapter="sql"), greedy(client, adapter="chat")
        assert sql != base and chat != base and sql != chat   # each adapter changes the tokens its own way
        assert greedy(client, adapter=None) == base           # none: the base model
        # streamed as unary, per adapter
        assert streamed(client, adapter="sql") == sql and streamed(client) == base
        for call in (greedy, streamed):   # an adapter the worker does not serve: refused by name, both paths
            with pytest.raises(ClientError) as err:
                call(client, adapter="nope")
            assert err.value.code == "INVALID_ARGUMENT"
            assert "adapter: 'nope' is not served here (adapters: chat, sql)" in err.value.message
        with pytest.raises(ValueError, match="adapter: expected the name"):
            client.generate("x", adapter="")

    text = scrape(metrics)
    [(labels, value)] = lora_info(text)
    assert labels == {"max_lora": "2", "waiting_lora_adapters": "", "running_lora_adapters": ""}
    assert started <= value <= time.time()   # when the engine last published its state (wall clock, as vLLM)
    # requests admitted per adapter: sql 2 calls x 2 prompts, chat 1 x 2; the refused ones never reached the engine
    assert 'kubellm_lora_requests_total{adapter="sql"} 4' in text
    assert 'kubellm_lora_requests_total{adapter="chat"} 2' in text


def test_lora_requests_info_shows_the_running_and_the_waiting_adapters(procs, tiny_llama, tmp_path, adapters):
    # One sequence at a time: a second request waits while the first runs.
    address, metrics = start_worker(procs, tiny_llama, tmp_path, adapters, max_batch_size=1)
    with Client(address, timeout=120) as first, Client(address, timeout=120) as second:
        running = first.stream("Once upon a time", max_new_tokens=400, ignore_eos=True, adapter="sql")
        next(running)   # the sql request is running
        waiting = threading.Thread(target=lambda: second.generate("Hi", max_new_tokens=4, adapter="chat"))
        waiting.start()
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            [(labels, _)] = lora_info(scrape(metrics))
            seen.append((labels["running_lora_adapters"], labels["waiting_lora_adapters"]))
            if seen[-1] == ("sql", "chat"):
                break
            time.sleep(0.02)
        assert seen[-1] == ("sql", "chat"), seen
        running.close()   # cancels the stream: the chat request runs, then nothing does
        waiting.join(60)
    deadline = time.monotonic() + 10
    while lora_info(scrape(metrics))[0][0]["running_lora_adapters"] and time.monotonic() < deadline:
        time.sleep(0.05)
    [(labels, _)] = lora_info(scrape(metrics))
    assert (labels["running_lora_adapters"], labels["waiting_lora_adapters"]) == ("", "")


def test_a_worker_without_adapters_exports_no_lora_info(procs, tiny_llama, tmp_path):
    address, metrics = start_worker(procs, tiny_llama, tmp_path, {})
    with Client(address, timeout=60) as client:
        assert client.model_info().adapters == []
        with pytest.raises(ClientError, match=r"adapter: 'sql' is not served here \(adapters: none\)"):
            client.generate("Hi", max_new_tokens=2, adapter="sql")
    text = scrape(metrics)
    assert "vllm:lora_requests_info" not in text and "kubellm_lora_requests_total" not in text
