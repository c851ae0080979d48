"""The group supervision decision (restart, roll, wait) as a table: observed groups -> expected plan.

Each row gives the StatefulSets' annotations and the pods the API server returned, for a
deployment of 2 replica groups of 2 pods each (or 1 group of 1 pod), and the actions the plan must
hold, in order. No row talks to an API server: `supervision_plan` is a pure function.
"""

import copy

import pytest

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import resources as R
from kubellm.operator.status import (CRASH_LOOP, FAILED, FAILURE_RESTARTS, READY_PODS, RESTARTING, TOO_MANY_RESTARTS,
                                     group_states)
from kubellm.operator.supervision import (FAILURE, ROLLOUT, Budget, LeaveFailed, RecordWhole, RestartGroup,
                                          supervision_plan)

TWO_BY_TWO = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "tensorParallel": 2, "gpusPerPod": 1,
                                               "replicas": 2})
ONE_POD = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "tensorParallel": 2, "replicas": 1})
NEW = "new-spec"   # the desired worker spec hash
OLD = "old-spec"


def pod(group, ordinal, *, uid=None, ready=True, spec_hash=NEW, restarts=0, deleting=False, failed=False):
    meta = {"name": f"x-g{group}-{ordinal}", "uid": uid or f"u{group}{ordinal}",
            "labels": {R.GROUP_LABEL: str(group)}, "annotations": {R.SPEC_HASH: spec_hash}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": "Failed" if failed else "Running",
                                         "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                                         "containerStatuses": [{"restartCount": restarts}]}}


def whole(*pods) -> str:
    """READY_PODS of a group made of these pods."""
    return ",".join(sorted(f"{p['metadata']['uid']}:{p['status']['containerStatuses'][0]['restartCount']}"
                           for p in pods))


def sts(group, ready_pods="", restarting=""):
    return {"metadata": {"labels": {R.GROUP_LABEL: str(group)},
                         "annotations": {k: v for k, v in ((READY_PODS, ready_pods), (RESTARTING, restarting)) if v}}}


def names(*pods) -> tuple[str, ...]:
    return tuple(p["metadata"]["name"] for p in pods)


# Group 0 and 1, whole on the desired spec, and the same pods on the old spec.
A0, A1, B0, B1 = pod(0, 0), pod(0, 1), pod(1, 0), pod(1, 1)
OA0, OA1 = pod(0, 0, uid="o00", spec_hash=OLD), pod(0, 1, uid="o01", spec_hash=OLD)
OB0, OB1 = pod(1, 0, uid="o10", spec_hash=OLD), pod(1, 1, uid="o11", spec_hash=OLD)
RECORDED = [sts(0, whole(A0, A1)), sts(1, whole(B0, B1))]
RECORDED_OLD = [sts(0, whole(OA0, OA1)), sts(1, whole(OB0, OB1))]

TABLE = [
    # -- wait
    pytest.param(TWO_BY_TWO, RECORDED, [A0, A1, B0, B1], [], id="all groups whole and recorded: nothing to do"),
    pytest.param(TWO_BY_TWO, [], [A0, pod(0, 1, ready=False)], [], id="a group still forming: wait"),
    pytest.param(TWO_BY_TWO, [sts(0, whole(A0, A1), FAILURE), sts(1, whole(B0, B1))],
                 [pod(0, 0, uid="n00", ready=False), B0, B1], [],
                 id="a restarting group is not broken again while its pods come back"),
    pytest.param(TWO_BY_TWO, [sts(0, whole(A0, pod(0, 1, restarts=2))), sts(1, whole(B0, B1))],
                 [A0, pod(0, 1, restarts=2), B0, B1], [],
                 id="restarts counted before the group was whole are no failure"),
    # -- record
    pytest.param(TWO_BY_TWO, [], [A0, A1], [RecordWhole(0, whole(A0, A1), 2)],
                 id="a new group is whole: record its pods"),
    pytest.param(TWO_BY_TWO, [sts(0, "u00,u01"), sts(1, whole(B0, B1))], [A0, A1, B0, B1],
                 [RecordWhole(0, whole(A0, A1), 2)], id="a record of uids only (older operator) is rewritten"),
    pytest.param(TWO_BY_TWO, [sts(0, whole(A0, A1), FAILURE), sts(1, whole(B0, B1))],
                 [pod(0, 0, uid="n00"), pod(0, 1, uid="n01"), B0, B1],
                 [RecordWhole(0, "n00:0,n01:0", 2, completed=FAILURE)],
                 id="a restarted group is whole again: record it, the restart is complete"),
    # -- restart after a failure
    pytest.param(TWO_BY_TWO, RECORDED, [A0, B0, B1], [RestartGroup(0, FAILURE, names(A0), whole(A0, A1))],
                 id="a rank of a whole group is gone: restart every rank"),
    pytest.param(TWO_BY_TWO, RECORDED, [A0, pod(0, 1, uid="n01"), B0, B1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1))],
                 id="a replaced rank, already Ready again: restart, not record"),
    pytest.param(TWO_BY_TWO, RECORDED, [A0, pod(0, 1, restarts=1), B0, B1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1))], id="a rank's container restarted"),
    pytest.param(TWO_BY_TWO, RECORDED, [A0, pod(0, 1, ready=False, failed=True), B0, B1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1))], id="a rank's pod Failed"),
    pytest.param(TWO_BY_TWO, RECORDED, [A0, pod(0, 1, deleting=True), B0, B1],
                 [], id="a rank being deleted is not gone yet: wait"),
    pytest.param(TWO_BY_TWO, RECORDED, [A0, pod(0, 1, uid="n01", deleting=True), pod(1, 0, restarts=1), B1],
                 [RestartGroup(0, FAILURE, names(A0), whole(A0, A1)),
                  RestartGroup(1, FAILURE, names(B0, B1), whole(B0, B1))],
                 id="two broken groups restart together; pods already being deleted are left alone"),
    pytest.param(ONE_POD, [sts(0, "u00:0")], [pod(0, 0, uid="n00")], [RestartGroup(0, FAILURE, (), "u00:0")],
                 id="a one-pod group whose pod was replaced: nothing to delete"),
    # -- rolling update
    pytest.param(TWO_BY_TWO, RECORDED_OLD, [OA0, OA1, OB0, OB1],
                 [RestartGroup(0, ROLLOUT, names(OA0, OA1), whole(OA0, OA1))],
                 id="the spec changed: roll the lowest group first"),
    pytest.param(TWO_BY_TWO, RECORDED_OLD, [OA0, OA1, OB0, pod(1, 1, uid="o11", spec_hash=OLD, ready=False)],
                 [], id="the rollout waits while another group is not serving"),
    pytest.param(TWO_BY_TWO, RECORDED_OLD,
                 [pod(0, 0, uid="o00", spec_hash=OLD, deleting=True), pod(0, 1, uid="o01", spec_hash=OLD,
                                                                          deleting=True), OB0, OB1],
                 [], id="group 0 rolling (old pods terminating): group 1 waits for it"),
    pytest.param(TWO_BY_TWO, [sts(0, whole(OA0, OA1), ROLLOUT), sts(1, whole(OB0, OB1))], [A0, A1, OB0, OB1],
                 [RecordWhole(0, whole(A0, A1), 2, completed=ROLLOUT),
                  RestartGroup(1, ROLLOUT, names(OB0, OB1), whole(OB0, OB1))],
                 id="group 0 rolled and whole: record it, then roll group 1"),
    pytest.param(TWO_BY_TWO, [sts(0), sts(1, whole(OB0, OB1))], [A0, pod(0, 1, ready=False), OB0, OB1], [],
                 id="a new group still forming holds the rollout of the others"),
    pytest.param(TWO_BY_TWO, [sts(0, whole(A0, A1)), sts(1, whole(OB0, OB1))],
                 [A0, pod(0, 1, restarts=1), OB0, OB1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1))],
                 id="a group restarted for a failure this tick counts as down: the rollout waits"),
    pytest.param(TWO_BY_TWO, [sts(0, whole(OA0, OA1)), sts(1, whole(B0, B1))], [OA0, B0, B1],
                 [RestartGroup(0, FAILURE, names(OA0), whole(OA0, OA1))],
                 id="a broken group on the old spec restarts for the failure, and is not rolled too"),
    pytest.param(TWO_BY_TWO, [sts(0, whole(OA0, OA1)), sts(1, whole(B0, B1))],
                 [OA0, pod(0, 1, uid="o01", spec_hash=OLD, ready=False), B0, B1],
                 [RestartGroup(0, ROLLOUT, names(OA0, OA1), whole(OA0, OA1))],
                 id="the group to roll need not serve itself, only the others"),
]


