"""Pure builders: an LLMDeployment (spec + metadata) -> the manifests of all its children.

Nothing here talks to the API server; the handlers apply what these return with server-side
apply. Per replica there is one StatefulSet (the ranks of one tensor/pipeline-parallel group)
with its headless Service; a headless `-leaders` Service selects the ready rank-0 pods, which
the router Deployment balances over; a ClusterIP Service fronts the router; optionally an
Ingress for the REST gateway; a ConfigMap with the engine configuration; one PDB for workers;
optionally an InferencePool (Gateway API Inference Extension) over the leaders' OpenAI HTTP port.
"""

from __future__ import annotations

import hashlib
import json

from kubellm.api.spec import DEFAULT_IMAGE, WORKER_LIMITS, EngineSpec, LLMDeploymentSpec
from kubellm.operator import network_policy
# Names, labels and ports live in naming.py (network_policy.py builds on them too); re-exported as R.*.
from kubellm.operator.naming import (CONTROL_PORT, GROUP_LABEL, GRPC_PORT_NAME, HTTP_PORT,  # noqa: F401
                                     HTTP_PORT_NAME, MANAGED_BY, MASTER_PORT, METRICS_PORT, METRICS_PORT_NAME,
                                     POD_INDEX_LABEL, REST_PORT_NAME, Owner, config_name, group_name, labels,
                                     leader_selector, leaders_name, metadata, router_name, selector)

MODELS_MOUNT = "/models"
# Where LoRA adapters that are not on the model's volume are: pvc:// claims (one volume each) and hf:// downloads
# when the model itself is not downloaded (else they go beside it, in its cache PVC when it has one).
ADAPTERS_MOUNT = "/adapters"
# Every container runs with a read-only root filesystem; /tmp (an emptyDir) is its one scratch space and
# HOME points there, so what writes under ~ (Triton's and CUDA's kernel caches, ~/.cache) writes there.
SCRATCH = "/tmp"
CONFIG_MOUNT = "/etc/kubellm"
SPEC_HASH = "kubellm.io/spec-hash"
# An endpoint picker reads each pod's metrics by the names of the engine this label names; workers export
# vLLM's. GIE's picker reads the first label, llm-d's router the second (the first as its fallback).
ENGINE_TYPE_LABELS = {"inference.networking.k8s.io/engine-type": "vllm", "llm-d.ai/engine-type": "vllm"}
INFERENCE_POOL_API, INFERENCE_POOL_KIND = "inference.networking.k8s.io/v1", "InferencePool"
INFERENCE_POOL_CRD = "inferencepools.inference.networking.k8s.io"


# -- names and endpoints ----------------------------------------------------------------------
def service_host(owner: Owner, service: str) -> str:
    return f"{service}.{owner.namespace}.svc.cluster.local"


def grpc_endpoint(owner: Owner, spec: LLMDeploymentSpec) -> str:
    return f"{service_host(owner, owner.name)}:{spec.router.port}"


def rest_endpoint(owner: Owner, spec: LLMDeploymentSpec) -> str:
    if not spec.restApi.enabled:
        return ""
    ingress = spec.restApi.ingress
    if ingress and ingress.host:
        return f"{'https' if ingress.tlsSecretName else 'http'}://{ingress.host}"
    scheme = "https" if spec.router.tlsSecretName else "http"
    return f"{scheme}://{service_host(owner, owner.name)}:{spec.restApi.port}"


# -- the workers' pods ------------------------------------------------------------------------
def worker_spec_hash(spec: LLMDeploymentSpec) -> str:
    """Changes exactly when the worker pods must be replaced (everything but replicas and the autoscaler that
    sets them, router, the InferencePool, which only selects the pods, the NetworkPolicies, separate objects,
    the router's limits, and the operator's restart budget)."""
    relevant = spec.model_dump(mode="json", exclude={"replicas", "autoscaling", "router", "inferencePool",
                                                     "networkPolicy", "maxGroupRestarts", "groupRestartWindowSeconds"})
    relevant["restApi"] = None  # served by the router, not the workers
    relevant["limits"] = {k: v for k, v in relevant["limits"].items() if k in WORKER_LIMITS}
    # Fields added to spec.engine (and spec.adapters) after the first ones count only once set: an operator upgrade
    # must not roll every group whose spec did not change.
    defaults = EngineSpec().model_dump(mode="json")
    for name in set(defaults) - set(FIRST_ENGINE_FIELDS):
        if relevant["engine"][name] == defaults[name]:
            del relevant["engine"][name]
    if not relevant["adapters"]:
        del relevant["adapters"]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# spec.engine's fields before LoRA and the engine options of issues 17 and 19 (see worker_spec_hash).
