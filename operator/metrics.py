"""The operator's Prometheus metrics (standard library only): what it reconciled, wrote and restarted,
and the phase of every LLMDeployment it watches.

    kubellm_operator_reconciles_total{reason}        create / update / resume handler runs
    kubellm_operator_writes_total                    applies, deletes and patches of children sent
    kubellm_operator_group_restarts_total{cause}     failure / rollout
    kubellm_operator_autoscaled_total{reason}        the built-in autoscaler's changes: ScaledUp, ScaledDown, ...
    kubellm_operator_llmdeployments{phase}           watched LLMDeployments by status.phase

Served on KUBELLM_OPERATOR_METRICS_PORT (the chart's ServiceMonitor scrapes it).
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from typing import Callable

from kubellm.metrics import Registry, serve_metrics

PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Failed", "ScaledToZero")


class OperatorMetrics:
    def __init__(self, writes: Callable[[], int] = lambda: 0):
        self._lock = threading.Lock()
        self.phases: dict[tuple[str, str], str] = {}   # (namespace, name) -> status.phase
        r = self.registry = Registry()
        self._reconciles = r.counter("kubellm_operator_reconciles_total", "Reconciles by handler reason.",
                                     ("reason",))
        r.counter("kubellm_operator_writes_total", "Writes of children sent to the API server.", function=writes)
        self._group_restarts = r.counter("kubellm_operator_group_restarts_total",
                                         "Replica groups restarted, by cause.", ("cause",))
        self._autoscaled = r.counter("kubellm_operator_autoscaled_total",
                                     "Replica counts the built-in autoscaler changed, by reason.", ("reason",))
        r.gauge("kubellm_operator_llmdeployments", "Watched LLMDeployments by phase.", ("phase",),
                function=self._by_phase)

    def reconciled(self, reason: str) -> None:
        self._reconciles.inc(str(reason))

    def autoscaled(self, reason: str) -> None:
        self._autoscaled.inc(reason)

    def restarted(self, cause: str) -> None:
        self._group_restarts.inc(cause)

    def phase(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self.phases.pop((namespace, name), None)
            else:
                self.phases[(namespace, name)] = phase

    def _by_phase(self) -> dict[tuple[str], int]:
        """Every known phase (0 when none is in it) and any other phase some deployment is in."""
        with self._lock:
            counts = Counter(self.phases.values())
        return {(phase,): counts.get(phase, 0) for phase in set(PHASES) | set(counts)}

    def render(self) -> str:
        return self.registry.render()

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        """GET /metrics on `port` (0: a free one, see `server.server_port`) in a daemon thread."""
        return serve_metrics(self.render, port, host, thread_name="operator-metrics")
