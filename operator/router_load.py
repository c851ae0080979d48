"""The routers' load, read from their own /metrics: what the built-in autoscaler decides on and what scale-down
ranks groups by. No Prometheus: each router pod counts the requests it has sent to each leader
(`kubellm_router_in_flight{replica="<ip>:<port>"}`) and those it holds waiting for one
(`kubellm_router_requests_waiting`); the operator sums them over the router pods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kubellm.operator.autoscaler import Load
from kubellm.operator.pod_metrics import scrape

IN_FLIGHT = "kubellm_router_in_flight"
WAITING = "kubellm_router_requests_waiting"
_REPLICA_LABEL = re.compile(r'(?:^|,)\s*replica="([^"]*)"')


@dataclass
class RouterLoad:
    in_flight: dict[str, float] = field(default_factory=dict)   # by leader host (the IP of its address)
    waiting: float = 0.0
    routers: int = 0                                             # router pods that answered
    errors: list[str] = field(default_factory=list)

    def add(self, samples: dict[str, float]) -> None:
        """One router's samples (kubellm.metrics.parse) added in."""
        self.routers += 1
        for sample, value in samples.items():
            name, _, labels = sample.partition("{")
            if name == IN_FLIGHT:
                match = _REPLICA_LABEL.search(labels)
                if match:
                    host = match.group(1).rsplit(":", 1)[0].strip("[]")
                    self.in_flight[host] = self.in_flight.get(host, 0.0) + value
            elif name == WAITING:
                self.waiting += value

    def total(self) -> Load | None:
        """The autoscaler's sample; None when no router answered (an unknown load is no sample)."""
        return Load(sum(self.in_flight.values()), self.waiting) if self.routers else None

    def by_group(self, leader_ips: dict[str, int]) -> dict[int, float]:
        """In flight per replica group, from its leader pod's IP."""
        out: dict[int, float] = {}
        for host, value in self.in_flight.items():
            if host in leader_ips:
                out[leader_ips[host]] = out.get(leader_ips[host], 0.0) + value
        return out


def read_router_load(router_pods: list[dict]) -> RouterLoad:
    """Every running router pod's counts, summed; one short GET each, never an exception."""
    load = RouterLoad()
    for pod in router_pods:
        if (pod.get("status") or {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
            continue
        samples, error = scrape(pod)
        if samples is None:
            load.errors.append(error)
        else:
            load.add(samples)
    return load
