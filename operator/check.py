"""`helm test` for the chart: is the LLMDeployment API served, and is the operator healthy?

    python -m kubellm.operator.check --health-url http://kubellm.kubellm-system.svc:8080/healthz

Run in the chart's test Job (operator image, the operator's ServiceAccount); needs no RBAC:
API discovery is open to every authenticated user, and the health endpoint is kopf's liveness
endpoint on the operator pod. Standard library only. Outside a pod, pass --server, --token-file
and --ca-file (the e2e tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

from kubellm.api.spec import GROUP, KIND, PLURAL, SHORT_NAMES, VERSION

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def check_api(server: str, token: str, context: ssl.SSLContext) -> list[str]:
    """Problems with the LLMDeployment API as discovery shows it (an empty list: fine)."""
    request = urllib.request.Request(f"{server}/apis/{GROUP}/{VERSION}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return [f"GET /apis/{GROUP}/{VERSION}: HTTP {err.code} (is the CRD installed and Established?)"]
    resources = {r["name"]: r for r in body.get("resources", [])}
    problems = []
    main = resources.get(PLURAL)
    if main is None:
        return [f"{GROUP}/{VERSION} serves no {PLURAL} (found: {sorted(resources)})"]
    if main.get("kind") != KIND or sorted(main.get("shortNames") or []) != sorted(SHORT_NAMES):
        problems.append(f"{PLURAL}: kind {main.get('kind')!r}, short names {main.get('shortNames')!r}")
    for sub in ("status", "scale"):
        if f"{PLURAL}/{sub}" not in resources:
            problems.append(f"{PLURAL} has no {sub} subresource")
    return problems


def check_health(url: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return []
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        if time.monotonic() > deadline:
            return [f"operator health {url}: {last}"]
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubellm.operator.check", description=__doc__.splitlines()[0])
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    parser.add_argument("--server", default=f"https://{host}:{port}" if host else None,
                        help="API server URL (default: the in-cluster one)")
    parser.add_argument("--token-file", default=f"{SA_DIR}/token")
    parser.add_argument("--ca-file", default=f"{SA_DIR}/ca.crt")
    parser.add_argument("--health-url", required=True, help="the operator's liveness endpoint")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the operator to be healthy")
    args = parser.parse_args(argv)
    if not args.server:
        parser.error("--server is required outside a pod")
    with open(args.token_file, encoding="utf-8") as f:
        token = f.read().strip()
    context = ssl.create_default_context(cafile=args.ca_file)
    problems = check_api(args.server.rstrip("/"), token, context) + check_health(args.health_url, args.timeout)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: {KIND} served at {GROUP}/{VERSION}; operator healthy at {args.health_url}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
