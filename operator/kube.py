"""The operator's one path to the API server: server-side apply, list, delete.

An apply is skipped when the live object already carries the hash of the desired manifest,
so reconciling an unchanged spec sends no writes at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

FIELD_MANAGER = "kubellm-operator"
APPLIED_HASH = "kubellm.io/applied-hash"
# Node GPU capacity changes when nodes are added or removed, rarely: one list serves every
# LLMDeployment's refresh for this long (instead of a list per object every timer tick).
NODE_CAPACITY_TTL = 30.0
# A failed rank's log, quoted in the GroupFailed condition: its last lines, bounded, read within seconds.
LOG_TAIL_LINES, LOG_LIMIT_BYTES, LOG_TIMEOUT = 20, 4096, 3.0

log = logging.getLogger("kubellm.operator")


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


def largest_gpu_offer(nodes: Iterable) -> int:
    """The most `nvidia.com/gpu` any schedulable node (a kubernetes.client V1Node) offers; 0 when none does."""
    return max((int((node.status.allocatable or {}).get("nvidia.com/gpu", "0"))
                for node in nodes if not node.spec.unschedulable), default=0)


class NodeGpuCapacity:
    """The largest GPU offer of any schedulable node, listed at most once per `ttl` seconds for all
    callers. kopf runs synchronous handlers in a thread pool: the lock makes concurrent refreshes
    wait for one list rather than each sending its own."""

    def __init__(self, list_nodes: Callable[[], Iterable], ttl: float = NODE_CAPACITY_TTL,
                 clock: Callable[[], float] = time.monotonic):
        self._list_nodes, self.ttl, self._clock = list_nodes, ttl, clock
        self._lock = threading.Lock()
        self._listed: tuple[float, int] | None = None   # (when, largest offer)

    def largest(self) -> int:
        with self._lock:
            now = self._clock()
            if self._listed is None or now - self._listed[0] >= self.ttl:
                # A list that fails raises here and is tried again by the next call.
                self._listed = (now, largest_gpu_offer(self._list_nodes()))
            return self._listed[1]


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None):
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.dynamic = DynamicClient(api_client)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.writes = 0  # applies and deletes actually sent, for tests and metrics
        self.node_gpus = NodeGpuCapacity(lambda: self.core.list_node().items)

    def resource(self, api_version: str, kind: str):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def served(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves `kind` (a CRD may not be installed). Discovery is cached; a kind it
        lacks is looked up afresh, so a CRD installed later is found on the next call."""
        try:
            self.resource(api_version, kind)
            return True
        except ResourceNotFoundError:
            return False

    def rediscover(self) -> None:
        """Drop the cached discovery: a kind it holds may have gone (its CRD deleted)."""
        self.dynamic.resources.invalidate_cache()

    def get(self, api_version: str, kind: str, name: str, namespace: str) -> dict | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def apply(self, manifest: dict) -> bool:
        """Server-side apply `manifest` unless the live object is already this exact manifest."""
        desired = json.loads(json.dumps(manifest))
        digest = manifest_hash(desired)
        meta = desired["metadata"]
        live = self.get(desired["apiVersion"], desired["kind"], meta["name"], meta["namespace"])
        if live and (live["metadata"].get("annotations") or {}).get(APPLIED_HASH) == digest:
            return False
        meta.setdefault("annotations", {})[APPLIED_HASH] = digest
        self.resource(desired["apiVersion"], desired["kind"]).server_side_apply(
            body=desired, name=meta["name"], namespace=meta["namespace"], field_manager=FIELD_MANAGER,
            force_conflicts=True)
        self.writes += 1
        log.info("applied %s %s/%s", desired["kind"], meta["namespace"], meta["name"])
        return True

    def list(self, api_version: str, kind: str, namespace: str, label_selector: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        items = self.resource(api_version, kind).get(namespace=namespace, label_selector=selector).items
        return [item.to_dict() for item in items]

    def delete(self, api_version: str, kind: str, name: str, namespace: str) -> None:
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace,
                                                    body={"propagationPolicy": "Background"})
            self.writes += 1
        except ApiException as err:
            if err.status != 404:
                raise

    def scale(self, group: str, version: str, plural: str, name: str, namespace: str, replicas: int) -> None:
        """Set spec.replicas through the scale subresource, as an HPA or `kubectl scale` does (the autoscaler)."""
        self.custom.patch_namespaced_custom_object_scale(group, version, namespace, plural, name,
                                                         body={"spec": {"replicas": replicas}})
        self.writes += 1

    def pod_log(self, name: str, namespace: str, container: str = "worker", previous: bool = False,
                tail_lines: int = LOG_TAIL_LINES, limit_bytes: int = LOG_LIMIT_BYTES,
                timeout: float = LOG_TIMEOUT) -> tuple[str, str]:
        """(the container's last log lines, "") or ("", why they could not be read), through `pods/log`;
        `previous`: the container instance that exited (a restarted one). Never raises, and gives up
        after `timeout` seconds: a log is a diagnosis, never worth a stuck reconcile."""
        try:
            text = self.core.read_namespaced_pod_log(
                name, namespace, container=container, previous=previous, tail_lines=tail_lines,
                limit_bytes=limit_bytes, _request_timeout=timeout)
            return (text if isinstance(text, str) else str(text)), ""
        except ApiException as err:
            detail = err.body if isinstance(err.body, str) else ""
            try:
                detail = json.loads(detail).get("message", detail)
            except (ValueError, AttributeError):
                pass
            return "", f"{err.status} {err.reason}{': ' + detail[:300] if detail else ''}"
        except Exception as err:  # noqa: BLE001 - a timeout, a refused connection: say so, never crash
            return "", f"{type(err).__name__}: {str(err)[:300]}"

    def max_node_gpus(self) -> int:
        """The most `nvidia.com/gpu` any schedulable node offers (0 when none does), at most
        NODE_CAPACITY_TTL seconds old."""
        return self.node_gpus.largest()
