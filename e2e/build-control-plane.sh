#!/usr/bin/env bash
# Build a real Kubernetes control plane from Go modules, for the e2e tests:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#   kubelet, kube-proxy                                                (k8s.io/kubernetes)
#   etcd                                                               (go.etcd.io/etcd/server/v3)
#   coredns (cluster DNS of the real node: kubernetes, health, ready)  (github.com/coredns/coredns)
#   kwok                                                               (sigs.k8s.io/kwok)
#   helm                                                               (helm.sh/helm/v3)
#   grpcurl (reflection and JSON calls against workers and routers)     (github.com/fullstorydev/grpcurl)
# into ${KUBELLM_E2E_CACHE:-~/.cache/kubellm/e2e}/<K8S_VERSION>/bin (never inside the repo), and the
# InferencePool CRD (config/crd/bases of sigs.k8s.io/gateway-api-inference-extension) and KEDA's
# ScaledObject and (Cluster)TriggerAuthentication CRDs (config/crd/bases of github.com/kedacore/keda/v2)
# into .../crds.
#
# Idempotent: a binary whose stamp file matches the wanted version is reused, so a second run
# takes well under a second. Needs only Go and access to the Go module proxy (no Docker, no GitHub).
# Versions live in e2e/versions.env; each may be overridden from the environment.
#
# Usage: e2e/build-control-plane.sh [--check] [--print-bin-dir] [--download] [--force]
#   --download       only fetch the Go modules the Kubernetes and etcd builds need (light on CPU)
#   --check          exit 0 if every binary is present and current, 1 otherwise; builds nothing
#   --print-bin-dir  print the bin directory and exit
#   --force          rebuild everything
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Environment wins over versions.env.
for var in K8S_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION COREDNS_VERSION GRPCURL_VERSION GIE_VERSION KEDA_VERSION; do
  declare "_env_$var=${!var-}"
done
# shellcheck source=versions.env
source "$here/versions.env"
for var in K8S_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION COREDNS_VERSION GRPCURL_VERSION GIE_VERSION KEDA_VERSION; do
  envname="_env_$var"
  if [[ -n "${!envname}" ]]; then declare "$var=${!envname}"; fi
done

cache="${KUBELLM_E2E_CACHE:-$HOME/.cache/kubellm/e2e}"
root="$cache/$K8S_VERSION"
bin="$root/bin"
src="$root/src"
log="$root/build.log"

mode=build
force=0
for arg in "$@"; do
  case "$arg" in
    --check) mode=check ;;
    --print-bin-dir) echo "$bin"; exit 0 ;;
    --force) force=1 ;;
    --download) mode=download ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

k8s_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
all_bins=("${k8s_bins[@]}" etcd kwok helm coredns grpcurl)

stamp_of() {
  case "$1" in
    kube-*|kubectl) echo "k8s.io/kubernetes@$K8S_VERSION" ;;
    etcd) echo "go.etcd.io/etcd/server/v3@$ETCD_VERSION" ;;
    kwok) echo "sigs.k8s.io/kwok@$KWOK_VERSION" ;;
    helm) echo "helm.sh/helm/v3@$HELM_VERSION" ;;
    coredns) echo "github.com/coredns/coredns@$COREDNS_VERSION" ;;
    grpcurl) echo "github.com/fullstorydev/grpcurl@$GRPCURL_VERSION" ;;
  esac
}
current() {  # current <binary>: present, executable, and built from the wanted version
  [[ $force == 0 && -x "$bin/$1" && -f "$bin/.$1.stamp" && "$(cat "$bin/.$1.stamp")" == "$(stamp_of "$1")" ]]
}
missing() {
  local b out=()
  for b in "$@"; do current "$b" || out+=("$b"); done
  echo "${out[@]:-}"
}

if [[ $mode == check ]]; then
  m="$(missing "${all_bins[@]}")"
  if [[ -z "$m" ]]; then echo "$bin"; exit 0; fi
  echo "missing or stale in $bin: $m" >&2
  exit 1
fi

command -v go >/dev/null || { echo "error: Go is required (https://go.dev/dl/)" >&2; exit 1; }
mkdir -p "$bin" "$src"
exec 9>"$root/.lock"
flock 9   # one build per cache directory at a time
exec > >(tee -a "$log") 2>&1
echo "=== $(date -u +%FT%TZ) build-control-plane: k8s $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION, coredns $COREDNS_VERSION, grpcurl $GRPCURL_VERSION"
echo "    cache: $root  ($(go version))"

export CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
export GONOSUMDB="${GONOSUMDB:-}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
start_all=$SECONDS

install_bins() {  # install_bins <outdir> <names...>: move freshly built binaries in and stamp them
  local out="$1" b; shift
  for b in "$@"; do
    mv -f "$out/$b" "$bin/$b"
    stamp_of "$b" > "$bin/.$b.stamp"
  done
}

# --- Kubernetes: a wrapper module requiring k8s.io/kubernetes with every staging module
#     (referenced there as v0.0.0 => ./staging/...) replaced by its published v0.X.Y tag.
todo="$(missing "${k8s_bins[@]}")"
if [[ -n "$todo" ]]; then
  t=$SECONDS
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  staging_version="v0.${K8S_VERSION#v1.}"
  wrap="$src/kubernetes"
  mkdir -p "$wrap"
  cd "$wrap"
  echo "--- downloading k8s.io/kubernetes@$K8S_VERSION"
  info="$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION")"
  if grep -q '"Error"' <<<"$info"; then echo "error: $info" >&2; exit 1; fi
  k8s_gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' <<<"$info")"
  commit="$(sed -n 's/^[[:space:]]*"Hash": "\(.*\)"$/\1/p' <<<"$info" | head -1)"
  go_directive="$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$k8s_gomod" | head -1)"
  {
    echo "// Generated by e2e/build-control-plane.sh; do not edit."
    echo "module kubellm.local/e2e/kubernetes"
    echo
    echo "go $go_directive"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/[a-z0-9-]*[[:space:]]*$#\t\1 => \1 '"$staging_version"'#p' "$k8s_gomod"
    echo ")"
  } > go.mod.new
  if ! cmp -s go.mod.new go.mod.in 2>/dev/null; then
    cp go.mod.new go.mod.in; cp go.mod.new go.mod; rm -f go.sum
  fi
  rm -f go.mod.new
  echo "    $(grep -c '=> k8s.io/' go.mod) staging modules replaced by $staging_version${commit:+; commit $commit}"
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
    if [[ -n "$commit" ]]; then ldflags+=" -X $pkg.gitCommit=$commit"; fi
  done
  pkgs=()
  for b in $todo; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  if [[ $mode == download ]]; then
    echo "--- downloading the modules of $todo"; go list -deps "${pkgs[@]}" >/dev/null
  else
  echo "--- building $todo"
  out="$(mktemp -d "$root/out.XXXXXX")"
  go build -trimpath -ldflags "$ldflags" -o "$out/" "${pkgs[@]}"
  install_bins "$out" $todo
  rmdir "$out"
  echo "    built in $((SECONDS - t)) s"
  fi
fi

# wrapper_module <name> <go version> <module> <version>: cd into $src/<name>, whose go.mod requires
# just <module>@<version> (reset, with its go.sum, when that changes).
wrapper_module() {
  local want
  mkdir -p "$src/$1"
  cd "$src/$1"
  want="$(printf 'module kubellm.local/e2e/%s\n\ngo %s\n\nrequire %s %s\n' "$1" "$2" "$3" "$4")"
  if [[ ! -f go.mod.in || "$(cat go.mod.in)" != "$want" ]]; then
    printf '%s\n' "$want" > go.mod.in; cp go.mod.in go.mod; rm -f go.sum
  fi
}

# --- etcd: its go.mod has replace directives, so `go install ...@version` is refused; use a wrapper.
if ! current etcd; then
  t=$SECONDS
  wrapper_module etcd 1.23 go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  if [[ $mode == download ]]; then
    echo "--- downloading the modules of etcd"; go list -deps go.etcd.io/etcd/server/v3 >/dev/null
  else
  echo "--- building etcd $ETCD_VERSION"
  out="$(mktemp -d "$root/out.XXXXXX")"
  go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
  install_bins "$out" etcd
  rmdir "$out"
  echo "    built in $((SECONDS - t)) s"
  fi
fi
# --- CoreDNS: a wrapper main with only the plugins the node's cluster DNS uses (the full
#     plugin set pulls in every cloud SDK). Directive order is CoreDNS's plugin.cfg order.
if ! current coredns; then
  t=$SECONDS
  wrapper_module coredns 1.26 github.com/coredns/coredns "$COREDNS_VERSION"
  cat > main.go <<'GO'
// Generated by e2e/build-control-plane.sh; do not edit.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}
}

