"""The group supervision decision, a pure function of the observed groups: which replica groups to
restart (a rank failed: torch.distributed cannot re-admit one), which to record as whole, and which
one to roll to a new spec. The handlers apply the plan; nothing here talks to the API server.

    plan = supervision_plan(group_states(spec, statefulsets, pods, spec_hash))
    for action in plan.actions: ...          # RestartGroup / RecordWhole, in order
    compute_status(spec, plan.groups, ...)   # the groups as the plan leaves them
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kubellm.operator.resources import SPEC_HASH
from kubellm.operator.status import GroupState, pods_to_delete

FAILURE, ROLLOUT = "failure", "rollout"   # why a group restarts (its RESTARTING annotation)


@dataclass(frozen=True)
class RestartGroup:
    """Delete the group's pods (its StatefulSet recreates them together) and mark it restarting."""
    index: int
    cause: str                       # FAILURE or ROLLOUT
    delete_pods: tuple[str, ...]     # pod names (none for a one-pod group after a failure)
    ready_pods: str                  # READY_PODS kept on the StatefulSet meanwhile


@dataclass(frozen=True)
class RecordWhole:
    """Record the pods that make the group whole (READY_PODS) and clear RESTARTING."""
    index: int
    ready_pods: str
    pods: int                        # how many (for the GroupReady event)
    completed: str = ""              # the restart ("failure" / "rollout") this ends, "" if none


@dataclass(frozen=True)
class SupervisionPlan:
    actions: tuple[RestartGroup | RecordWhole, ...]   # to apply in this order; none: wait
    groups: tuple[GroupState, ...]                    # the groups once the actions are applied


def _outdated(group: GroupState) -> bool:
    """Some live pod of the group runs another spec than the desired one."""
    return any((p["metadata"].get("annotations") or {}).get(SPEC_HASH) != group.spec_hash
               and not p["metadata"].get("deletionTimestamp") for p in group.pods)


def _restart(group: GroupState, cause: str) -> tuple[RestartGroup, GroupState]:
    action = RestartGroup(group.index, cause, tuple(p["metadata"]["name"] for p in pods_to_delete(group, cause)),
                          group.recorded_ready)
    # After a failure the group counts as gone until its pods come back (not serving, not outdated).
    after = dataclasses.replace(group, restarting=cause, pods=[] if cause == FAILURE else group.pods)
    return action, after


def supervision_plan(groups: list[GroupState]) -> SupervisionPlan:
    """Per group in index order: restart one that broke, else record one that is whole again or whose
    pods changed. Then roll the lowest group still on an old spec, only while all the others serve."""
    actions: list[RestartGroup | RecordWhole] = []
    after: list[GroupState] = []
    for group in groups:
        # Broken before serving: with a fast node a replaced rank may already be Ready again.
        if group.broken:
            action, group = _restart(group, FAILURE)
            actions.append(action)
        elif group.serving and (group.recorded_ready != group.ready_record or group.restarting):
            actions.append(RecordWhole(group.index, group.ready_record, len(group.pods), group.restarting))
            group = dataclasses.replace(group, recorded_ready=group.ready_record, restarting="")
        after.append(group)
    outdated = [g for g in after if _outdated(g)]
    if outdated and all(g.serving for g in after if g.index != outdated[0].index):
        action, rolled = _restart(outdated[0], ROLLOUT)
        actions.append(action)
        after = [rolled if g.index == rolled.index else g for g in after]
    return SupervisionPlan(tuple(actions), tuple(after))