FIRST_ENGINE_FIELDS = ("dtype", "maxBatchSize", "maxNumBatchedTokens", "kvCacheFraction", "blockSize", "sessionLen",
                       "enablePrefixCaching")


# -- drain ------------------------------------------------------------------------------------
# Seconds past preStop + the drain timeout before the kubelet kills the process: its ports' last replies
# and the exit itself (the worker's engine thread, the router's channels).
DRAIN_MARGIN_SECONDS = 5


def drain_lifecycle(spec: LLMDeploymentSpec) -> dict:
    """A worker's or router's container `lifecycle`: a preStop sleep (Kubernetes' own, no shell needed), so
    that the pod leaves its Services' endpoints, and the router's leader list, before SIGTERM makes the
    process drain; none when spec.drain.preStopSeconds is 0."""
    seconds = spec.drain.preStopSeconds
    return {"preStop": {"sleep": {"seconds": seconds}}} if seconds else {}


def termination_grace_seconds(spec: LLMDeploymentSpec) -> int:
    """The pod's terminationGracePeriodSeconds: the preStop sleep and the drain timeout both fit in it."""
    return spec.drain.preStopSeconds + spec.drain.timeoutSeconds + DRAIN_MARGIN_SECONDS


def _with_lifecycle(container: dict, spec: LLMDeploymentSpec) -> dict:
    lifecycle = drain_lifecycle(spec)
    return {**container, "lifecycle": lifecycle} if lifecycle else container


# -- workers ----------------------------------------------------------------------------------
def model_path(spec: LLMDeploymentSpec) -> str:
    """Where the worker finds the model inside its container."""
    model = spec.model
    if model.kind == "hf":
        repo = model.source.removeprefix("hf://").split("@")[0]
        return f"{MODELS_MOUNT}/hf/{repo}"
    if model.kind == "pvc":
        _, _, path = model.source.removeprefix("pvc://").partition("/")
        return f"{MODELS_MOUNT}/{path}".rstrip("/")
    return model.source  # a path in the image, or a known model name


