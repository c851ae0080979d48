"""Operator benchmark on the local control plane: `python e2e/bench_operator.py [--count 100]`.

Prints: time from `kubectl apply` to every child created; time from all worker pods Ready to
`.status.phase: Ready`; time to reconcile N LLMDeployments to Ready, and the operator's peak
memory (VmHWM) while doing it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as local  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def manifest(name: str, **spec) -> str:
    return json.dumps({"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
                       "spec": {"model": {"source": "/models/tiny"}, **spec}})


def poll(predicate, timeout=300, interval=0.05):
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    with local.LocalCluster(gpu_nodes=4, gpus_per_node=64) as c:
        c.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "llmdeployments.kubellm.io.yaml"))
        c.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.kubellm.io")
        c.create_namespace("bench")
        with c.operator(c.dir / "operator.log") as op:
            time.sleep(3)  # operator start-up is not part of the figures
            get = lambda *what: json.loads(c.kubectl("get", "-n", "bench", *what, "-o", "json").stdout)["items"]
            start = time.perf_counter()
            c.kubectl("apply", "-n", "bench", "-f", "-", input=manifest(
                "one", tensorParallel=2, replicas=2, restApi={"enabled": True, "ingress": {"host": "x.example"}}))
            poll(lambda: len(get("statefulsets,services,deployments,ingresses,configmaps,poddisruptionbudgets",
                                 "-l", "app.kubernetes.io/instance=one")) == 10)
            created = time.perf_counter() - start
            poll(lambda: (lambda pods: len(pods) == 2 and all(
                any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))
                for p in pods))(get("pods", "-l", "app.kubernetes.io/instance=one,app.kubernetes.io/component=worker")))
            pods_ready = time.perf_counter()
            poll(lambda: json.loads(c.kubectl("get", "llmd", "one", "-n", "bench", "-o", "json").stdout)
                 .get("status", {}).get("phase") == "Ready")
            status_lag = time.perf_counter() - pods_ready

            names = [f"m{i:03d}" for i in range(args.count)]
            start = time.perf_counter()
            c.kubectl("apply", "-n", "bench", "-f", "-", input="\n---\n".join(manifest(n) for n in names))
            poll(lambda: sum(d.get("status", {}).get("phase") == "Ready" for d in get("llmd")) == args.count + 1,
                 timeout=1800, interval=1)
            many = time.perf_counter() - start
            print(f"Kubernetes {c.versions['K8S_VERSION']} (local control plane, KWOK nodes), operator timer 1 s")
            print(f"apply -> all 10 children created (TP=2, 2 replicas, REST+Ingress): {created:.2f} s")
            print(f"worker pods Ready -> status Ready:                               {status_lag:.2f} s")
            print(f"{args.count} LLMDeployments applied at once -> all Ready:           {many:.1f} s")
            print(f"operator peak memory (VmHWM):                                    {peak_rss_mib(op.proc.pid):.0f} MiB")


if __name__ == "__main__":
    main()