@pytest.mark.parametrize("spec, statefulsets, pods, expected", TABLE)
def test_supervision_plan(spec, statefulsets, pods, expected):
    groups = group_states(spec, statefulsets, pods, NEW)
    observed = copy.deepcopy(groups)
    plan = supervision_plan(groups)
    assert list(plan.actions) == expected
    assert groups == observed, "the decision changed what was observed"


def test_the_planned_groups_are_what_the_status_sees():
    """After a failure restart the group has no pods (down, not outdated); a rolled one keeps its
    pods but is marked restarting; a recorded one carries its new record."""
    groups = group_states(TWO_BY_TWO, RECORDED, [A0, pod(0, 1, restarts=1), B0, B1], NEW)
    failed, untouched = supervision_plan(groups).groups
    assert (failed.pods, failed.restarting, failed.recorded_ready) == ([], FAILURE, whole(A0, A1))
    assert untouched == groups[1]

    groups = group_states(TWO_BY_TWO, [], [A0, A1, OB0, OB1], NEW)
    plan = supervision_plan(groups)
    assert plan.actions == (RecordWhole(0, whole(A0, A1), 2), RecordWhole(1, whole(OB0, OB1), 2),
                            RestartGroup(1, ROLLOUT, names(OB0, OB1), whole(OB0, OB1)))
    recorded, rolling = plan.groups
    assert (recorded.recorded_ready, recorded.restarting) == (whole(A0, A1), "")
    assert (rolling.recorded_ready, rolling.restarting, len(rolling.pods)) == (whole(OB0, OB1), ROLLOUT, 2)