def _download_env(spec: LLMDeploymentSpec, mount: str) -> list[dict]:
    """A download init container's environment: huggingface_hub's cache and token lookups (HF_HOME) next to the
    download, not under HOME; spec.model's token and endpoint (the adapters' hf:// downloads use them too)."""
    model = spec.model
    env = [*scratch_env(), {"name": "HF_HOME", "value": f"{mount}/.hf-home"},
           {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if model.tokenSecret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": model.tokenSecret, "key": "HF_TOKEN"}}})
    if model.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": model.endpoint})
    return env


def _download_container(spec: LLMDeploymentSpec, name: str, source: str, dest: str, volume: str, mount: str,
                        adapter: bool = False) -> dict:
    return {"name": name, "image": spec.image or DEFAULT_IMAGE, "imagePullPolicy": spec.imagePullPolicy,
            "command": ["kubellm", "models", "download", source, "--dest", dest, *(["--adapter"] if adapter else [])],
            "env": _download_env(spec, mount), "volumeMounts": [{"name": volume, "mountPath": mount}, scratch_mount()],
            "securityContext": container_security_context()}


def _model_volume(spec: LLMDeploymentSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, worker volumeMounts, init containers) for the model source."""
    model = spec.model
    if model.kind == "pvc":
        claim = model.source.removeprefix("pvc://").split("/")[0]
        return ([{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
                [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}], [])
    if model.kind != "hf":
        return [], [], []
    volume = ({"name": "models", "persistentVolumeClaim": {"claimName": model.cachePVC}} if model.cachePVC
              else {"name": "models", "emptyDir": {}})
    download = _download_container(spec, "download-model", model.source, model_path(spec), "models", MODELS_MOUNT)
    return [volume], [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}], [download]


# -- LoRA adapters ----------------------------------------------------------------------------
def _model_claim(spec: LLMDeploymentSpec) -> str | None:
    return spec.model.source.removeprefix("pvc://").split("/")[0] if spec.model.kind == "pvc" else None


def _claim_and_path(source: str) -> tuple[str, str]:
    claim, _, path = source.removeprefix("pvc://").partition("/")
    return claim, path


def adapter_claims(spec: LLMDeploymentSpec) -> list[str]:
    """The PVCs the adapters are on, each once, in spec order, except the model's own (already mounted)."""
    claims: list[str] = []
    for adapter in spec.adapters:
        claim = _claim_and_path(adapter.source)[0] if adapter.kind == "pvc" else None
        if claim and claim != _model_claim(spec) and claim not in claims:
            claims.append(claim)
    return claims


def _hf_adapters_on_model_volume(spec: LLMDeploymentSpec) -> bool:
    """hf:// adapters are downloaded beside an hf:// model (its cache PVC keeps them too), else to their own
    emptyDir."""
    return spec.model.kind == "hf"


def adapter_paths(spec: LLMDeploymentSpec) -> dict[str, str]:
    """Where the worker finds each adapter inside its container, by name (its `--lora NAME=PATH` flags)."""
    paths = {}
    for adapter in spec.adapters:
        if adapter.kind == "hf":
            base = f"{MODELS_MOUNT}/adapters" if _hf_adapters_on_model_volume(spec) else ADAPTERS_MOUNT
            paths[adapter.name] = f"{base}/hf/{adapter.source.removeprefix('hf://')}"
        elif adapter.kind == "pvc":
            claim, path = _claim_and_path(adapter.source)
            base = MODELS_MOUNT if claim == _model_claim(spec) else f"{ADAPTERS_MOUNT}/pvc/{claim}"
            paths[adapter.name] = f"{base}/{path}".rstrip("/")
        else:
            paths[adapter.name] = adapter.source   # a path in the image
    return paths


def _adapter_volumes(spec: LLMDeploymentSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, worker volumeMounts, init containers) for spec.adapters: a read-only volume per PVC the model's does
    not cover, and a download init container per hf:// adapter (as the model's: the workers stay offline)."""
    volumes, mounts, inits = [], [], []
    for i, claim in enumerate(adapter_claims(spec)):
        volumes.append({"name": f"adapters-pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"adapters-pvc-{i}", "mountPath": f"{ADAPTERS_MOUNT}/pvc/{claim}", "readOnly": True})
    downloads = [a for a in spec.adapters if a.kind == "hf"]
    if not downloads:
        return volumes, mounts, inits
    if _hf_adapters_on_model_volume(spec):
        volume, mount = "models", MODELS_MOUNT
    else:
        volume, mount = "adapters", ADAPTERS_MOUNT
        volumes.append({"name": "adapters", "emptyDir": {}})
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_MOUNT, "readOnly": True})
    paths = adapter_paths(spec)
    for i, adapter in enumerate(downloads):
        inits.append(_download_container(spec, f"download-adapter-{i}", adapter.source, paths[adapter.name], volume,
                                         mount, adapter=True))
    return volumes, mounts, inits


def container_security_context() -> dict:
    """What the `restricted` Pod Security Standard asks of every container, and a read-only root
    filesystem: what a container writes goes to its emptyDir volumes (scratch_mount(), /dev/shm, /models)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "readOnlyRootFilesystem": True, "seccompProfile": {"type": "RuntimeDefault"}}


def scratch_volume() -> dict:
    return {"name": "tmp", "emptyDir": {}}


def scratch_mount() -> dict:
    return {"name": "tmp", "mountPath": SCRATCH}


def scratch_env() -> list[dict]:
    """HOME on the scratch volume: the images' home directories are on the read-only root."""
    return [{"name": "HOME", "value": SCRATCH}]


def pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(spec: LLMDeploymentSpec) -> dict:
    requests = dict(spec.resources.requests)
    limits = dict(spec.resources.limits)
    if spec.device == "gpu":
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = spec.gpus_per_pod
    return {"requests": requests, "limits": limits}


def worker_statefulset(owner: Owner, spec: LLMDeploymentSpec, index: int) -> dict:
    name = group_name(owner, index)
    group_labels = {GROUP_LABEL: str(index)}
    volumes, mounts, init_containers = _model_volume(spec)
    adapter_volumes, adapter_mounts, adapter_inits = _adapter_volumes(spec)
    volumes += adapter_volumes
    mounts += adapter_mounts
    init_containers += adapter_inits
    volumes += [{"name": "config", "configMap": {"name": config_name(owner)}},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL needs a large /dev/shm
                scratch_volume()]
    mounts += [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
               {"name": "dshm", "mountPath": "/dev/shm"}, scratch_mount()]
    port = spec.router.port
    env = [
        {"name": "POD_INDEX", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}},
        {"name": "WORLD_SIZE", "value": str(spec.world_size)},
        {"name": "KUBELLM_GPUS_PER_POD", "value": str(spec.gpus_per_pod)},
        {"name": "MASTER_ADDR", "value": f"{name}-0.{service_host(owner, name)}"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "KUBELLM_DEPLOYMENT", "value": owner.name},
        # LeaderWorkerSet's names and values (sigs.k8s.io/lws: <leader hostname>.<subdomain>.<namespace>, the
        # pods in the group, this pod's index in it), so tools written for LWS groups run unchanged.
        {"name": "LWS_LEADER_ADDRESS", "value": f"{name}-0.{name}.{owner.namespace}"},
        {"name": "LWS_GROUP_SIZE", "value": str(spec.pods_per_group)},
        {"name": "LWS_WORKER_INDEX", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}},
        *scratch_env(),
        # The worker reads local files only (the model is in the image or on /models): never the Hub.
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf-home"}, {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    container = {
        "name": "worker", "image": spec.image or DEFAULT_IMAGE, "imagePullPolicy": spec.imagePullPolicy,
        # Requests' `model` and the metrics' model_name are the deployment's name, as vLLM's --served-model-name.
        "command": ["kubellm", *spec.runtime_settings().worker_args(
            model_path(spec), CONFIG_MOUNT, port=port, metrics_port=METRICS_PORT, http_port=HTTP_PORT,
            served_model_name=owner.name, drain_timeout=spec.drain.timeoutSeconds, adapters=adapter_paths(spec))],
        "env": env,
        "ports": [{"name": GRPC_PORT_NAME, "containerPort": port}, {"name": "dist", "containerPort": MASTER_PORT},
                  {"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT},
                  {"name": HTTP_PORT_NAME, "containerPort": HTTP_PORT}],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # Loading a large model takes minutes: the startup probe allows startupTimeoutSeconds.
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 10,
                         "failureThreshold": max(1, spec.startupTimeoutSeconds // 10)},
        "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"grpc": {"port": port}, "periodSeconds": 15, "failureThreshold": 4},
    }
    pod_spec = {
        "securityContext": pod_security_context(),
        "initContainers": init_containers,
        "containers": [_with_lifecycle(container, spec)],
        "volumes": volumes,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "automountServiceAccountToken": False,
    }
    if spec.nodeSelector:
        pod_spec["nodeSelector"] = spec.nodeSelector
    if spec.tolerations:
        pod_spec["tolerations"] = spec.tolerations
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.priorityClassName:
        pod_spec["priorityClassName"] = spec.priorityClassName
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": metadata(owner, name, "worker", **group_labels),
        "spec": {
            "replicas": spec.pods_per_group,
            "serviceName": name,
            "podManagementPolicy": "Parallel",  # all ranks start together; they wait for each other anyway
            # A group is replaced as a whole by the operator: rolling one rank breaks torch.distributed.
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": selector(owner, "worker", **group_labels)},
            "template": {
                "metadata": {"labels": labels(owner, "worker", **group_labels, **ENGINE_TYPE_LABELS),
                             "annotations": {SPEC_HASH: worker_spec_hash(spec)}},
                "spec": pod_spec,
            },
        },
    }


def group_service(owner: Owner, spec: LLMDeploymentSpec, index: int) -> dict:
    """Headless: gives every rank a stable DNS name; rank 0's is MASTER_ADDR."""
    group_labels = {GROUP_LABEL: str(index)}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": metadata(owner, group_name(owner, index), "worker", **group_labels),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": selector(owner, "worker", **group_labels),
                     "ports": [{"name": "dist", "port": MASTER_PORT, "targetPort": MASTER_PORT},
                               {"name": GRPC_PORT_NAME, "port": spec.router.port, "targetPort": spec.router.port}]}}


