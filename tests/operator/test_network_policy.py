"""The NetworkPolicies the operator builds, evaluated with Kubernetes' Ingress semantics on the pods the builders
make: who may reach which pod on which port.

`admits` is the rule of networking.k8s.io/v1 for Ingress, written out: a pod that no policy selects admits
everything; a selected pod admits a connection only when some policy selecting it has a rule whose `from`
(absent: any source) has a peer matching the source and whose `ports` (absent: every port) hold the port.
A peer's podSelector alone means pods of the policy's namespace; namespaceSelector alone, every pod of the
matching namespaces; both, the matching pods of the matching namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import network_policy as NP
from kubellm.operator import resources as R

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str] = field(hash=False)


def matches(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the evaluator knows matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def peer_matches(peer: dict, policy_namespace: str, source: Pod, namespace_labels: dict[str, dict]) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"no ipBlock in our policies: {peer}"
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], namespace_labels[source.namespace]):
            return False
    elif source.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or matches(peer["podSelector"], source.labels)


def selects(policy: dict, pod: Pod) -> bool:
    return (policy["metadata"]["namespace"] == pod.namespace and "Ingress" in policy["spec"]["policyTypes"]
            and matches(policy["spec"]["podSelector"], pod.labels))


def admits(policies: list[dict], namespace_labels: dict[str, dict], source: Pod, target: Pod, port: int) -> bool:
    selecting = [p for p in policies if selects(p, target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            port_ok = "ports" not in rule or any(p["port"] == port and p.get("protocol", "TCP") == "TCP"
                                                 for p in rule["ports"])
            peer_ok = peers is None or any(peer_matches(peer, policy["metadata"]["namespace"], source,
                                                        namespace_labels) for peer in peers)
            if port_ok and peer_ok:
                return True
    return False


# -- the cluster: pods as the builders label them ------------------------------------------------
NS, OPERATOR_NS = "team", "kubellm-system"
NAMESPACES = {ns: {NP.NAMESPACE_NAME_LABEL: ns, **extra} for ns, extra in (
    (NS, {}), ("monitoring", {"purpose": "monitoring"}), ("elsewhere", {}), (OPERATOR_NS, {}),
    ("gateways", {"gateway": "true"}))}
OWNER, OTHER = R.Owner("llm", NS, "uid-1"), R.Owner("other", NS, "uid-2")
OPERATOR = NP.OperatorPods(OPERATOR_NS, {"app.kubernetes.io/name": "kubellm", "app.kubernetes.io/instance": "kubellm",
                                         "app.kubernetes.io/component": "operator"})
GRPC, REST = 50051, 28080


def spec(**fields) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"source": "/models/tiny"}, "tensorParallel": 2, "gpusPerPod": 1,
                                             "replicas": 2, "restApi": {"enabled": True}, **fields})


def worker_pod(owner: R.Owner, s: LLMDeploymentSpec, group: int, rank: int) -> Pod:
    labels = R.worker_statefulset(owner, s, group)["spec"]["template"]["metadata"]["labels"]
    return Pod(f"{owner.name}-g{group}-{rank}", owner.namespace, {**labels, R.POD_INDEX_LABEL: str(rank)})


def router_pod(owner: R.Owner, s: LLMDeploymentSpec) -> Pod:
    return Pod(f"{owner.name}-router-x", owner.namespace,
               R.router_deployment(owner, s)["spec"]["template"]["metadata"]["labels"])


def cluster(s: LLMDeploymentSpec) -> dict[str, Pod]:
    pods = {p.name: p for p in (worker_pod(OWNER, s, g, r) for g in (0, 1) for r in (0, 1))}
    pods["router"] = router_pod(OWNER, s)
    pods["other-router"] = router_pod(OTHER, s)          # a neighbour deployment in the same namespace
    pods["other-worker"] = worker_pod(OTHER, s, 0, 0)
    pods["neighbour"] = Pod("neighbour", NS, {"app": "something-else"})
    pods["prometheus"] = Pod("prometheus-0", "monitoring", {"app": "prometheus"})
    pods["stranger"] = Pod("stranger", "elsewhere", {"app": "x"})
    pods["operator"] = Pod("kubellm-abc", OPERATOR_NS, dict(OPERATOR.labels))
    pods["helm-test"] = Pod("kubellm-test", OPERATOR_NS, {"app.kubernetes.io/name": "kubellm"})
    pods["gateway"] = Pod("envoy", "gateways", {"app": "envoy"})
    return pods


def policies_of(s: LLMDeploymentSpec, operator=OPERATOR) -> list[dict]:
    return [c for c in R.children(OWNER, s, operator=operator) if c["kind"] == "NetworkPolicy"]


# (source, target, port, admitted) with the default spec.networkPolicy (metricsFrom {}: every namespace)
DEFAULT_TABLE = [
    # a group's own pods, on every port: torch.distributed, its control port, gRPC, NCCL's own sockets
    ("llm-g0-1", "llm-g0-0", R.MASTER_PORT, True),
    ("llm-g0-1", "llm-g0-0", R.CONTROL_PORT, True),
    ("llm-g0-0", "llm-g0-1", GRPC, True),
    ("llm-g0-0", "llm-g0-1", 43117, True),
    # another group of the same deployment: nothing but what everyone may (metrics)
    ("llm-g1-0", "llm-g0-0", R.MASTER_PORT, False),
    ("llm-g1-1", "llm-g0-1", R.CONTROL_PORT, False),
    ("llm-g1-0", "llm-g0-0", GRPC, False),
    ("llm-g1-0", "llm-g0-0", R.HTTP_PORT, False),
    # the deployment's router: gRPC and the leaders' HTTP port, not the distributed ones
    ("router", "llm-g0-0", GRPC, True),
    ("router", "llm-g1-0", R.HTTP_PORT, True),
    ("router", "llm-g0-0", R.MASTER_PORT, False),
    ("router", "llm-g0-1", R.CONTROL_PORT, False),
    # a neighbour's router, any other pod of the namespace, a pod elsewhere: not the workers' serving ports
    ("other-router", "llm-g0-0", GRPC, False),
    ("other-worker", "llm-g0-0", R.MASTER_PORT, False),
    ("neighbour", "llm-g0-0", GRPC, False),
    ("stranger", "llm-g0-0", GRPC, False),
    ("stranger", "llm-g0-0", R.HTTP_PORT, False),
    ("gateway", "llm-g0-0", R.HTTP_PORT, False),        # no InferencePool: no Gateway traffic
    # metrics: from every namespace by default
    ("prometheus", "llm-g0-0", R.METRICS_PORT, True),
    ("stranger", "llm-g1-1", R.METRICS_PORT, True),
    ("prometheus", "router", R.METRICS_PORT, True),
    ("operator", "llm-g0-0", R.METRICS_PORT, True),
    # the router is the Service: its public ports from anywhere, nothing else
    ("stranger", "router", GRPC, True),
    ("stranger", "router", REST, True),
    ("neighbour", "router", REST, True),
    ("stranger", "router", R.MASTER_PORT, False),
    ("llm-g0-0", "router", 8080, False),
    # pods of other deployments are not selected by these policies (their own policies are theirs)
    ("stranger", "other-worker", GRPC, True),
    ("stranger", "neighbour", 1234, True),
]


@pytest.mark.parametrize("source, target, port, admitted", DEFAULT_TABLE,
                         ids=[f"{s}->{t}:{p}" for s, t, p, _ in DEFAULT_TABLE])
def test_who_reaches_what_by_default(source, target, port, admitted):
    s = spec()
    pods = cluster(s)
    assert admits(policies_of(s), NAMESPACES, pods[source], pods[target], port) is admitted


RESTRICTED_METRICS = {"networkPolicy": {"metricsFrom": {"purpose": "monitoring"}}}
METRICS_TABLE = [
    ("prometheus", "llm-g0-0", True), ("prometheus", "router", True),
    ("operator", "llm-g0-0", True), ("operator", "router", True),     # the autoscaler's and load phases' reads
    ("stranger", "llm-g0-0", False), ("stranger", "router", False),
    ("neighbour", "llm-g0-1", False),
    ("helm-test", "llm-g0-0", False),                                 # the operator's namespace, not its pods
    ("llm-g0-1", "llm-g0-0", True),                                   # its own group, every port
    ("llm-g1-0", "llm-g0-0", False),
]


@pytest.mark.parametrize("source, target, admitted", METRICS_TABLE, ids=[f"{s}->{t}" for s, t, _ in METRICS_TABLE])
def test_metrics_from_named_namespaces_and_the_operator(source, target, admitted):
    s = spec(**RESTRICTED_METRICS)
    pods = cluster(s)
    assert admits(policies_of(s), NAMESPACES, pods[source], pods[target], R.METRICS_PORT) is admitted


def test_outside_a_pod_the_operator_is_not_named():
    """An operator run outside the cluster (no POD_NAMESPACE) has no pods to admit; metricsFrom still applies."""
    s = spec(**RESTRICTED_METRICS)
    pods = cluster(s)
    policies = policies_of(s, operator=None)
    assert not admits(policies, NAMESPACES, pods["operator"], pods["llm-g0-0"], R.METRICS_PORT)
    assert admits(policies, NAMESPACES, pods["prometheus"], pods["llm-g0-0"], R.METRICS_PORT)


@pytest.mark.parametrize("gateway_from, source, admitted", [
    (None, "gateway", True), (None, "stranger", True),               # unset: any namespace
    ({"gateway": "true"}, "gateway", True), ({"gateway": "true"}, "stranger", False),
])
def test_an_inference_pool_opens_the_leaders_http_port_to_the_gateway(gateway_from, source, admitted):
    network = {"gatewayFrom": gateway_from} if gateway_from else {}
    s = spec(inferencePool={"enabled": True}, networkPolicy=network)
    pods, policies = cluster(s), policies_of(s)
    assert admits(policies, NAMESPACES, pods[source], pods["llm-g0-0"], R.HTTP_PORT) is admitted
    # only the HTTP port: gRPC and the distributed ports stay closed to the Gateway
    for port in (GRPC, R.MASTER_PORT, R.CONTROL_PORT):
        assert not admits(policies, NAMESPACES, pods[source], pods["llm-g0-0"], port)


def test_rest_port_closed_when_rest_is_off():
    s = spec(restApi={"enabled": False})
    pods = cluster(s)
    assert admits(policies_of(s), NAMESPACES, pods["stranger"], pods["router"], GRPC)
    assert not admits(policies_of(s), NAMESPACES, pods["stranger"], pods["router"], REST)


def test_each_policy_selects_exactly_its_pods():
    s = spec()
    pods = cluster(s)
    selected = {p["metadata"]["name"]: sorted(name for name, pod in pods.items() if selects(p, pod))
                for p in policies_of(s)}
    assert selected == {"llm-g0": ["llm-g0-0", "llm-g0-1"], "llm-g1": ["llm-g1-0", "llm-g1-1"],
                        "llm-workers": ["llm-g0-0", "llm-g0-1", "llm-g1-0", "llm-g1-1"], "llm-router": ["router"]}


def test_every_port_a_pod_declares_is_admitted_from_someone_meant_to_use_it():
    """No declared port is left unreachable by accident (a policy typo would close a serving port)."""
    s = spec()
    pods, policies = cluster(s), policies_of(s)
    users = {"grpc": "router", "dist": "llm-g0-1", "metrics": "prometheus", "http": "router"}
    [worker] = R.worker_statefulset(OWNER, s, 0)["spec"]["template"]["spec"]["containers"]
    for port in worker["ports"]:
        assert admits(policies, NAMESPACES, pods[users[port["name"]]], pods["llm-g0-0"], port["containerPort"]), port
    [router] = R.router_deployment(OWNER, s)["spec"]["template"]["spec"]["containers"]
    for port in router["ports"]:
        source = "prometheus" if port["name"] == "metrics" else "stranger"
        assert admits(policies, NAMESPACES, pods[source], pods["router"], port["containerPort"]), port


def test_the_control_port_is_the_rank_groups():
    """runtime/executor/rank_group.py listens for its control channel on MASTER_PORT + 1 (read as text: that
    module imports torch, which the operator's tests do not need)."""
    source = (ROOT / "runtime" / "executor" / "rank_group.py").read_text()
    assert 'Listener(("0.0.0.0", master_port + 1)' in source
    assert R.CONTROL_PORT == R.MASTER_PORT + 1


def test_policies_are_children_owned_and_applied_before_the_pods():
    s = spec()
    children = R.children(OWNER, s, operator=OPERATOR)
    kinds = [c["kind"] for c in children]
    assert kinds.count("NetworkPolicy") == 4
    assert max(i for i, k in enumerate(kinds) if k == "NetworkPolicy") < kinds.index("StatefulSet")
    for policy in (c for c in children if c["kind"] == "NetworkPolicy"):
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        assert policy["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid   # garbage-collected with the deployment
        assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open (hf:// downloads, DNS)"
    # the groups a scale keeps, not 0..replicas-1
    names = [c["metadata"]["name"] for c in R.children(OWNER, s, groups=[0, 3]) if c["kind"] == "NetworkPolicy"]
    assert names == ["llm-g0", "llm-g3", "llm-workers", "llm-router"] == NP.policy_names(OWNER, [0, 3])


def test_disabled_builds_none():
    s = spec(networkPolicy={"enabled": False})
    assert policies_of(s) == []


def test_policies_change_no_worker_pod():
    assert R.worker_spec_hash(spec()) == R.worker_spec_hash(spec(**RESTRICTED_METRICS)) == R.worker_spec_hash(
        spec(networkPolicy={"enabled": False}))


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"POD_NAMESPACE": "ops"}, None),                                  # no labels: never "every pod of ops"
    ({"KUBELLM_OPERATOR_POD_LABELS": "a=b"}, None),
    ({"POD_NAMESPACE": "ops", "KUBELLM_OPERATOR_POD_LABELS": "a=b, c=d"}, NP.OperatorPods("ops", {"a": "b", "c": "d"})),
])
def test_operator_pods_from_the_charts_environment(env, expected):
    assert NP.OperatorPods.from_env(env) == expected
