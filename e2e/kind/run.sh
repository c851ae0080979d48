#!/usr/bin/env bash
# kubellm on a kind cluster with real pods: build and load the images (operator, router, CPU runtime),
# install the chart, serve SmolLM2 on CPU with 2 replicas, query it over gRPC and REST, uninstall, delete the cluster.
# Needs docker, kind, kubectl, helm, and `pip install -e '.[router]' openai` (for query.py).
# Every step is tested without Docker too: the chart and the CPU LLMDeployment on a real control
# plane (e2e/test_helm.py), the Dockerfiles statically (tests/charts/test_chart.py), query.sh against
# local worker and router processes. KEEP=1 keeps the cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
cluster=${KIND_CLUSTER:-kubellm}
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/kubellm/Chart.yaml)
operator_image=ghcr.io/kubellm/operator:$version
router_image=ghcr.io/kubellm/router:$version
runtime_image=ghcr.io/kubellm/runtime:$version-cpu
ns=llm
step() { printf '\n=== %s\n' "$*"; }

cleanup() {
    rc=$?
    if [ "$rc" != 0 ]; then
        step "failed ($rc): state"
        kubectl get llmd,pods,svc -A -o wide || true
        kubectl describe llmd -n "$ns" || true
        kubectl logs -n kubellm-system deploy/kubellm --tail=100 || true
        kubectl logs -n "$ns" -l app.kubernetes.io/part-of=kubellm --all-containers --tail=50 || true
    fi
    [ -n "${forward:-}" ] && kill "$forward" 2>/dev/null
    [ "${KEEP:-0}" = 1 ] || kind delete cluster --name "$cluster"
    exit "$rc"
}
trap cleanup EXIT

step "kind cluster $cluster"
kind create cluster --name "$cluster" --wait 120s

step "images $operator_image, $router_image, $runtime_image"
docker build -f docker/operator.Dockerfile -t "$operator_image" .
docker build -f docker/router.Dockerfile -t "$router_image" .
docker build -f docker/runtime-cpu.Dockerfile -t "$runtime_image" .
kind load docker-image --name "$cluster" "$operator_image" "$router_image" "$runtime_image"

step "helm install"
helm install kubellm charts/kubellm --namespace kubellm-system --create-namespace \
     --set runtimeImage.tag="$version-cpu" --wait --timeout 5m
helm test kubellm --namespace kubellm-system --timeout 5m

step "LLMDeployment smollm2 (CPU, 2 replicas) in namespace $ns (restricted Pod Security Standard)"
kubectl create namespace "$ns"
kubectl label namespace "$ns" pod-security.kubernetes.io/enforce=restricted
kubectl apply -n "$ns" -f e2e/kind/smollm2-cpu.yaml
kubectl wait -n "$ns" llmd/smollm2 --for=jsonpath='{.status.phase}'=Ready --timeout=15m
kubectl get llmd -n "$ns"

step "query through the router"
kubectl port-forward -n "$ns" svc/smollm2 50051:50051 28080:28080 >/dev/null &
forward=$!
for _ in $(seq 30); do curl -s -o /dev/null localhost:28080/v1/models && break; sleep 1; done
bash e2e/kind/query.sh 127.0.0.1:50051 http://127.0.0.1:28080 smollm2 2

step "uninstall"
kubectl delete -n "$ns" llmd/smollm2 --wait --timeout=2m
helm uninstall kubellm --namespace kubellm-system --wait
step "ok"
