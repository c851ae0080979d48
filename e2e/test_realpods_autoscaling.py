"""The built-in autoscaler on the real-pod tier: SmolLM2 on CPU pods with `spec.autoscaling` (minReplicas 0,
maxReplicas 2), driven only by requests through the router Service, as a user would.

In order: applied, it is ScaledToZero, the router alone Ready and answering ModelInfo and /v1/models; a request
sent at zero is held by the router, the operator reads the router's held count and starts the first group, and
the request is answered; a steady load above the target raises the replicas to the maximum and no further;
idle, after scaleDownDelaySeconds, they go back to zero. The figures (request at zero to its answer, load to
the second group, idle to zero) are printed.

Shares test_realpods.py's release (its module fixture, set up again for this module).
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import yaml

from test_realpods import (CPU_EXAMPLE, FIGURES, Load, apply, diagnose, get, phase, port_forward,  # noqa: F401
                           release)

pytestmark = [pytest.mark.e2e, pytest.mark.realpods]

NAME = "elastic"
AUTOSCALING = {"minReplicas": 0, "maxReplicas": 2, "targetInFlightPerReplica": 2, "scaleUpDelaySeconds": 5,
               "scaleDownDelaySeconds": 20, "scaleFromZeroTimeoutSeconds": 300}


def replicas(c) -> int | None:
    return get(c, "llmd", NAME)["spec"].get("replicas")


def groups(c) -> list[str]:
    return sorted(s["metadata"]["name"] for s in get(c, "statefulsets", "-l", f"app.kubernetes.io/instance={NAME}")[
        "items"])


def condition(c, type_: str) -> dict:
    status = get(c, "llmd", NAME).get("status") or {}
    return next((x for x in status.get("conditions") or [] if x["type"] == type_), {})


@pytest.fixture(scope="module")
def elastic(release):
    c = release
    manifest = yaml.safe_load(CPU_EXAMPLE.read_text())
    manifest["metadata"]["name"] = NAME
    manifest["spec"].pop("replicas")   # the autoscaler sets it: a hand-set one is refused beside autoscaling
    manifest["spec"]["autoscaling"] = AUTOSCALING
    apply(c, manifest)
    try:
        c.wait_for(lambda: phase(c, NAME) == "ScaledToZero" and any(
            all(s["ready"] for s in p["status"].get("containerStatuses") or [{"ready": False}])
            for p in get(c, "pods", "-l", f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=router")[
                "items"]), "ScaledToZero with its router Ready", timeout=300, interval=1)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{diagnose(c)}") from None
    yield c
    c.kubectl("delete", "llmd", NAME, "-n", "llm", "--wait", "--timeout=120s", check=False, timeout=180)


def test_scaled_to_zero_the_router_still_answers(elastic):
    c = elastic
    assert groups(c) == [] and replicas(c) == 0
    from kubellm.runtime.serving.client import Client

    with port_forward(c, f"svc/{NAME}", 50051, 28080) as ports:
        t0 = time.monotonic()
        with Client(f"127.0.0.1:{ports[50051]}", timeout=10) as client:
            info = client.model_info()
        assert time.monotonic() - t0 < 5, "ModelInfo was held, not answered by the router"
        assert info.model, info
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[28080]}/v1/models", timeout=10) as reply:
            models = [m["id"] for m in json.loads(reply.read())["data"]]
        assert NAME in models, models
    assert condition(c, "ScaledToZero")["status"] == "True"


def test_a_request_at_zero_starts_the_first_group_and_is_answered(elastic):
    c = elastic
    from kubellm.runtime.serving.client import Client

    with port_forward(c, f"svc/{NAME}", 50051) as ports, Client(f"127.0.0.1:{ports[50051]}", timeout=400) as client:
        t0 = time.monotonic()
        reply = client.generate("The capital of France is", max_new_tokens=8)
        waited = time.monotonic() - t0
    text = reply[0].text if isinstance(reply, list) else reply.text
    assert text.strip(), reply
    assert replicas(c) == 1 and groups(c) == [f"{NAME}-g0"], (replicas(c), groups(c))
    FIGURES["scale_from_zero_request_to_answer_s"] = round(waited, 1)
    print(f"\na request at zero replicas answered after {waited:.1f} s (the first group's start and model load)")
    events = [e["message"] for e in get(c, "events")["items"] if e["reason"] == "Autoscaled"]
    assert any("scaling from zero" in m for m in events), events


def test_load_above_the_target_scales_up_to_the_maximum(elastic):
    c = elastic
    c.wait_for(lambda: phase(c, NAME) == "Ready", "one group Ready", timeout=300, interval=1)
    with port_forward(c, f"svc/{NAME}", 50051) as ports:
        # 6 streams in flight against a target of 2 per replica: 3 wanted, the maximum is 2.
        with Load(f"127.0.0.1:{ports[50051]}", threads=6, max_new_tokens=64, timeout=120) as load:
            t0 = time.monotonic()
            c.wait_for(lambda: replicas(c) == 2, "replicas raised to 2", timeout=120, interval=1)
            FIGURES["autoscale_load_to_two_replicas_s"] = round(time.monotonic() - t0, 1)
            c.wait_for(lambda: phase(c, NAME) == "Ready" and len(groups(c)) == 2, "both groups Ready",
                       timeout=300, interval=1)
            time.sleep(10)   # the load stays above the target: the maximum holds
            assert replicas(c) == 2 and len(groups(c)) == 2
    failed = [r for r in load.results if r["error"]]
    assert not failed, failed[:3]
    print(f"\nload above the target -> replicas 2 after {FIGURES['autoscale_load_to_two_replicas_s']} s; "
          f"{len(load.results)} streams, 0 failed")


def test_idle_scales_back_to_zero_after_the_delay(elastic):
    c = elastic
    t0 = time.monotonic()
    c.wait_for(lambda: replicas(c) == 0, "replicas back to 0", timeout=180, interval=1)
    idle = time.monotonic() - t0
    assert idle >= AUTOSCALING["scaleDownDelaySeconds"] - 12, f"scaled down after {idle:.0f} s, before the delay"
    c.wait_for(lambda: phase(c, NAME) == "ScaledToZero" and not groups(c), "ScaledToZero, no group left",
               timeout=120, interval=1)
    FIGURES["autoscale_idle_to_zero_s"] = round(idle, 1)
    print(f"\nidle -> 0 replicas after {idle:.1f} s (scaleDownDelaySeconds {AUTOSCALING['scaleDownDelaySeconds']})")
