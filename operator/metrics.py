"""The operator's Prometheus metrics (standard library only): what it reconciled, wrote and restarted,
and the phase of every LLMDeployment it watches.

    kubellm_operator_reconciles_total{reason}        create / update / resume handler runs
    kubellm_operator_writes_total                    applies, deletes and patches of children sent
    kubellm_operator_group_restarts_total{cause}     failure / rollout
    kubellm_operator_llmdeployments{phase}           watched LLMDeployments by status.phase

Served on KUBELLM_OPERATOR_METRICS_PORT (the chart's ServiceMonitor scrapes it).
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from typing import Callable

from kubellm.runtime.serving.metrics import serve_metrics  # standard library only, like this module

PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Failed")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class OperatorMetrics:
    def __init__(self, writes: Callable[[], int] = lambda: 0):
        self._lock = threading.Lock()
        self.reconciles: Counter[str] = Counter()
        self.group_restarts: Counter[str] = Counter()
        self.phases: dict[tuple[str, str], str] = {}
        self.writes = writes

    def reconciled(self, reason: str) -> None:
        with self._lock:
            self.reconciles[str(reason)] += 1

    def restarted(self, cause: str) -> None:
        with self._lock:
            self.group_restarts[cause] += 1

    def phase(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self.phases.pop((namespace, name), None)
            else:
                self.phases[(namespace, name)] = phase

    def render(self) -> str:
        with self._lock:
            by_phase = Counter(self.phases.values())
            lines = ["# HELP kubellm_operator_reconciles_total Reconciles by handler reason.",
                     "# TYPE kubellm_operator_reconciles_total counter"]
            lines += [f'kubellm_operator_reconciles_total{{reason="{_label(r)}"}} {n}'
                      for r, n in sorted(self.reconciles.items())]
            lines += ["# HELP kubellm_operator_writes_total Writes of children sent to the API server.",
                      "# TYPE kubellm_operator_writes_total counter", f"kubellm_operator_writes_total {self.writes()}",
                      "# HELP kubellm_operator_group_restarts_total Replica groups restarted, by cause.",
                      "# TYPE kubellm_operator_group_restarts_total counter"]
            lines += [f'kubellm_operator_group_restarts_total{{cause="{_label(c)}"}} {n}'
                      for c, n in sorted(self.group_restarts.items())]
            lines += ["# HELP kubellm_operator_llmdeployments Watched LLMDeployments by phase.",
                      "# TYPE kubellm_operator_llmdeployments gauge"]
            lines += [f'kubellm_operator_llmdeployments{{phase="{_label(p)}"}} {by_phase.get(p, 0)}'
                      for p in sorted(set(PHASES) | set(by_phase))]
        return "\n".join(lines) + "\n"

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        """GET /metrics on `port` (0: a free one, see `server.server_port`) in a daemon thread."""
        return serve_metrics(self.render, port, host, thread_name="operator-metrics")
