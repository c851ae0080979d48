"""A real worker's /metrics over HTTP: vLLM's vllm:* set (names, types, labels, bucket bounds as vLLM v1's
vllm/v1/metrics/loggers.py) and the model load time, moving with the load put on the worker."""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")

from kubellm.metrics import parse  # noqa: E402
from kubellm.runtime.serving import worker as worker_module  # noqa: E402
from kubellm.runtime.serving.client import Client  # noqa: E402
from kubellm.runtime.serving.metrics import build_1_2_5_buckets  # noqa: E402
from kubellm.runtime.serving.worker import WorkerServer  # noqa: E402

BS = 4
ENGINE = {"num_kv_blocks": 128, "block_size": BS, "max_batch_size": 2, "session_len": 256, "device": "cpu"}
SERVED = "tiny-demo"
LABELS = f'model_name="{SERVED}",engine="0"'
STEP_SECONDS = 0.01   # each engine step is held this long, so that a scrape sees requests in flight

# vLLM v1's metrics and their types (vllm/v1/metrics/loggers.py, PrometheusStatLogger).
VLLM_TYPES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prompt_tokens_total": "counter", "vllm:generation_tokens_total": "counter",
    "vllm:request_success_total": "counter", "vllm:prefix_cache_queries_total": "counter",
    "vllm:prefix_cache_hits_total": "counter", "vllm:num_preemptions_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram", "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}
# Their bucket bounds, as vLLM writes them (so its dashboards' quantiles mean the same here).
VLLM_BOUNDS = {
    "vllm:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    "vllm:inter_token_latency_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                                         7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:e2e_request_latency_seconds": [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                                         60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0],
    "vllm:request_prompt_tokens": [1, 2, 5, 10, 20, 50, 100, 200],   # build_1_2_5_buckets(max_model_len=256)
}
REQUEST_HISTOGRAMS = ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                      "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
                      "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens",
                      "vllm:request_generation_tokens")


@pytest.mark.parametrize("max_value, buckets", [(1, [1]), (4, [1, 2]), (100, [1, 2, 5, 10, 20, 50, 100]),
                                                (2048, [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000])])
def test_token_buckets_are_vllms_1_2_5(max_value, buckets):
    assert list(build_1_2_5_buckets(max_value)) == buckets


def _slow_steps(engine):
    execute = engine.executor.execute

    def held(batch, sampling):
        time.sleep(STEP_SECONDS)
        return execute(batch, sampling)
    engine.executor.execute = held


@pytest.fixture(scope="module")
def worker(tiny_llama):
    server = WorkerServer(tiny_llama, ENGINE, metrics_port=0, served_model_name=SERVED).start().wait_ready()
    server.call_engine(_slow_steps)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(worker):
    with Client(worker.address, timeout=60) as c:
        yield c


