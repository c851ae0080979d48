"""Prometheus metrics of a worker, in the text exposition format (no extra dependency).

    metrics = WorkerMetrics()
    metrics.request_done("OK"); metrics.observe_ttft(0.05)
    server = metrics.serve(9090)      # GET /metrics in a daemon thread; server.shutdown() stops it
    print(metrics.render())
"""

from __future__ import annotations

import math
import threading
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "kubellm_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_fmt(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_fmt(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class WorkerMetrics:
    """Counters, gauges and histograms of one worker; every method is thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}   # gRPC status code name -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    # -- updates --------------------------------------------------------------------------------
    def request_done(self, code: str) -> None:
        with self._lock:
            self.requests[code] = self.requests.get(code, 0) + 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def set_engine_state(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        with self._lock:
            self.running, self.waiting, self.kv_cache_usage = running, waiting, kv_cache_usage

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        with self._lock:
            self.tpot.observe(seconds)

    # -- exposition -----------------------------------------------------------------------------
    def render(self) -> str:
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}requests_total Finished requests by gRPC status code.",
                     f"# TYPE {p}requests_total counter"]
            lines += [f'{p}requests_total{{code="{_escape(code)}"}} {n}' for code, n in sorted(self.requests.items())]
            for name, help_, value in (
                    ("prompt_tokens_total", "Prompt tokens admitted.", self.prompt_tokens),
                    ("generation_tokens_total", "Tokens generated.", self.generation_tokens)):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} counter", f"{p}{name} {_fmt(value)}"]
            for name, help_, value in (
                    ("running", "Sequences running in the engine.", self.running),
                    ("waiting", "Sequences waiting for the engine.", self.waiting),
                    ("kv_cache_usage", "Share of KV-cache blocks in use (0..1).", self.kv_cache_usage)):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} gauge", f"{p}{name} {_fmt(value)}"]
            for name, help_, hist in (
                    ("time_to_first_token_seconds", "Time from request arrival to its first token.", self.ttft),
                    ("time_per_output_token_seconds", "Mean time between output tokens of a request.", self.tpot)):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram", *hist.lines(p + name)]
        return "\n".join(lines) + "\n"

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        """Serve GET /metrics on `port` (0 picks a free one: see `server.server_port`) in a daemon thread."""
        return serve_metrics(self.render, port, host)


def serve_metrics(render: Callable[[], str], port: int, host: str = "0.0.0.0",
                  thread_name: str = "kubellm-metrics") -> ThreadingHTTPServer:
    """GET /metrics answered with `render()` in a daemon thread (worker and operator alike; no torch)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] not in ("/metrics", "/metrics/"):
                self.send_error(404, "only /metrics is served here")
                return
            body = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: probes and scrapes would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=thread_name, daemon=True).start()
    return server


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition text as {'name{labels}': value} (for tests and the benchmark)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
