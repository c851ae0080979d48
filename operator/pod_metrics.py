"""One GET of a pod's Prometheus /metrics, with a short timeout and never an exception: how the operator reads
a leader's load phases (load_metrics.py) and the routers' load (router_load.py). Where pods are not reachable
(an operator outside the cluster network, fake nodes) the caller gets the reason instead.
"""

from __future__ import annotations

import urllib.request

from kubellm.metrics import parse
from kubellm.operator.resources import METRICS_PORT

TIMEOUT_SECONDS = 1.0
MAX_BYTES = 2_000_000
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # pod IPs: never through an HTTP proxy


def scrape(pod: dict, port: int = METRICS_PORT, timeout: float = TIMEOUT_SECONDS) -> tuple[dict[str, float] | None, str]:
    """(samples as kubellm.metrics.parse gives them, "") from the pod's metrics port, or (None, why not)."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None, "the pod has no IP"
    url = f"http://{ip}:{port}/metrics"
    try:
        with _DIRECT.open(url, timeout=timeout) as reply:
            return parse(reply.read(MAX_BYTES).decode("utf-8", "replace")), ""
    except Exception as err:  # noqa: BLE001 - any failure only means there is nothing to read
        return None, f"{url}: {err}"