# -- the restart budget (spec.maxGroupRestarts within spec.groupRestartWindowSeconds)
NOW, WINDOW = 1_000_000, 3600
BUDGET_2 = Budget(max_restarts=2, window=WINDOW)


def crashing(group, ordinal, *, uid=None, restarts=1, crash_loop=True):
    """A rank whose worker container crashed and waits to be started again."""
    p = pod(group, ordinal, uid=uid, ready=False, restarts=restarts)
    p["status"]["containerStatuses"] = [{"name": "worker", "restartCount": restarts, "state": {
        "waiting": {"reason": "CrashLoopBackOff"} if crash_loop else {"reason": "ContainerCreating"}}}]
    return p


def budget_sts(group, ready_pods, restarts=(), spec_hash=NEW, failed="", restarting=""):
    s = sts(group, ready_pods, restarting)
    if restarts:
        s["metadata"]["annotations"][FAILURE_RESTARTS] = f"{spec_hash}:{','.join(map(str, restarts))}"
    if failed:
        s["metadata"]["annotations"][FAILED] = failed
    return s


A1_RESTARTED = pod(0, 1, restarts=1)
BUDGET_TABLE = [
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - 60]), sts(1, whole(B0, B1))], [A0, A1_RESTARTED, B0, B1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1), f"{NEW}:{NOW - 60},{NOW}")], [],
                 id="budget not spent: restart, and record the restart"),
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - 600, NOW - 60]), sts(1, whole(B0, B1))],
                 [A0, A1_RESTARTED, B0, B1], [LeaveFailed(0, "x-g0-1", 2)], [(0, TOO_MANY_RESTARTS, "x-g0-1")],
                 id="budget spent within the window: left Failed, naming the rank, no restart"),
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - 600, NOW - 60], failed="x-g0-1"), sts(1, whole(B0, B1))],
                 [A0, A1_RESTARTED, B0, B1], [], [(0, TOO_MANY_RESTARTS, "x-g0-1")],
                 id="a group already left Failed: nothing to do, still reported"),
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - WINDOW - 600, NOW - WINDOW - 60], failed="x-g0-1"),
                            sts(1, whole(B0, B1))], [A0, A1_RESTARTED, B0, B1], [], [(0, TOO_MANY_RESTARTS, "x-g0-1")],
                 id="a Failed group stays Failed once its restarts leave the window"),
    pytest.param(Budget(max_restarts=3, window=WINDOW),
                 [budget_sts(0, whole(A0, A1), [NOW - 600, NOW - 60], failed="x-g0-1"), sts(1, whole(B0, B1))],
                 [A0, A1_RESTARTED, B0, B1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1), f"{NEW}:{NOW - 600},{NOW - 60},{NOW}")], [],
                 id="maxGroupRestarts raised above the restarts spent: the Failed group restarts"),
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - WINDOW - 5, NOW - 60]), sts(1, whole(B0, B1))],
                 [A0, A1_RESTARTED, B0, B1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1), f"{NEW}:{NOW - 60},{NOW}")], [],
                 id="restarts older than the window do not count (and are dropped)"),
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - 600, NOW - 60], spec_hash=OLD, failed="x-g0-1"),
                            sts(1, whole(B0, B1))], [A0, A1_RESTARTED, B0, B1],
                 [RestartGroup(0, FAILURE, names(A0, A1), whole(A0, A1), f"{NEW}:{NOW}")], [],
                 id="a spec change resets the count: the Failed group starts again"),
    pytest.param(Budget(max_restarts=0, window=WINDOW), RECORDED, [A0, B0, B1], [LeaveFailed(0, "x-g0-1", 0)],
                 [(0, TOO_MANY_RESTARTS, "x-g0-1")],
                 id="maxGroupRestarts 0: the first failure is final; a rank gone is named by its ordinal"),
    pytest.param(Budget(max_restarts=0, window=WINDOW), RECORDED, [B0, B1], [LeaveFailed(0, "", 0)],
                 [(0, TOO_MANY_RESTARTS, None)], id="no pod of the group left: the rank cannot be named"),
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - 600, NOW - 60], failed="x-g0-1"), sts(1, whole(B0, B1))],
                 [pod(0, 0, failed=True), A1, B0, B1], [], [(0, TOO_MANY_RESTARTS, "x-g0-0")],
                 id="marked once: another rank failing later is reported, not marked again"),
    pytest.param(BUDGET_2, [budget_sts(0, whole(A0, A1), [NOW - 60], restarting=FAILURE), sts(1, whole(B0, B1))],
                 [pod(0, 0, uid="n00", ready=False), crashing(0, 1, uid="n01"), B0, B1], [],
                 [(0, CRASH_LOOP, "x-g0-1")],
                 id="a restarted group's rank in CrashLoopBackOff: reported before the budget is spent"),
    pytest.param(Budget(), [], [pod(0, 0, ready=False), crashing(0, 1, restarts=3, crash_loop=False)], [],
                 [(0, CRASH_LOOP, "x-g0-1")], id="a new group's rank restarted 3 times without the group whole: reported"),
    pytest.param(Budget(), [], [pod(0, 0, ready=False), crashing(0, 1, restarts=2, crash_loop=False)], [], [],
                 id="two restarts while forming: not yet reported"),
]


@pytest.mark.parametrize("budget, statefulsets, pods, expected, failures", BUDGET_TABLE)
def test_restart_budget(budget, statefulsets, pods, expected, failures):
    groups = group_states(TWO_BY_TWO, statefulsets, pods, NEW)
    plan = supervision_plan(groups, budget, NOW)
    assert list(plan.actions) == expected
    assert [(f.index, f.reason, f.pod["metadata"]["name"] if f.pod else None) for f in plan.failures] == failures


def test_a_failed_group_is_not_serving_and_blocks_nothing_it_should_not():
    """Left Failed, a group counts as down in the status even if a replacement pod is Ready, and the
    other group keeps its record."""
    statefulsets = [budget_sts(0, whole(A0, A1), [NOW - 60]), sts(1, whole(B0, B1))]
    plan = supervision_plan(group_states(TWO_BY_TWO, statefulsets, [A0, pod(0, 1, uid="n01"), B0, B1], NEW),
                            Budget(1, WINDOW), NOW)
    assert plan.actions == (LeaveFailed(0, "x-g0-1", 1),)
    failed, serving = plan.groups
    assert failed.failed == "x-g0-1" and serving.serving and not serving.failed
