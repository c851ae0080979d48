"""The group supervision decision, a pure function of the observed groups: which replica groups to
restart (a rank failed: torch.distributed cannot re-admit one), which to record as whole, which
one to roll to a new spec, and which to leave Failed (its restart budget, spec.maxGroupRestarts
within spec.groupRestartWindowSeconds, is spent). The handlers apply the plan; nothing here talks
to the API server.

    plan = supervision_plan(group_states(spec, statefulsets, pods, spec_hash), Budget.of(spec), now)
    for action in plan.actions: ...          # RestartGroup / RecordWhole / LeaveFailed, in order
    compute_status(spec, plan.groups, ..., failures=plan.failures)   # the groups as the plan leaves them
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kubellm.operator.resources import SPEC_HASH
from kubellm.operator.status import CRASH_LOOP, TOO_MANY_RESTARTS, GroupState, pods_to_delete, restart_record

FAILURE, ROLLOUT = "failure", "rollout"   # why a group restarts (its RESTARTING annotation)


@dataclass(frozen=True)
class RestartGroup:
    """Delete the group's pods (its StatefulSet recreates them together) and mark it restarting."""
    index: int
    cause: str                       # FAILURE or ROLLOUT
    delete_pods: tuple[str, ...]     # pod names (none for a one-pod group after a failure)
    ready_pods: str                  # READY_PODS kept on the StatefulSet meanwhile
    restarts: str | None = None      # the new FAILURE_RESTARTS annotation; None: leave it as it is

    @property
    def spent(self) -> int:
        """Restarts within the budget's window, this one included, as `restarts` records them (0: unbounded)."""
        return len(self.restarts.partition(":")[2].split(",")) if self.restarts else 0


@dataclass(frozen=True)
class RecordWhole:
    """Record the pods that make the group whole (READY_PODS) and clear RESTARTING."""
    index: int
    ready_pods: str
    pods: int                        # how many (for the GroupReady event)
    completed: str = ""              # the restart ("failure" / "rollout") this ends, "" if none


@dataclass(frozen=True)
class LeaveFailed:
    """The group broke with its restart budget spent: mark it Failed (FAILED) and restart it no more."""
    index: int
    rank: str                        # the pod that failed ("" when none can be named)
    restarts: int                    # restarts spent within the window


@dataclass(frozen=True)
class RankFailure:
    """A rank to report in the GroupFailed condition, with its log."""
    index: int
    pod: dict | None                 # the failed pod (None: none can be named)
    reason: str                      # TOO_MANY_RESTARTS or CRASH_LOOP
    restarts: int = 0                # TOO_MANY_RESTARTS: restarts spent within the window


@dataclass(frozen=True)
class Budget:
    """spec.maxGroupRestarts (None: unbounded) within spec.groupRestartWindowSeconds."""
    max_restarts: int | None = None
    window: int = 3600

    @classmethod
    def of(cls, spec) -> "Budget":
        return cls(spec.maxGroupRestarts, spec.groupRestartWindowSeconds)

    def recent(self, times: tuple[int, ...], now: int) -> tuple[int, ...]:
        return tuple(t for t in times if now - t < self.window)


Action = RestartGroup | RecordWhole | LeaveFailed


@dataclass(frozen=True)
class SupervisionPlan:
    actions: tuple[Action, ...]                       # to apply in this order; none: wait
    groups: tuple[GroupState, ...]                    # the groups once the actions are applied
    failures: tuple[RankFailure, ...] = ()            # ranks for the GroupFailed condition


def _outdated(group: GroupState) -> bool:
    """Some live pod of the group runs another spec than the desired one."""
    return any((p["metadata"].get("annotations") or {}).get(SPEC_HASH) != group.spec_hash
               and not p["metadata"].get("deletionTimestamp") for p in group.pods)


def _restart(group: GroupState, cause: str, restarts: str | None = None) -> tuple[RestartGroup, GroupState]:
    action = RestartGroup(group.index, cause, tuple(p["metadata"]["name"] for p in pods_to_delete(group, cause)),
                          group.recorded_ready, restarts)
    # After a failure the group counts as gone until its pods come back (not serving, not outdated).
    after = dataclasses.replace(group, restarting=cause, pods=[] if cause == FAILURE else group.pods, failed="")
    return action, after


def supervision_plan(groups: list[GroupState], budget: Budget = Budget(), now: int = 0) -> SupervisionPlan:
    """Per group in index order: restart one that broke (or, its budget spent, leave it Failed), else
    record one that is whole again or whose pods changed. Then roll the lowest group still on an old
    spec, only while all the others serve. `now`: epoch seconds, for the budget's window."""
    actions: list[Action] = []
    after: list[GroupState] = []
    failures: list[RankFailure] = []
    for group in groups:
        # Broken before serving: with a fast node a replaced rank may already be Ready again.
        if group.broken and budget.max_restarts is not None:
            recent = budget.recent(group.restarts, now)
            # Once Failed, it stays so as the window passes: only a new spec (its restarts count nothing)
            # or a budget above the restarts recorded lets it start again.
            if len(recent) >= budget.max_restarts or (group.failed and len(group.restarts) >= budget.max_restarts):
                rank = group.failed_rank
                failures.append(RankFailure(group.index, rank, TOO_MANY_RESTARTS, len(group.restarts)))
                name = rank["metadata"]["name"] if rank else ""
                if not group.failed:   # once: the Event and the mark name the rank that failed first
                    actions.append(LeaveFailed(group.index, name, len(group.restarts)))
                    group = dataclasses.replace(group, failed=name or "?")
                after.append(group)
                continue
            action, group = _restart(group, FAILURE, restart_record(group.spec_hash, (*recent, now)))
            actions.append(action)
        elif group.broken:
            action, group = _restart(group, FAILURE)
            actions.append(action)
        elif group.serving and (group.recorded_ready != group.ready_record or group.restarting):
            actions.append(RecordWhole(group.index, group.ready_record, len(group.pods), group.restarting))
            group = dataclasses.replace(group, recorded_ready=group.ready_record, restarting="", failed="")
        elif group.crash_looping is not None:
            failures.append(RankFailure(group.index, group.crash_looping, CRASH_LOOP))
        after.append(group)
    outdated = [g for g in after if _outdated(g) and not g.failed]
    if outdated and all(g.serving for g in after if g.index != outdated[0].index):
        action, rolled = _restart(outdated[0], ROLLOUT)
        actions.append(action)
        after = [rolled if g.index == rolled.index else g for g in after]
    return SupervisionPlan(tuple(actions), tuple(after), tuple(failures))
