"""The Prometheus metrics of a worker and of a router, written with `kubellm.metrics` (no torch).

    metrics = WorkerMetrics(model_name="demo")
    metrics.request_done("OK"); metrics.first_token(0.05, prompt_tokens=12)
    server = metrics.serve(9090)      # GET /metrics in a daemon thread; server.shutdown() stops it
    print(metrics.render())

A worker exports its own `kubellm_*` metrics and, beside them, vLLM's `vllm:*` set (same names, types,
labels and bucket bounds as vLLM v1's PrometheusStatLogger, vllm/v1/metrics/loggers.py), so that
gateways (GIE's endpoint picker), autoscalers and vLLM's Grafana dashboards read a kubellm worker as
they read vLLM. docs/metrics.md lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from kubellm.metrics import Registry, serve_metrics

PREFIX = "kubellm_"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# vLLM's: every vllm:* metric carries the served model's name and the engine index (one engine here).
VLLM_LABELS = ("model_name", "engine")
ENGINE_INDEX = "0"
# vLLM's FINISH_REASON_STRINGS that this engine produces (it has no retryable "error" of its own, so an
# engine step that fails its requests counts them as "error"; it never stops for "repetition").
FINISH_REASONS = ("stop", "length", "abort", "error")
# vLLM's bucket bounds, copied so that its dashboards' quantiles mean the same here.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LOAD_PHASES = ("download", "weights", "warmup")
# vllm:lora_requests_info's labels, in vLLM's order (vllm/v1/metrics/loggers.py); no model_name / engine labels.
LORA_INFO_LABELS = ("max_lora", "waiting_lora_adapters", "running_lora_adapters")


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_value (its max_model_len)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(buckets)
            buckets.append(m * scale)
        scale *= 10


@dataclass(frozen=True)
class EngineState:
    """What the engine thread publishes once per step: one assignment, read at each scrape."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0      # share of KV blocks in use, 0..1
    prefix_queries: int = 0          # prompt tokens looked up in the prefix cache (cumulative)
    prefix_hits: int = 0             # of them, served from it
    preemptions: int = 0             # cumulative
    swapped: int = 0                 # sequences preempted to host memory (eviction='copy'), not yet back
    swapped_out_blocks: int = 0      # KV blocks copied device -> host (cumulative)
    swapped_in_blocks: int = 0       # KV blocks copied host -> device (cumulative)
    swap_fallbacks: int = 0          # eviction='copy' preemptions recomputed: host blocks full (cumulative)
    # LoRA: the adapters named by running / waiting (and swapped-out) sequences, each once, in queue order, and
    # when this state was published (time.time(): vllm:lora_requests_info's value, as vLLM sets it)
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    published: float = 0.0


@dataclass(frozen=True)
class FinishedRequest:
    """One request served to its end, as the engine thread saw it (time.monotonic() seconds)."""

    finish_reason: str
    arrived: float
    scheduled: float          # first admitted to a step (end of its WAITING phase)
    first_token: float
    finished: float
    prompt_tokens: int
    generation_tokens: int