def leaders_service(owner: Owner, spec: LLMDeploymentSpec) -> dict:
    """Headless over the ready rank-0 pods: the router resolves it to find replica leaders."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(owner, leaders_name(owner), "worker"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": False,
                     "selector": leader_selector(owner),
                     "ports": [{"name": GRPC_PORT_NAME, "port": spec.router.port, "targetPort": spec.router.port},
                               {"name": HTTP_PORT_NAME, "port": HTTP_PORT, "targetPort": HTTP_PORT}]}}


def inference_pool_name(owner: Owner) -> str:
    return owner.name


def inference_pool(owner: Owner, spec: LLMDeploymentSpec) -> dict | None:
    """The InferencePool (inference.networking.k8s.io/v1) over the leaders' OpenAI HTTP port, or None when
    spec.inferencePool is off. A Gateway's HTTPRoute sends requests to it; its endpoint picker (when named)
    chooses the pod, reading the leaders' vllm: metrics."""
    if not spec.inferencePool.enabled:
        return None
    body: dict = {"selector": {"matchLabels": leader_selector(owner)}, "targetPorts": [{"number": HTTP_PORT}]}
    picker = spec.inferencePool.endpointPickerRef
    if picker:
        body["endpointPickerRef"] = {"kind": "Service", "name": picker.name, "port": {"number": picker.port},
                                     "failureMode": picker.failureMode}
    return {"apiVersion": INFERENCE_POOL_API, "kind": INFERENCE_POOL_KIND,
            "metadata": metadata(owner, inference_pool_name(owner), "inference-pool"), "spec": body}


