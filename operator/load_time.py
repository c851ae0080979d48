"""Time to ready, per replica group: pure functions over the group's pods and, where it answers, what
its leader's metrics say the load spent (download, weights, warm-up).

    timing = group_timing(group)                  # scheduled -> container started -> Ready
    timing.status()                               # one entry of .status.groups
    load_events(timing, phases, slow_after_s)     # the ModelLoaded (and SlowModelLoad) Events

The group's times are those of its last pod: a group serves once every rank does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

WORKER_CONTAINER = "worker"
SLOW_LOAD_SECONDS = 120.0
# kubellm_model_load_phase_seconds{phase}: the worker's own account of its load, in the order it happens.
PHASES = {"download": "downloading the model", "weights": "reading the weights", "warmup": "warming up"}
TOTAL = "total"   # kubellm_model_load_seconds: the worker's whole load
# What the time from the container's start to Ready holds beside the worker's load: the process starting
# (imports) and the readiness probe's period.
STARTUP = "starting the worker process and passing its readiness probe"


@dataclass(frozen=True)
class GroupTiming:
    index: int
    scheduled_at: str = ""      # RFC 3339, as the API server wrote it; "" until every pod has it
    load_started_at: str = ""
    ready_at: str = ""

    @property
    def load_seconds(self) -> float | None:
        if not (self.load_started_at and self.ready_at):
            return None
        return max(0.0, (_parse(self.ready_at) - _parse(self.load_started_at)).total_seconds())

    def status(self) -> dict:
        """One entry of .status.groups (loadSeconds only once there is one: the CRD has no nulls)."""
        entry = {"index": self.index, "scheduledAt": self.scheduled_at, "loadStartedAt": self.load_started_at,
                 "readyAt": self.ready_at}
        if self.load_seconds is not None:
            entry["loadSeconds"] = round(self.load_seconds, 1)
        return entry


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _latest(stamps: list[str]) -> str:
    """The last of the pods' times, or "" while some pod has none yet."""
    if not stamps or not all(stamps):
        return ""
    return max(stamps, key=_parse)


def _condition_time(pod: dict, type_: str) -> str:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c.get("lastTransitionTime") or ""
    return ""


def _worker_started(pod: dict) -> str:
    """When the worker container's current run began: the model load starts with the process."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == WORKER_CONTAINER:
            return ((cs.get("state") or {}).get("running") or {}).get("startedAt") or ""
    return ""


def group_timing(group) -> GroupTiming:
    """`group`: a status.GroupState (its index, pods, and whether it serves)."""
    pods = [p for p in group.pods if not p["metadata"].get("deletionTimestamp")]
    return GroupTiming(
        group.index,
        scheduled_at=_latest([_condition_time(p, "PodScheduled") for p in pods]),
        load_started_at=_latest([_worker_started(p) for p in pods]),
        ready_at=_latest([_condition_time(p, "Ready") for p in pods]) if group.serving else "")


def last_load_seconds(timings: list[GroupTiming], previous: float | None) -> float | None:
    """The load time of the group that became ready last; the previous value while none serves."""
    ready = [t for t in timings if t.load_seconds is not None]
    if not ready:
        return previous
    return round(max(ready, key=lambda t: _parse(t.ready_at)).load_seconds, 1)


def slow_load_after(startup_timeout_seconds: int) -> float:
    """A load is slow past SLOW_LOAD_SECONDS, or past half of what the startup probe allows when that is less."""
    return min(SLOW_LOAD_SECONDS, startup_timeout_seconds / 2)


def _phases_text(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {phases[name]:.1f} s" for name in PHASES if name in phases)


def _where(phases: dict[str, float], total: float | None) -> str:
    if not phases:
        return ""
    if total is None:
        return f" ({_phases_text(phases)})"
    return f" (the worker's own load {total:.1f} s: {_phases_text(phases)}; the rest is the process starting and readiness)"


def load_events(timing: GroupTiming, phases: dict[str, float] | None, slow_after: float,
                unavailable: str = "") -> list[tuple[str, str, str]]:
    """The Events (type, reason, message) a group posts when it becomes whole: ModelLoaded, and a
    SlowModelLoad Warning naming the phase that took longest when the load was slow. `phases`: the
    worker's kubellm_model_load_phase_seconds, or None when they could not be read (`unavailable` says why)."""
    seconds = timing.load_seconds
    if seconds is None:
        return []
    total = (phases or {}).get(TOTAL)
    phases = {name: value for name, value in (phases or {}).items() if name in PHASES}
    events = [("Normal", "ModelLoaded", f"replica group {timing.index}: the model loaded in {seconds:.0f} s, from "
                                        f"its worker's start to Ready{_where(phases, total)}")]
    if seconds > slow_after:
        if phases:
            # Beside the phases, what the worker's own total leaves of the time: its start and readiness.
            spans = {PHASES[name]: phases[name] for name in PHASES if name in phases}
            if total is not None:
                spans[STARTUP] = max(0.0, seconds - total)
            longest = max(spans, key=spans.get)
            why = f"most of it {longest} ({spans[longest]:.1f} s; {_phases_text(phases)})"
        else:
            why = (f"its load phases could not be read ({unavailable or 'no metrics'}); the worker's log "
                   "says where the time went")
        events.append(("Warning", "SlowModelLoad", f"replica group {timing.index}: the model took {seconds:.0f} s "
                                                   f"to load (slow: over {slow_after:.0f} s); {why}"))
    return events
