"""Read a leader's load phases from its /metrics (kubellm_model_load_phase_seconds{phase}): one GET with a
short timeout, never an exception. The handlers call it once per group that becomes whole, to say in an
Event where the load's time went; where pods are not reachable (an operator outside the cluster, fake
nodes) the Event says so instead.
"""

from __future__ import annotations

import math
import re
import urllib.request

from kubellm.metrics import parse
from kubellm.operator.load_time import PHASES, TOTAL
from kubellm.operator.resources import METRICS_PORT

TIMEOUT_SECONDS = 1.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # pod IPs: never through an HTTP proxy
_PHASE_LABEL = re.compile(r'(?:^|,)\s*phase="([^"]*)"')


def parse_load_phases(text: str) -> dict[str, float]:
    """{phase: seconds} of the known phases in a Prometheus text exposition, and under TOTAL the worker's
    whole load (kubellm_model_load_seconds) when it is there."""
    phases: dict[str, float] = {}
    total = None
    for sample, value in parse(text).items():
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
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return {}, "the pod has no IP"
    url = f"http://{ip}:{port}/metrics"
    try:
        with _DIRECT.open(url, timeout=timeout) as reply:
            phases = parse_load_phases(reply.read(2_000_000).decode("utf-8", "replace"))
    except Exception as err:  # noqa: BLE001 - any failure only means the Event has no phases
        return {}, f"{url}: {err}"
    return phases, "" if phases else f"{url} has no kubellm_model_load_phase_seconds"
