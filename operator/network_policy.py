"""Pure builders: an LLMDeployment -> the NetworkPolicies (networking.k8s.io/v1) that admit only what it needs.

A pod that any NetworkPolicy selects for Ingress admits only what some policy selecting it allows; the
policies add up. So each of the deployment's pods is selected, and everything not listed here is denied:

- `<name>-g<i>`, one per replica group: the group's pods admit the group's pods on every port
  (torch.distributed's MASTER_PORT, the rank group's control port MASTER_PORT+1, gRPC). A group's
  distributed and control ports admit nothing else: no policy below opens them.
- `<name>-workers`: every worker admits the deployment's router pods on gRPC and on the leaders' OpenAI
  HTTP port; with an InferencePool, that HTTP port also from `spec.networkPolicy.gatewayFrom` (a Gateway,
  its endpoint picker; unset: any namespace); /metrics from `metricsFrom` and the operator's pods.
- `<name>-router`: the router's public gRPC and REST ports from anywhere (it is the Service); /metrics
  from `metricsFrom` and the operator's pods.

Egress is not restricted (hf:// downloads, DNS). Whether any of this is enforced is the network plugin's
business: the API server only stores the policies (docs/network.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import naming as N

API_VERSION, KIND = "networking.k8s.io/v1", "NetworkPolicy"
COMPONENT = "network-policy"
# The chart passes the operator its namespace (downward API) and its pods' labels, so that the policies admit
# the operator's reads of the pods' /metrics (the autoscaler, load phases) even from a restricted metricsFrom.
NAMESPACE_ENV, POD_LABELS_ENV = "POD_NAMESPACE", "KUBELLM_OPERATOR_POD_LABELS"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"   # set on every namespace by the API server


@dataclass(frozen=True)
class OperatorPods:
    """Where the operator's own pods are: its namespace and its pods' labels."""

    namespace: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "OperatorPods | None":
        """From POD_NAMESPACE and KUBELLM_OPERATOR_POD_LABELS (`k=v,k=v`); None outside a pod (no namespace, or
        no labels: a policy admitting every pod of a namespace is not what the operator means)."""
        namespace = environ.get(NAMESPACE_ENV, "").strip()
        pairs = [item.partition("=") for item in environ.get(POD_LABELS_ENV, "").split(",") if item.strip()]
        labels = {k.strip(): v.strip() for k, _, v in pairs}
        return cls(namespace, labels) if namespace and labels else None

    def peer(self) -> dict:
        return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: self.namespace}},
                "podSelector": {"matchLabels": dict(self.labels)}}


def group_policy_name(owner: N.Owner, index: int) -> str:
    return N.group_name(owner, index)


def workers_policy_name(owner: N.Owner) -> str:
    return f"{owner.name}-workers"


def router_policy_name(owner: N.Owner) -> str:
    return N.router_name(owner)


def _tcp(*ports: int) -> list[dict]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _namespaces(labels: Mapping[str, str] | None) -> dict:
    """A peer of every pod in the namespaces with these labels; {} or None: every namespace."""
    return {"namespaceSelector": {"matchLabels": dict(labels)} if labels else {}}


def _metrics_peers(spec: LLMDeploymentSpec, operator: OperatorPods | None) -> list[dict]:
    peers = [_namespaces(spec.networkPolicy.metricsFrom)]
    if operator is not None and spec.networkPolicy.metricsFrom:   # {} admits every namespace already
        peers.append(operator.peer())
    return peers


def _policy(owner: N.Owner, name: str, pod_selector: dict, ingress: list[dict]) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": N.metadata(owner, name, COMPONENT),
            "spec": {"podSelector": {"matchLabels": pod_selector}, "policyTypes": ["Ingress"], "ingress": ingress}}


def group_policy(owner: N.Owner, spec: LLMDeploymentSpec, index: int) -> dict:
    """The group's pods admit the group's pods, on every port (no `ports`: all of them)."""
    group = N.selector(owner, "worker", **{N.GROUP_LABEL: str(index)})
    return _policy(owner, group_policy_name(owner, index), group, [{"from": [{"podSelector": {"matchLabels": group}}]}])


def workers_policy(owner: N.Owner, spec: LLMDeploymentSpec, operator: OperatorPods | None = None) -> dict:
    routers = {"podSelector": {"matchLabels": N.selector(owner, "router")}}
    ingress = [{"from": [routers], "ports": _tcp(spec.router.port, N.HTTP_PORT)}]
    if spec.inferencePool.enabled:
        ingress.append({"from": [_namespaces(spec.networkPolicy.gatewayFrom)], "ports": _tcp(N.HTTP_PORT)})
    ingress.append({"from": _metrics_peers(spec, operator), "ports": _tcp(N.METRICS_PORT)})
    return _policy(owner, workers_policy_name(owner), N.selector(owner, "worker"), ingress)


def router_policy(owner: N.Owner, spec: LLMDeploymentSpec, operator: OperatorPods | None = None) -> dict:
    public = [spec.router.port] + ([spec.restApi.port] if spec.restApi.enabled else [])
    ingress = [{"ports": _tcp(*public)},   # no `from`: any source, in the cluster or through an Ingress
               {"from": _metrics_peers(spec, operator), "ports": _tcp(N.METRICS_PORT)}]
    return _policy(owner, router_policy_name(owner), N.selector(owner, "router"), ingress)


def network_policies(owner: N.Owner, spec: LLMDeploymentSpec, groups: list[int],
                     operator: OperatorPods | None = None) -> list[dict]:
    """Every policy of the deployment with these replica groups; none when spec.networkPolicy is off."""
    if not spec.networkPolicy.enabled:
        return []
    return [*(group_policy(owner, spec, i) for i in groups), workers_policy(owner, spec, operator),
            router_policy(owner, spec, operator)]


def policy_names(owner: N.Owner, groups: list[int]) -> list[str]:
    """The names network_policies gives these groups' and the deployment's policies (to delete them)."""
    return [*(group_policy_name(owner, i) for i in groups), workers_policy_name(owner), router_policy_name(owner)]
