"""Prometheus metrics in the text exposition format, standard library only: the one writer used by
the worker, the router and the operator (each defines its own metrics with it).

    registry = Registry()
    requests = registry.counter("app_requests_total", "Requests by code.", ("code",))
    latency = registry.histogram("app_latency_seconds", "Latency.", buckets=(0.1, 1.0))
    requests.inc("OK"); latency.observe(0.05)
    server = serve_metrics(registry.render, 9090)   # GET /metrics in a daemon thread
    parse(registry.render())["app_requests_total{code=\"OK\"}"] == 1.0

Label values are passed positionally, in the order of the metric's label names. An unlabelled
metric always has its one sample (0 until set); a labelled one has a sample per label values
used. Samples are written sorted by their label values. A counter or gauge may instead be read
from a function at each render (`function=`): for an unlabelled metric it returns the value, for
a labelled one a mapping {label values: value}.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction ("3", not "3.0"), floats as Python's repr."""
    if isinstance(value, int):  # counts stay exact (a float has 53 bits)
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


def escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values)) + "}"


class _Metric:
    type_ = ""

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = ()):
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} of {name}")
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labelvalues: tuple) -> tuple[str, ...]:
        if len(labelvalues) != len(self.labelnames):
            self._wrong_labels(labelvalues)
        return labelvalues

    def _wrong_labels(self, labelvalues: tuple):
        raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labelvalues!r}")

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.type_}",
                *self.samples()]


class _Value(_Metric):
    """A counter or a gauge: one number per label values, or read from `function` at each render."""

    def __init__(self, name: str, help_: str, labelnames: Sequence[str] = (),
                 function: Callable[[], float | Mapping[tuple[str, ...], float]] | None = None):
        super().__init__(name, help_, labelnames)
        self.function = function
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0}

    def _add(self, amount: float, labelvalues: tuple) -> None:
        key = self._key(labelvalues)
        values = self._values
        with self._lock:
            values[key] = values.get(key, 0) + amount

    def value(self, *labelvalues: str) -> float:
        return self._snapshot().get(self._key(labelvalues), 0)

    def _snapshot(self) -> dict[tuple[str, ...], float]:
        if self.function is None:
            with self._lock:
                return dict(self._values)
        got = self.function()
        return dict(got) if self.labelnames else {(): got}

    def samples(self) -> Iterable[str]:
        for values, value in sorted(self._snapshot().items()):
            yield f"{self.name}{_labels(self.labelnames, values)} {format_value(value)}"


class Counter(_Value):
    type_ = "counter"

    def inc(self, *labelvalues: str, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up (inc by {amount})")
        if len(labelvalues) != len(self.labelnames):   # inline, no _add: the router counts on its hot path
            self._wrong_labels(labelvalues)
        values = self._values
        with self._lock:
            values[labelvalues] = values.get(labelvalues, 0) + amount


class Gauge(_Value):
    type_ = "gauge"

    def set(self, value: float, *labelvalues: str) -> None:
        key = self._key(labelvalues)
        with self._lock:
            self._values[key] = value

    def inc(self, *labelvalues: str, amount: float = 1) -> None:
        self._add(amount, labelvalues)

    def remove(self, *labelvalues: str) -> None:
        """Drop a labelled sample (e.g. a replica that left)."""
        with self._lock:
            self._values.pop(self._key(labelvalues), None)


class Histogram(_Metric):
    """Observations counted in buckets (`le`, cumulative on the wire, with +Inf), plus _sum and _count."""
    type_ = "histogram"

    def __init__(self, name: str, help_: str, buckets: Sequence[float], labelnames: Sequence[str] = ()):
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is the bucket label")
        super().__init__(name, help_, labelnames)
        self.buckets = tuple(sorted(b for b in buckets if b != math.inf))
        # per label values: [count in each bucket (not cumulative; the last is above every bound), sum]
        self._series: dict[tuple[str, ...], list] = {} if labelnames else {(): self._empty()}

    def _empty(self) -> list:
        return [[0] * (len(self.buckets) + 1), 0.0]

    def observe(self, value: float, *labelvalues: str) -> None:
        if len(labelvalues) != len(self.labelnames):
            self._wrong_labels(labelvalues)
        i = bisect.bisect_left(self.buckets, value)   # the first bound >= value: `le` is inclusive
        with self._lock:
            series = self._series.get(labelvalues)
            if series is None:
                series = self._series[labelvalues] = self._empty()
            series[0][i] += 1
            series[1] += value

    def observe_many(self, values: Sequence[float], *labelvalues: str) -> None:
        """Several observations under one lock (a hot loop's batch, e.g. one engine step's)."""
        if len(labelvalues) != len(self.labelnames):
            self._wrong_labels(labelvalues)
        buckets = self.buckets
        indexes = [bisect.bisect_left(buckets, v) for v in values]
        total = sum(values)
        with self._lock:
            series = self._series.get(labelvalues)
            if series is None:
                series = self._series[labelvalues] = self._empty()
            counts = series[0]
            for i in indexes:
                counts[i] += 1
            series[1] += total

    def count(self, *labelvalues: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labelvalues))
            return sum(series[0]) if series else 0

    def samples(self) -> Iterable[str]:
        with self._lock:
            snapshot = sorted((k, list(counts), total) for k, (counts, total) in self._series.items())
        for values, counts, total in snapshot:
            bucket_labels = (*self.labelnames, "le")
            cumulative = 0
            for bound, n in zip(self.buckets, counts):
                cumulative += n
                yield f"{self.name}_bucket{_labels(bucket_labels, (*values, format_value(bound)))} {cumulative}"
            count = cumulative + counts[-1]
            yield f"{self.name}_bucket{_labels(bucket_labels, (*values, '+Inf'))} {count}"
            yield f"{self.name}_sum{_labels(self.labelnames, values)} {format_value(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, values)} {count}"


class Registry:
    """Metrics in the order they were created; `render()` is the exposition text."""

    def __init__(self):
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help_: str, labelnames: Sequence[str] = (), *,
                function: Callable | None = None) -> Counter:
        return self.register(Counter(name, help_, labelnames, function))

    def gauge(self, name: str, help_: str, labelnames: Sequence[str] = (), *,
              function: Callable | None = None) -> Gauge:
        return self.register(Gauge(name, help_, labelnames, function))

    def histogram(self, name: str, help_: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> Histogram:
        return self.register(Histogram(name, help_, buckets, labelnames))

    def render(self) -> str:
        return "\n".join(line for metric in self._metrics for line in metric.render()) + "\n"


def serve_metrics(render: Callable[[], str], port: int, host: str = "0.0.0.0",
                  thread_name: str = "kubellm-metrics") -> ThreadingHTTPServer:
    """GET /metrics answered with `render()` in a daemon thread; port 0 picks a free one (see
    `server.server_port`); `server.shutdown()` stops it."""

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
    """Samples of an exposition text as {'name{labels}': value} (tests, benchmarks, the operator reading a worker)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
