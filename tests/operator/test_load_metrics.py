"""The leader's load phases read over real HTTP from kubellm.metrics' /metrics server (what workers serve on
their metrics port): operator/load_metrics.py is bounded by its timeout and never raises."""

import time

import pytest

from kubellm.metrics import Registry, serve_metrics
from kubellm.operator.load_metrics import parse_load_phases, read_load_phases
from processes import free_port

EXPOSITION = """# TYPE kubellm_model_load_phase_seconds gauge
kubellm_model_load_phase_seconds{model_name="llama",phase="download"} 0.25
kubellm_model_load_phase_seconds{model_name="llama",phase="weights"} 12.5
kubellm_model_load_phase_seconds{phase="warmup",model_name="llama"} 3e0
kubellm_model_load_phase_seconds{model_name="llama",phase="other"} 9
kubellm_model_load_seconds{model_name="llama"} 15.75
vllm:num_requests_running{model_name="llama"} 0
"""
POD = {"status": {"podIP": "127.0.0.1"}}


def test_parse_load_phases():
    assert parse_load_phases(EXPOSITION) == {"download": 0.25, "weights": 12.5, "warmup": 3.0, "total": 15.75}
    assert parse_load_phases("kubellm_model_load_seconds 4\n") == {}   # no phases: nothing to say


@pytest.fixture
def worker_metrics():
    """A /metrics server as a worker runs it, with the load gauges labelled as the worker labels them."""
    registry = Registry()
    gauge = registry.gauge("kubellm_model_load_phase_seconds", "Seconds each load phase took.", ("model_name", "phase"))
    for phase, seconds in (("download", 0.0), ("weights", 7.5), ("warmup", 1.25)):
        gauge.set(seconds, "llama", phase)
    registry.gauge("kubellm_model_load_seconds", "Seconds of the whole load.").set(8.75)
    state = {"render": registry.render, "delay": 0.0}

    def render():
        time.sleep(state["delay"])
        return state["render"]()

    server = serve_metrics(render, free_port(), host="127.0.0.1")
    yield server.server_port, state
    server.shutdown()
    server.server_close()


def test_reads_the_phases_from_the_pods_metrics_port(worker_metrics):
    port, _ = worker_metrics
    assert read_load_phases(POD, port=port) == ({"download": 0.0, "weights": 7.5, "warmup": 1.25, "total": 8.75}, "")


def test_a_slow_silent_or_absent_endpoint_only_means_no_phases(worker_metrics):
    port, state = worker_metrics
    state["delay"] = 2.0
    started = time.monotonic()
    phases, why = read_load_phases(POD, port=port, timeout=0.3)
    assert phases == {} and "timed out" in why and time.monotonic() - started < 1.5
    state["delay"], state["render"] = 0.0, lambda: "vllm:num_requests_running 0\n"
    assert read_load_phases(POD, port=port) == (
        {}, f"http://127.0.0.1:{port}/metrics has no kubellm_model_load_phase_seconds")
    phases, why = read_load_phases(POD, port=free_port())
    assert phases == {} and "refused" in why.lower()
    assert read_load_phases({"status": {}}) == ({}, "the pod has no IP")


def test_parses_what_the_worker_writes():
    """The worker's own metrics (serving/metrics.py) under the names the operator reads: they cannot drift apart."""
    from kubellm.runtime.serving.metrics import WorkerMetrics

    metrics = WorkerMetrics("smollm2")
    metrics.set_load_times(4.25, {"download": 0.0, "weights": 3.2, "warmup": 1.05})
    assert parse_load_phases(metrics.render()) == {"download": 0.0, "weights": 3.2, "warmup": 1.05, "total": 4.25}
