"""Read a leader's load phases from its /metrics (kubellm_model_load_phase_seconds{phase}): one GET with a
short timeout, never an exception. The handlers call it once per group that becomes whole, to say in an
Event where the load's time went; where pods are not reachable (an operator outside the cluster, fake
nodes) the Event says so instead.
"""

from __future__ import annotations

import math
import re

from kubellm.metrics import parse
from kubellm.operator.load_time import PHASES, TOTAL
from kubellm.operator.pod_metrics import TIMEOUT_SECONDS, scrape
from kubellm.operator.resources import METRICS_PORT

_PHASE_LABEL = re.compile(r'(?:^|,)\s*phase="([^"]*)"')


def parse_load_phases(text: str | dict[str, float]) -> dict[str, float]:
    """{phase: seconds} of the known phases in a Prometheus text exposition (or its parsed samples), and under
    TOTAL the worker's whole load (kubellm_model_load_seconds) when it is there."""
    phases: dict[str, float] = {}
    total = None
    for sample, value in (parse(text) if isinstance(text, str) else text).items():
        name, _, labels = sample.partition("{")
        if name == "kubellm_model_load_phase_seconds":
            match = _PHASE_LABEL.search(labels)
            if match and match.group(1) in PHASES and not math.isnan(value):
                phases[match.group(1)] = value
        elif name == "kubellm_model_load_seconds":
            total = value
    if phases and total is not None:
        phases[TOTAL] = total
    return phases


def read_load_phases(pod: dict, port: int = METRICS_PORT, timeout: float = TIMEOUT_SECONDS) -> tuple[dict[str, float], str]:
    """(phases, "") from the pod's metrics port, or ({}, why not)."""
    samples, error = scrape(pod, port, timeout)
    if samples is None:
        return {}, error
    phases = parse_load_phases(samples)
    return phases, "" if phases else f"http://{pod['status']['podIP']}:{port}/metrics has no kubellm_model_load_phase_seconds"