def scrape(worker) -> tuple[str, dict[str, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).read().decode()
    return text, parse(text)


def v(samples: dict[str, float], name: str, **extra: str) -> float:
    labels = LABELS + "".join(f',{k}="{val}"' for k, val in extra.items())
    return samples[f"{name}{{{labels}}}"]


def sample_while(worker, busy: threading.Thread, every: float = 0.005) -> list[dict[str, float]]:
    """Scrapes taken while `busy` runs (the requests it sends are in flight)."""
    samples = []
    while busy.is_alive():
        samples.append(scrape(worker)[1])
        time.sleep(every)
    return samples


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def unique_ids(start: int, n: int) -> list[int]:
    """Token ids no other test's prompt starts with (prefix-cache counts stay exact)."""
    return [start + i % 40 for i in range(n)]


@pytest.mark.multiprocess
def test_every_vllm_metric_has_its_type_labels_and_bounds(worker, client):
    client.generate([[5, 6, 7, 8, 9]], max_new_tokens=3, ignore_eos=True)
    text, samples = scrape(worker)
    for name, kind in VLLM_TYPES.items():
        assert f"# TYPE {name} {kind}" in text, name
        lines = [line for line in text.splitlines() if re.match(rf"{re.escape(name)}(_bucket|_sum|_count)?{{", line)]
        assert lines, f"{name} has no samples"
        for line in lines:
            if name == "vllm:cache_config_info":   # as vLLM: the CacheConfig's fields and the engine, no model
                num_blocks = worker.call_engine(lambda e: e.block_manager.num_blocks)
                assert line == (f'vllm:cache_config_info{{block_size="{BS}",num_gpu_blocks="{num_blocks}",'
                                'enable_prefix_caching="True",engine="0"} 1')
            else:
                assert line.startswith(f"{line.split('{')[0]}{{{LABELS}"), line
    for name, bounds in VLLM_BOUNDS.items():
        got = [float(le) for le in re.findall(rf'{re.escape(name)}_bucket{{{LABELS},le="([^"+]+)"}}', text)]
        assert got == bounds, name
    assert v(samples, "vllm:request_success_total", finished_reason="length") >= 1


@pytest.mark.multiprocess
def test_running_and_waiting_follow_the_queue(worker, client):
    """max_batch_size 2 and five requests at once: two run, the others wait, and both gauges say so."""
    def five():
        threads = [in_thread(lambda: client.generate([[11, 12, 13]], max_new_tokens=24, ignore_eos=True))
                   for _ in range(5)]
        for t in threads:
            t.join()
    samples = sample_while(worker, in_thread(five))
    running = [v(s, "vllm:num_requests_running") for s in samples]
    waiting = [v(s, "vllm:num_requests_waiting") for s in samples]
    assert max(running) == 2 and max(waiting) >= 2, (running, waiting)
    for s in samples:   # one published state: the vllm: gauges and kubellm_'s agree in every scrape
        assert v(s, "vllm:num_requests_running") == s["kubellm_running"]
        assert v(s, "vllm:num_requests_waiting") == s["kubellm_waiting"]
        assert v(s, "vllm:kv_cache_usage_perc") == s["kubellm_kv_cache_usage"]
    _, after = scrape(worker)
    assert v(after, "vllm:num_requests_running") == v(after, "vllm:num_requests_waiting") == 0


@pytest.mark.multiprocess
def test_kv_cache_usage_rises_with_the_context(worker, client):
    peaks = {}
    for name, length in (("short", 4), ("long", 160)):
        prompt = unique_ids(300 if name == "short" else 340, length)
        busy = in_thread(lambda prompt=prompt: client.generate([prompt], max_new_tokens=16, ignore_eos=True))
        usage = [v(s, "vllm:kv_cache_usage_perc") for s in sample_while(worker, busy) if
                 v(s, "vllm:num_requests_running") == 1]
        assert usage, f"no scrape saw the {name} request running"
        peaks[name] = max(usage)
    num_blocks = ENGINE["num_kv_blocks"]
    assert peaks["short"] <= -(-(4 + 16) // BS) / num_blocks
    assert peaks["long"] >= (160 // BS) / num_blocks > peaks["short"]
    assert v(scrape(worker)[1], "vllm:kv_cache_usage_perc") == 0   # freed again


@pytest.mark.multiprocess
def test_prefix_cache_hits_when_the_same_prompt_comes_again(worker, client):
    prompt = unique_ids(200, 41)
    deltas = []
    for _ in range(2):
        _, before = scrape(worker)
        client.generate([prompt], max_new_tokens=2, ignore_eos=True)
        _, after = scrape(worker)
        deltas.append({k: v(after, k) - v(before, k) for k in ("vllm:prefix_cache_queries_total",
                                                               "vllm:prefix_cache_hits_total")})
    assert [d["vllm:prefix_cache_queries_total"] for d in deltas] == [41, 41]   # tokens, as vLLM counts
    # The second time every full block is found, except that the last token is always computed again.
    assert [d["vllm:prefix_cache_hits_total"] for d in deltas] == [0, (41 - 1) // BS * BS]


@pytest.mark.multiprocess
def test_requests_counted_by_finished_reason_and_histograms_by_request(worker, client):
    [probe] = client.generate([[21, 22, 23]], max_new_tokens=12, ignore_eos=True)
    stop_word = probe.text[len(probe.text) // 2:][:3]
    assert stop_word.strip(), f"the tiny model's text has no stop word to pick: {probe.text!r}"
    _, before = scrape(worker)
    lengths = client.generate([[31, 32, 33], [41, 42, 43, 44]], max_new_tokens=5, ignore_eos=True)
    [stopped] = client.generate([[21, 22, 23]], max_new_tokens=12, ignore_eos=True, stop_words=[stop_word])
    assert [r.finish_reason for r in lengths + [stopped]] == ["length", "length", "stop"]
    _, served = scrape(worker)
    for d in (before, served):
        d.update({f"{reason}": v(d, "vllm:request_success_total", finished_reason=reason)
                  for reason in ("stop", "length", "abort", "error")})
    assert (served["length"] - before["length"], served["stop"] - before["stop"]) == (2, 1)
    for name in REQUEST_HISTOGRAMS + ("vllm:time_to_first_token_seconds",):   # one observation per request served
        assert v(served, f"{name}_count") - v(before, f"{name}_count") == 3, name
    assert v(served, "vllm:prompt_tokens_total") - v(before, "vllm:prompt_tokens_total") == 3 + 4 + 3
    generated = sum(r.generated_length for r in lengths + [stopped])
    assert v(served, "vllm:generation_tokens_total") - v(before, "vllm:generation_tokens_total") == generated
    assert v(served, "vllm:request_generation_tokens_sum") - v(before, "vllm:request_generation_tokens_sum") == generated
    # Each request's gaps between tokens: generated - 1 of them.
    itl = v(served, "vllm:inter_token_latency_seconds_count") - v(before, "vllm:inter_token_latency_seconds_count")
    assert itl == generated - 3
    assert v(served, "vllm:inter_token_latency_seconds_sum") > v(before, "vllm:inter_token_latency_seconds_sum")

    # A stream its client walks away from is aborted: counted as such, not as served.
    stream = client.stream([[51, 52, 53]], max_new_tokens=200, ignore_eos=True)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    while v(scrape(worker)[1], "vllm:request_success_total", finished_reason="abort") == served["abort"]:
        assert time.monotonic() < deadline, "the cancelled stream was never counted as aborted"
        time.sleep(0.02)
    _, last = scrape(worker)
    assert v(last, "vllm:request_success_total", finished_reason="abort") == served["abort"] + 1
    assert v(last, "vllm:e2e_request_latency_seconds_count") == v(served, "vllm:e2e_request_latency_seconds_count")


@pytest.mark.multiprocess
def test_model_load_time_by_phase(worker):
    _, samples = scrape(worker)
    total = samples["kubellm_model_load_seconds"]
    phases = {p: samples[f'kubellm_model_load_phase_seconds{{phase="{p}"}}'] for p in ("download", "weights", "warmup")}
    assert total > 0 and phases["weights"] > 0 and all(s >= 0 for s in phases.values())
    assert max(phases.values()) <= sum(phases.values()) <= total


@pytest.mark.multiprocess
def test_a_slow_load_is_a_warning_naming_its_slowest_phase(tiny_llama, caplog, monkeypatch):
    monkeypatch.setattr(worker_module, "SLOW_LOAD_SECONDS", 0.0)   # every load is "slow" now
    with caplog.at_level(logging.INFO, logger="kubellm.worker"):
        server = WorkerServer(tiny_llama, {**ENGINE, "num_kv_blocks": 16}).start().wait_ready()
        server.stop()
    [info] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "loaded in" in r.getMessage()]
    assert re.search(r"loaded in [\d.]+ s \(download [\d.]+ s, weights [\d.]+ s, warmup [\d.]+ s\)", info), info
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    samples = parse(server.metrics.render())
    phases = {p: samples[f'kubellm_model_load_phase_seconds{{phase="{p}"}}'] for p in ("download", "weights", "warmup")}
    assert f"most of it in {max(phases, key=phases.get)}" in warning, warning