class WorkerMetrics:
    """Requests, tokens, engine state and latencies of one worker, as kubellm_* and vLLM's vllm:*
    metrics; every method is thread-safe. `model_name`: the served name (the vllm:* model_name label)."""

    def __init__(self, model_name: str = ""):
        p, r = PREFIX, Registry()
        self.registry = r
        self.model_name = model_name
        self._labels = (model_name, ENGINE_INDEX)
        self._state = EngineState()
        self._adapter_requests = None   # kubellm_lora_requests_total, once the engine serves adapters
        self._requests = r.counter(f"{p}requests_total", "Finished requests by gRPC status code.", ("code",))
        self._prompt_tokens = r.counter(f"{p}prompt_tokens_total", "Prompt tokens admitted.")
        self._generation_tokens = r.counter(f"{p}generation_tokens_total", "Tokens generated.")
        r.gauge(f"{p}running", "Sequences running in the engine.", function=lambda: self._state.running)
        r.gauge(f"{p}waiting", "Sequences waiting for the engine.", function=lambda: self._state.waiting)
        r.gauge(f"{p}kv_cache_usage", "Share of KV-cache blocks in use (0..1).",
                function=lambda: self._state.kv_cache_usage)
        r.gauge(f"{p}swapped", "Sequences preempted to host memory (eviction='copy'), waiting to be swapped back in.",
                function=lambda: self._state.swapped)
        r.counter(f"{p}kv_swapped_blocks_total", "KV-cache blocks copied to host memory (out) and back (in) for "
                  "preempted sequences (eviction='copy').", ("direction",),
                  function=lambda: {("out",): self._state.swapped_out_blocks, ("in",): self._state.swapped_in_blocks})
        r.counter(f"{p}kv_swap_fallbacks_total", "Preemptions with eviction='copy' that recomputed the sequence "
                  "because the host blocks were full.", function=lambda: self._state.swap_fallbacks)
        self.ttft = r.histogram(f"{p}time_to_first_token_seconds", "Time from request arrival to its first token.",
                                TTFT_BUCKETS)
        self.tpot = r.histogram(f"{p}time_per_output_token_seconds", "Mean time between output tokens of a request.",
                                TPOT_BUCKETS)
        self._load_total = r.gauge(f"{p}model_load_seconds",
                                   "Seconds from the start of the model load to an engine ready to serve.")
        self._load_phases = r.gauge(f"{p}model_load_phase_seconds",
                                    "Seconds of the model load by phase: download (resolve, download, convert), "
                                    "weights (build the model, read the checkpoint), warmup (KV cache, CUDA graphs).",
                                    ("phase",))
        self._add_vllm_metrics(r)

    def _add_vllm_metrics(self, r: Registry) -> None:
        """vLLM v1's metric set (names without `_total` are counters: prometheus_client appends it)."""
        L = VLLM_LABELS

        def state(field):
            return lambda: {self._labels: getattr(self._state, field)}

        r.gauge("vllm:num_requests_running", "Number of requests in model execution batches.", L,
                function=state("running"))
        r.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", L,
                function=state("waiting"))
        r.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", L,
                function=state("kv_cache_usage"))
        r.counter("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.",
                  L, function=state("prefix_queries"))
        r.counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", L,
                  function=state("prefix_hits"))
        r.counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", L,
                  function=state("preemptions"))
        self._v_prompt_tokens = r.counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", L)
        self._v_generation_tokens = r.counter("vllm:generation_tokens_total", "Number of generation tokens processed.",
                                              L)
        self._v_success = r.counter("vllm:request_success_total", "Count of successfully processed requests.",
                                    (*L, "finished_reason"))
        for reason in FINISH_REASONS:   # as vLLM: every reason has its sample from the start
            self._v_success.inc(*self._labels, reason, amount=0)
        self._v_prompt_tokens.inc(*self._labels, amount=0)
        self._v_generation_tokens.inc(*self._labels, amount=0)
        self._v_ttft = r.histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                   VLLM_TTFT_BUCKETS, L)
        self._v_itl = r.histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                  VLLM_ITL_BUCKETS, L)
        self._v_request_tpot = r.histogram("vllm:request_time_per_output_token_seconds",
                                           "Histogram of time_per_output_token_seconds per request.",
                                           VLLM_ITL_BUCKETS, L)
        timing = {"e2e": ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
                  "queue": ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
                  "inference": ("vllm:request_inference_time_seconds",
                                "Histogram of time spent in RUNNING phase for request."),
                  "prefill": ("vllm:request_prefill_time_seconds",
                              "Histogram of time spent in PREFILL phase for request."),
                  "decode": ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.")}
        self._v_timing = {key: r.histogram(name, help_, VLLM_REQUEST_LATENCY_BUCKETS, L)
                          for key, (name, help_) in timing.items()}
        self._v_request_tokens = None   # (prompt, generation) histograms: their buckets need max_model_len

    # -- updates --------------------------------------------------------------------------------
    def adapters_loaded(self, names: list[str], published: float) -> None:
        """The engine serves these LoRA adapters (all resident at once): vLLM's vllm:lora_requests_info, which a
        Gateway's endpoint picker reads for adapter affinity, and kubellm's requests per adapter. Exported only
        with adapters, as vLLM exports it only with LoRA enabled. `published`: time.time() of the load, the
        gauge's value until the engine thread's first state."""
        if not names:
            return
        max_lora = str(len(names))   # vLLM's max_loras: adapters one batch may use; here every served one
        self._state = EngineState(published=published)

        def info():
            state = self._state
            return {(max_lora, ",".join(state.waiting_adapters), ",".join(state.running_adapters)):
                    state.published or published}

        self.registry.gauge("vllm:lora_requests_info", "Running stats on lora requests.", LORA_INFO_LABELS,
                            function=info)
        self._adapter_requests = self.registry.counter(
            f"{PREFIX}lora_requests_total", "Requests admitted per LoRA adapter (a request of the base model names "
            "none).", ("adapter",))
        for name in names:   # every served adapter has its sample from the start
            self._adapter_requests.inc(name, amount=0)

    def adapter_requests(self, names: list[str]) -> None:
        """Requests just admitted, by the adapter each names (the base model's: None, not counted)."""
        if self._adapter_requests is None:
            return
        for name in names:
            if name:
                self._adapter_requests.inc(name)

    def engine_loaded(self, block_size: int, num_gpu_blocks: int, enable_prefix_caching: bool,
                      max_model_len: int) -> None:
        """The engine is up: vLLM's cache_config_info (labels as its CacheConfig.metrics_info(): the values
        as strings, plus the engine; no model_name) and the token histograms (buckets up to max_model_len)."""
        info = {"block_size": str(block_size), "num_gpu_blocks": str(num_gpu_blocks),
                "enable_prefix_caching": str(bool(enable_prefix_caching)), "engine": ENGINE_INDEX}
        self.registry.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", tuple(info),
                            function=lambda: {tuple(info.values()): 1})
        buckets = build_1_2_5_buckets(max_model_len)
        self._v_request_tokens = (
            self.registry.histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", buckets,
                                    VLLM_LABELS),
            self.registry.histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                    buckets, VLLM_LABELS))

    def set_load_times(self, total: float, phases: dict[str, float]) -> None:
        self._load_total.set(total)
        for phase in LOAD_PHASES:
            self._load_phases.set(phases.get(phase, 0.0), phase)

    def request_done(self, code: str) -> None:
        self._requests.inc(code)

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        """`prompt`: tokens admitted (kubellm_); `generated`: tokens generated (kubellm_ and vllm:)."""
        if prompt:
            self._prompt_tokens.inc(amount=prompt)
        if generated:
            self._generation_tokens.inc(amount=generated)
            self._v_generation_tokens.inc(*self._labels, amount=generated)

    def set_engine_state(self, state: EngineState) -> None:
        self._state = state   # one reference swap: a scrape reads one consistent step

    def first_token(self, ttft: float, prompt_tokens: int) -> None:
        """A request's first token: its prompt is prefilled (vLLM counts prompt tokens here)."""
        self.ttft.observe(ttft)
        self._v_ttft.observe(ttft, *self._labels)
        self._v_prompt_tokens.inc(*self._labels, amount=prompt_tokens)

    def inter_token_latencies(self, seconds: list[float]) -> None:
        """One step's gaps between a request's previous token and this one (one lock per step)."""
        if seconds:
            self._v_itl.observe_many(seconds, *self._labels)

    def request_finished(self, done: FinishedRequest) -> None:
        labels = self._labels
        self._v_success.inc(*labels, done.finish_reason)
        t = self._v_timing
        t["e2e"].observe(done.finished - done.arrived, *labels)
        t["queue"].observe(done.scheduled - done.arrived, *labels)
        t["inference"].observe(done.finished - done.scheduled, *labels)
        t["prefill"].observe(done.first_token - done.scheduled, *labels)
        t["decode"].observe(done.finished - done.first_token, *labels)
        if done.generation_tokens > 1:
            tpot = (done.finished - done.first_token) / (done.generation_tokens - 1)
            self.tpot.observe(tpot)
            self._v_request_tpot.observe(tpot, *labels)
        if self._v_request_tokens is not None:
            self._v_request_tokens[0].observe(done.prompt_tokens, *labels)
            self._v_request_tokens[1].observe(done.generation_tokens, *labels)

    def request_ended_early(self, finish_reason: str) -> None:
        """A request that did not run to its end: aborted by its client ("abort"), or failed ("error")."""
        self._v_success.inc(*self._labels, finish_reason)

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
