"""The built-in autoscaler's decision (operator/autoscaler.py), table-driven over load traces, and what it reads
(router_load.py) and what scale-down removes (groups.py)."""

from __future__ import annotations

import pytest

from kubellm.api.spec import AutoscalingSpec
from kubellm.operator.autoscaler import History, Load, decide, recommendation
from kubellm.operator.groups import choose_groups
from kubellm.operator.router_load import RouterLoad

POLICY = AutoscalingSpec(minReplicas=1, maxReplicas=4, targetInFlightPerReplica=4, scaleUpDelaySeconds=10,
                         scaleDownDelaySeconds=30)


@pytest.mark.parametrize("in_flight, waiting, expected", [
    (0, 0, 1),      # the floor
    (1, 0, 1),
    (4, 0, 1),      # exactly the target
    (5, 0, 2),
    (8, 4, 3),      # held requests count as load
    (100, 0, 4),    # the ceiling
])
def test_recommendation(in_flight, waiting, expected):
    assert recommendation(POLICY, Load(in_flight, waiting)) == expected


def test_recommendation_from_zero_floor():
    policy = POLICY.model_copy(update={"minReplicas": 0})
    assert recommendation(policy, Load(0, 0)) == 0
    assert recommendation(policy, Load(0, 1)) == 1   # one waiting request needs a group, however small the load


def run(policy: AutoscalingSpec, start: int, trace: list[tuple[float, Load | None]]) -> list[int]:
    """Replica counts after each sample of `trace` ((time, load)), applying each decision."""
    history, replicas, out = History(), start, []
    for at, load in trace:
        replicas = decide(policy, replicas, history, load, at).replicas
        out.append(replicas)
    return out


def steady(load: Load | None, start: float, end: float, step: float = 5) -> list[tuple[float, Load | None]]:
    return [(start + i * step, load) for i in range(int((end - start) / step))]


HIGH, IDLE = Load(14, 0), Load(0, 0)
TRACES = {
    # a load above the target must last scaleUpDelaySeconds (10 s) before replicas rise, then to ceil(14/4)=4
    "sustained load scales up after the delay": (1, steady(HIGH, 0, 20), [1, 1, 4, 4]),
    # a 5 s burst (shorter than the up delay) adds nothing
    "a short burst adds nothing": (1, [(0, IDLE), (5, HIGH), (10, IDLE), (15, IDLE), (20, HIGH), (25, IDLE)],
                                   [1] * 6),
    # idle lowers to the minimum only once the whole down window (30 s) was idle
    "idle scales down after the delay": (4, steady(IDLE, 0, 40), [4] * 6 + [1, 1]),
    # a lull shorter than the down delay removes nothing (no flapping under bursty load)
    "bursty load does not flap": (4, [(t, HIGH if (t // 10) % 2 == 0 else IDLE) for t in range(0, 120, 5)], [4] * 24),
    # an unreadable load is no sample: nothing changes
    "unknown load leaves replicas": (3, steady(None, 0, 60), [3] * 12),
}


@pytest.mark.parametrize("start, trace, expected", TRACES.values(), ids=TRACES.keys())
def test_decisions_over_time(start, trace, expected):
    assert run(POLICY, start, trace) == expected


def test_scale_from_zero_is_immediate_and_idle_returns_to_zero():
    policy = POLICY.model_copy(update={"minReplicas": 0})
    trace = [(0, IDLE), (5, Load(0, 1)), (10, Load(1, 0)), *steady(IDLE, 15, 60)]
    counts = run(policy, 0, trace)
    assert counts[:3] == [0, 1, 1]          # the first waiting request starts a group at once
    assert counts[-1] == 0 and 0 not in counts[1:7]   # back to zero only after 30 s idle


def test_out_of_range_counts_are_brought_back_at_once():
    history = History()
    assert decide(POLICY, 9, history, HIGH, 0).replicas == 4
    assert decide(POLICY, 0, history, None, 5).replicas == 1


def test_reasons_name_what_happened():
    history = History()
    decide(POLICY, 1, history, HIGH, 0)
    decision = decide(POLICY, 1, history, HIGH, 10)
    assert decision.reason == "ScaledUp" and "14 in flight" in decision.message and "1 -> 4" in decision.message
    assert decide(POLICY, 1, History(), None, 0).reason == "LoadUnknown"


# -- what the routers report -------------------------------------------------------------------
def test_router_load_sums_routers_and_maps_leaders_to_groups():
    load = RouterLoad()
    load.add({'kubellm_router_in_flight{replica="10.0.0.5:50051"}': 3, 'kubellm_router_in_flight{replica="10.0.0.6:50051"}': 0,
              "kubellm_router_requests_waiting": 2, "kubellm_router_requests_total": 99})
    load.add({'kubellm_router_in_flight{replica="10.0.0.5:50051"}': 1, "kubellm_router_requests_waiting": 1})
    assert load.total() == Load(4, 3)
    assert load.by_group({"10.0.0.5": 2, "10.0.0.6": 0}) == {2: 4, 0: 0}
    assert RouterLoad().total() is None   # no router answered: no sample


# -- which groups a scale changes ----------------------------------------------------------------
@pytest.mark.parametrize("existing, replicas, load, serving, keep, remove", [
    ([0, 1, 2], 3, {}, (), [0, 1, 2], []),
    ([0, 1], 4, {}, (), [0, 1, 2, 3], []),                      # up: the next indices
    ([0, 2], 3, {}, (), [0, 1, 2], []),                         # up: a gap is filled first
    ([0, 1, 2], 2, {}, {0, 1, 2}, [0, 1], [2]),                 # down, nothing known: the highest index
    ([0, 1, 2], 2, {0: 5, 1: 0, 2: 7}, {0, 1, 2}, [0, 2], [1]), # down: the least loaded, not the highest
    ([0, 1, 2], 1, {0: 5, 1: 1, 2: 7}, {0, 1, 2}, [2], [0, 1]),
    ([0, 1, 2], 2, {0: 0, 1: 3, 2: 3}, {1, 2}, [1, 2], [0]),    # a group that does not serve goes first
    ([0, 1], 0, {0: 1}, {0, 1}, [], [0, 1]),
])
def test_choose_groups(existing, replicas, load, serving, keep, remove):
    assert choose_groups(existing, replicas, load, serving) == (keep, remove)
