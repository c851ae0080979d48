#!/usr/bin/env bash
# Everything the tests need beyond `pip install`, each step cached so that a second run costs
# seconds:
#   1. Debian packages of the real node and the image builder (containerd, runc, CNI plugins,
#      iptables/nftables/conntrack for kube-proxy, buildah and mmdebstrap for the images, gcc
#      and libc6-dev for the static pause binary);
#   2. the cluster binaries from Go modules (e2e/build-control-plane.sh, cached by version);
#   3. the images (e2e/images.py: base from Debian's packages, pause, operator, router, CPU runtime;
#      cached by a hash of their inputs).
# Usage: bash e2e/setup.sh [--no-images]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
packages=(containerd runc containernetworking-plugins iptables nftables conntrack buildah mmdebstrap uidmap gcc libc6-dev binutils)
start=$SECONDS

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "error: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "--- apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "=== Debian packages ready ($((SECONDS - start)) s)"

bash "$here/build-control-plane.sh"
echo "=== cluster binaries ready ($((SECONDS - start)) s)"

if [[ "${1:-}" != --no-images ]]; then
  (cd "$here/.." && python -m e2e.images build)
  echo "=== images ready ($((SECONDS - start)) s)"
fi