# -- router, service, ingress -----------------------------------------------------------------
# Where the router pod finds its Secrets (secret volumes: the kubelet updates their files when the Secret
# changes, and the router re-reads the keys, so a rotation needs no restart and no hash in the pod template).
API_KEYS_MOUNT = f"{CONFIG_MOUNT}/api-keys"
TLS_MOUNT = f"{CONFIG_MOUNT}/tls"
# Owner and group read (the pod's fsGroup), nobody else: the mounted keys are the router process's alone.
SECRET_FILE_MODE = 0o440


def router_security_flags(spec: LLMDeploymentSpec) -> list[str]:
    """`kubellm router` flags for API keys and TLS: paths of mounted files only, never a key (the process list
    and `kubectl describe` show the command)."""
    flags = []
    if spec.restApi.apiKeySecret:
        flags += ["--api-keys-dir", API_KEYS_MOUNT]
    if spec.router.tlsSecretName:
        flags += ["--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key"]
    return flags


def router_limit_flags(spec: LLMDeploymentSpec) -> list[str]:
    """`kubellm router` flags for spec.limits (the workers get theirs through runtime_settings; the REST gateway
    refuses a request of too many prompts too, before reading it)."""
    limits = spec.limits
    flags = ["--max-request-bytes", str(limits.maxRequestBytes),
             "--max-streams-per-connection", str(limits.maxConcurrentStreamsPerConnection),
             "--max-prompts-per-request", str(limits.maxPromptsPerRequest)]
    if limits.rateLimit is not None:
        flags += ["--rate-limit", repr(float(limits.rateLimit.requestsPerSecond)),
                  "--rate-limit-burst", str(limits.rateLimit.burst_or_default)]
    return flags


def router_secret_volumes(spec: LLMDeploymentSpec) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts) of the router's Secrets: the API keys (every key of the Secret, a file each) and
    the TLS pair."""
    volumes, mounts = [], []
    for name, secret, path in (("api-keys", spec.restApi.apiKeySecret, API_KEYS_MOUNT),
                               ("tls", spec.router.tlsSecretName, TLS_MOUNT)):
        if secret:
            volumes.append({"name": name, "secret": {"secretName": secret, "defaultMode": SECRET_FILE_MODE}})
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def router_probes(spec: LLMDeploymentSpec) -> dict:
    """HTTP on the metrics port (plain HTTP whatever the public ports serve: the kubelet's gRPC probe speaks no
    TLS): /readyz is NOT_SERVING while no worker is healthy (unless it scales from zero), /livez is the
    process."""
    return {"readinessProbe": {"httpGet": {"path": "/readyz", "port": METRICS_PORT_NAME}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/livez", "port": METRICS_PORT_NAME}, "periodSeconds": 15}}


def router_deployment(owner: Owner, spec: LLMDeploymentSpec, image: str | None = None) -> dict:
    """`image`: the router's (the operator's KUBELLM_ROUTER_IMAGE, the chart's routerImage: no torch).
    Without one the router runs the workers' image, which holds `kubellm router` too."""
    port = spec.router.port
    command = ["kubellm", "router", "--deployment-name", owner.name,
               "--leaders", f"dns:///{service_host(owner, leaders_name(owner))}:{port}", "--port", str(port),
               "--metrics-port", str(METRICS_PORT), "--policy", spec.router.policy,
               "--prefix-length", str(spec.router.prefixLength), "--load-factor", repr(float(spec.router.loadFactor)),
               "--drain-timeout", str(spec.drain.timeoutSeconds), "--model-name", spec.model.display,
               *router_limit_flags(spec), *router_security_flags(spec)]
    if spec.autoscaling and spec.autoscaling.minReplicas == 0:
        # Scale from zero: the router stays ready with no replica and holds requests while the first group
        # starts; the ones it holds are the autoscaler's signal (kubellm_router_requests_waiting).
        command += ["--scale-from-zero", "--wait-for-replica", str(spec.autoscaling.scaleFromZeroTimeoutSeconds)]
    ports = [{"name": GRPC_PORT_NAME, "containerPort": port}, {"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT}]
    if spec.restApi.enabled:
        command += ["--rest-port", str(spec.restApi.port)]
        ports.append({"name": REST_PORT_NAME, "containerPort": spec.restApi.port})
    secret_volumes, secret_mounts = router_secret_volumes(spec)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(owner, router_name(owner), "router"),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector(owner, "router")},
            "template": {
                "metadata": {"labels": labels(owner, "router")},
                "spec": {
                    "securityContext": pod_security_context(),
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": termination_grace_seconds(spec),
                    "containers": [_with_lifecycle({
                        "name": "router", "image": image or spec.image or DEFAULT_IMAGE,
                        "imagePullPolicy": spec.imagePullPolicy,
                        "command": command, "ports": ports, "env": scratch_env(),
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                        "volumeMounts": [scratch_mount(), *secret_mounts],
                        "securityContext": container_security_context(),
                        **router_probes(spec),
                    }, spec)],
                    "volumes": [scratch_volume(), *secret_volumes],
                },
            },
        },
    }


