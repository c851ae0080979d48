"""The Prometheus metrics of a worker and of a router, written with `kubellm.metrics` (no torch).

    metrics = WorkerMetrics()
    metrics.request_done("OK"); metrics.observe_ttft(0.05)
    server = metrics.serve(9090)      # GET /metrics in a daemon thread; server.shutdown() stops it
    print(metrics.render())
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer

from kubellm.metrics import Registry, serve_metrics

PREFIX = "kubellm_"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class WorkerMetrics:
    """Requests, tokens, engine state, time to first token and per output token of one worker;
    every method is thread-safe."""

    def __init__(self):
        p, r = PREFIX, Registry()
        self.registry = r
        self._requests = r.counter(f"{p}requests_total", "Finished requests by gRPC status code.", ("code",))
        self._prompt_tokens = r.counter(f"{p}prompt_tokens_total", "Prompt tokens admitted.")
        self._generation_tokens = r.counter(f"{p}generation_tokens_total", "Tokens generated.")
        self._running = r.gauge(f"{p}running", "Sequences running in the engine.")
        self._waiting = r.gauge(f"{p}waiting", "Sequences waiting for the engine.")
        self._kv_cache_usage = r.gauge(f"{p}kv_cache_usage", "Share of KV-cache blocks in use (0..1).")
        self.ttft = r.histogram(f"{p}time_to_first_token_seconds", "Time from request arrival to its first token.",
                                TTFT_BUCKETS)
        self.tpot = r.histogram(f"{p}time_per_output_token_seconds", "Mean time between output tokens of a request.",
                                TPOT_BUCKETS)

    # -- updates --------------------------------------------------------------------------------
    def request_done(self, code: str) -> None:
        self._requests.inc(code)

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self._prompt_tokens.inc(amount=prompt)
        if generated:
            self._generation_tokens.inc(amount=generated)

    def set_engine_state(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_cache_usage.set(kv_cache_usage)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    # -- reading ----------------------------------------------------------------------------------
    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens.value()

    @property
    def generation_tokens(self) -> int:
        return self._generation_tokens.value()

    def render(self) -> str:
        return self.registry.render()

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        """Serve GET /metrics on `port` (0 picks a free one: see `server.server_port`) in a daemon thread."""
        return serve_metrics(self.render, port, host)


class RouterMetrics:
    """Requests per replica and code, retries, healthy replicas and latency of a router."""

    def __init__(self):
        r = Registry()
        self.registry = r
        self.replicas: dict[str, bool] = {}   # address -> healthy: the router keeps it current
        self._requests = r.counter("kubellm_router_requests_total",
                                   "Requests forwarded, by replica, method and status code.",
                                   ("replica", "method", "code"))
        self._retries = r.counter("kubellm_router_retries_total", "Requests sent again to another replica.",
                                  ("method",))
        r.gauge("kubellm_router_replicas", "Known replica leaders.", function=lambda: len(self.replicas))
        r.gauge("kubellm_router_healthy_replicas", "Replica leaders answering SERVING.",
                function=lambda: sum(self.replicas.values()))
        r.gauge("kubellm_router_replica_healthy", "1 if the replica is SERVING.", ("replica",),
                function=lambda: {(address,): int(ok) for address, ok in list(self.replicas.items())})
        self.latency = r.histogram("kubellm_router_request_duration_seconds",
                                   "Time from request to last response byte.", LATENCY_BUCKETS, ("method",))

    def request(self, replica: str, method: str, code) -> None:
        """`code`: a grpc.StatusCode (its name is the label)."""
        self._requests.inc(replica, method, code.name)

    def retry(self, method: str) -> None:
        self._retries.inc(method)

    def observe(self, method: str, seconds: float) -> None:
        self.latency.observe(seconds, method)

    def render(self) -> str:
        return self.registry.render()