func main() { coremain.Run() }
GO
  if [[ $mode == download ]]; then
    echo "--- downloading the modules of coredns"; go list -deps . >/dev/null
  else
  echo "--- building coredns $COREDNS_VERSION"
  out="$(mktemp -d "$root/out.XXXXXX")"
  go build -trimpath -ldflags "-s -w" -o "$out/coredns" .
  install_bins "$out" coredns
  rmdir "$out"
  echo "    built in $((SECONDS - t)) s"
  fi
fi
if [[ $mode == download ]]; then echo "=== modules downloaded in $((SECONDS - start_all)) s"; exit 0; fi

# --- kwok, helm and grpcurl: plain `go install pkg@version` with GOBIN in the cache.
gobin_install() {  # gobin_install <name> <pkg@version> <ldflags>
  local name="$1" pkg="$2" flags="$3" t=$SECONDS out
  out="$(mktemp -d "$root/out.XXXXXX")"
  echo "--- building $name ($pkg)"
  (cd "$out" && GOFLAGS=-buildvcs=false GOBIN="$out" go install -trimpath -ldflags "$flags" "$pkg")
  install_bins "$out" "$name"
  rmdir "$out"
  echo "    built in $((SECONDS - t)) s"
}
if ! current kwok || [[ ! -f "$bin/kwok-stages.yaml" ]]; then
  gobin_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
    "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
  # The kwok binary has no built-in stages (kwokctl adds them); keep the module's default
  # "fast" node/pod stages next to it: nodes become Ready (with lease heartbeats), pods Running
  # and Ready, completed pods Succeeded, deleted pods go away.
  kwok_dir="$(cd "$root" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  stages=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
          pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)
  { for f in "${stages[@]}"; do echo "---"; cat "$kwok_dir/kustomize/stage/$f"; done; } > "$bin/kwok-stages.yaml"
fi
current helm || gobin_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
current grpcurl || gobin_install grpcurl "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION" \
  "-s -w -X main.version=$GRPCURL_VERSION"

# --- The Gateway API Inference Extension's InferencePool CRD: a file of its Go module (the module proxy
#     serves exact versions), kept like a binary: stamped with its version, fetched again when that changes.
gie_module="sigs.k8s.io/gateway-api-inference-extension@$GIE_VERSION"
gie_crd="$root/crds/inference.networking.k8s.io_inferencepools.yaml"
if [[ $force == 1 || ! -f "$gie_crd" || "$(cat "$root/crds/.gie.stamp" 2>/dev/null)" != "$gie_module" ]]; then
  echo "--- fetching the InferencePool CRD ($gie_module)"
  gie_dir="$(cd "$root" && GOFLAGS=-mod=mod go mod download -json "$gie_module" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$gie_dir" ]] || { echo "error: go mod download $gie_module failed" >&2; exit 1; }
  install -D -m 644 "$gie_dir/config/crd/bases/$(basename "$gie_crd")" "$gie_crd"
  echo "$gie_module" > "$root/crds/.gie.stamp"
fi

# --- KEDA's CRDs, the same way (files of its Go module, no build): what a ScaledObject recipe is
#     validated against. ScaledJob (a Job template, 650 KB) and the eventing CRDs are not needed.
keda_module="github.com/kedacore/keda/v2@$KEDA_VERSION"
keda_crds=(keda.sh_scaledobjects.yaml keda.sh_triggerauthentications.yaml keda.sh_clustertriggerauthentications.yaml)
keda_current=1
for f in "${keda_crds[@]}"; do [[ -f "$root/crds/$f" ]] || keda_current=0; done
if [[ $force == 1 || $keda_current == 0 || "$(cat "$root/crds/.keda.stamp" 2>/dev/null)" != "$keda_module" ]]; then
  echo "--- fetching the KEDA CRDs ($keda_module)"
  keda_dir="$(cd "$root" && GOFLAGS=-mod=mod go mod download -json "$keda_module" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$keda_dir" ]] || { echo "error: go mod download $keda_module failed" >&2; exit 1; }
  for f in "${keda_crds[@]}"; do install -D -m 644 "$keda_dir/config/crd/bases/$f" "$root/crds/$f"; done
  echo "$keda_module" > "$root/crds/.keda.stamp"
fi

echo "=== done in $((SECONDS - start_all)) s; binaries in $bin:"
for b in "${all_bins[@]}"; do
  printf '  %-26s %s  (%s)\n' "$b" "$bin/$b" "$(du -h "$bin/$b" | cut -f1)"
done
printf '  %-26s %s  (%s)\n' "InferencePool CRD" "$gie_crd" "$gie_module"
printf '  %-26s %s  (%s)\n' "KEDA CRDs" "$root/crds/keda.sh_*.yaml" "$keda_module"