def router_service(owner: Owner, spec: LLMDeploymentSpec) -> dict:
    ports = [{"name": GRPC_PORT_NAME, "port": spec.router.port, "targetPort": GRPC_PORT_NAME, "appProtocol": "grpc"}]
    if spec.restApi.enabled:
        # With router.tlsSecretName the REST port serves TLS: controllers that read appProtocol (Gateway API
        # implementations, Traefik) then speak HTTPS to it.
        ports.append({"name": REST_PORT_NAME, "port": spec.restApi.port, "targetPort": REST_PORT_NAME,
                      "appProtocol": "https" if spec.router.tlsSecretName else "http"})
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(owner, owner.name, "router"),
            "spec": {"type": "ClusterIP", "selector": selector(owner, "router"), "ports": ports}}


def ingress(owner: Owner, spec: LLMDeploymentSpec) -> dict | None:
    cfg = spec.restApi.ingress
    if not (spec.restApi.enabled and cfg):
        return None
    rule = {"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
        "service": {"name": owner.name, "port": {"name": REST_PORT_NAME}}}}]}}
    if cfg.host:
        rule["host"] = cfg.host
    body = {"rules": [rule]}
    if cfg.className:
        body["ingressClassName"] = cfg.className
    if cfg.tlsSecretName:
        body["tls"] = [{"secretName": cfg.tlsSecretName, **({"hosts": [cfg.host]} if cfg.host else {})}]
    meta = metadata(owner, owner.name, "gateway")
    if cfg.annotations:
        meta["annotations"] = dict(cfg.annotations)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": body}


def engine_configmap(owner: Owner, spec: LLMDeploymentSpec) -> dict:
    """The worker's config files (CONFIG_MOUNT), written from the spec's runtime settings."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(owner, config_name(owner), "worker"),
            "data": spec.runtime_settings().files()}


def worker_pdb(owner: Owner, spec: LLMDeploymentSpec) -> dict:
    """At most one worker pod (so one group) voluntarily disrupted at a time."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": metadata(owner, f"{owner.name}-workers", "worker"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner, "worker")}}}


def children(owner: Owner, spec: LLMDeploymentSpec, router_image: str | None = None,
             groups: list[int] | None = None, operator: network_policy.OperatorPods | None = None) -> list[dict]:
    """Every child manifest, in apply order (config before the pods that mount it, the NetworkPolicies before
    the pods they select); `router_image`: see router_deployment; `groups`: the replica group indices
    (groups.choose_groups; default 0..replicas-1); `operator`: the operator's pods, which the policies admit to
    /metrics."""
    indices = list(range(spec.replicas) if groups is None else groups)
    objs = [engine_configmap(owner, spec), *network_policy.network_policies(owner, spec, indices, operator)]
    for i in indices:
        objs += [group_service(owner, spec, i), worker_statefulset(owner, spec, i)]
    objs += [leaders_service(owner, spec), router_deployment(owner, spec, router_image), router_service(owner, spec),
             worker_pdb(owner, spec)]
    ing = ingress(owner, spec)
    if ing:
        objs.append(ing)
    return objs
