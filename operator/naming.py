"""What an LLMDeployment's children are called and labelled, and the ports its pods listen on.

Shared by the builders (resources.py, network_policy.py); resources.py re-exports all of it, so the handlers
and tests keep writing `R.selector`, `R.group_name`, `R.METRICS_PORT`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubellm.api.spec import GROUP, KIND, VERSION

GRPC_PORT_NAME = "grpc"
REST_PORT_NAME = "http"
MASTER_PORT = 29500
# The rank group's control channel listens next to torch.distributed's store (runtime/executor/rank_group.py).
CONTROL_PORT = MASTER_PORT + 1
METRICS_PORT, METRICS_PORT_NAME = 9090, "metrics"  # Prometheus /metrics of workers and routers (PodMonitor)
# The leader's own OpenAI HTTP API (and /metrics): an InferencePool's target port, vLLM's default port.
HTTP_PORT, HTTP_PORT_NAME = 8000, "http"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"   # set on StatefulSet pods by Kubernetes >= 1.28
GROUP_LABEL = "kubellm.io/group"
MANAGED_BY = "kubellm-operator"


@dataclass(frozen=True)
class Owner:
    """What the builders need of the LLMDeployment object itself."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body) -> "Owner":
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta["uid"])


# -- names ------------------------------------------------------------------------------------
def group_name(owner: Owner, index: int) -> str:
    return f"{owner.name}-g{index}"


def leaders_name(owner: Owner) -> str:
    return f"{owner.name}-leaders"


def router_name(owner: Owner) -> str:
    return f"{owner.name}-router"


def config_name(owner: Owner) -> str:
    return f"{owner.name}-config"


# -- metadata ---------------------------------------------------------------------------------
def labels(owner: Owner, component: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubellm", "app.kubernetes.io/instance": owner.name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "kubellm",
            "app.kubernetes.io/managed-by": MANAGED_BY, **extra}


def selector(owner: Owner, component: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": owner.name, "app.kubernetes.io/component": component, **extra}


def leader_selector(owner: Owner) -> dict[str, str]:
    """The rank-0 pods of every replica group: the leaders, which serve requests (gRPC and HTTP)."""
    return selector(owner, "worker", **{POD_INDEX_LABEL: "0"})


def metadata(owner: Owner, name: str, component: str, **extra_labels: str) -> dict:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component, **extra_labels),
            "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": owner.name,
                                 "uid": owner.uid, "controller": True, "blockOwnerDeletion": True}]}
