"""The built-in autoscaler's decision, pure: from the routers' load over time to a replica count.

KubeAI's approach, with HPA's stabilization: every refresh the operator reads how many requests the
routers have in flight (sent to a group, running or queued in its engine, plus those held waiting for a
group) and turns it into a recommendation, ceil(in flight / targetInFlightPerReplica) within
minReplicas..maxReplicas. The replica count follows the recommendations of a window, not the last one:

- up: the lowest recommendation of the last scaleUpDelaySeconds, once the window is that long, so that
  a burst shorter than the delay adds nothing;
- down: the highest of the last scaleDownDelaySeconds, so that a lull shorter than the delay removes
  nothing and a group is not stopped just before the next wave;
- from zero: at once, when any request waits (nothing serves it until a group starts).

A load the operator could not read is no sample: the count stays where it is rather than fall to the
minimum because a router did not answer.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from kubellm.api.spec import AutoscalingSpec


@dataclass(frozen=True)
class Load:
    """What the routers report at one moment, summed over the router pods."""

    in_flight: float   # sent to a replica group, not ended
    waiting: float     # held by a router, waiting for a ready group

    @property
    def total(self) -> float:
        return self.in_flight + self.waiting


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str    # a condition reason: ScaledUp, ScaledDown, ScaledFromZero, Steady, ...
    message: str


def recommendation(policy: AutoscalingSpec, load: Load) -> int:
    """Replica groups for this load alone: ceil(total / target) within min..max; at least one while any
    request is in flight or waits."""
    wanted = math.ceil(load.total / policy.targetInFlightPerReplica - 1e-9)
    if load.total > 0:
        wanted = max(wanted, 1)
    return min(max(wanted, policy.minReplicas), policy.maxReplicas)


@dataclass
class History:
    """Recommendations by time (monotonic seconds), kept as long as the longer delay needs them."""

    samples: deque = field(default_factory=deque)   # (time, recommendation)

    def add(self, at: float, replicas: int, keep: float) -> None:
        self.samples.append((at, replicas))
        # Keep one sample older than the window, so a window's length can be told.
        while len(self.samples) > 1 and self.samples[1][0] <= at - keep:
            self.samples.popleft()

    def spans(self, now: float, seconds: float) -> bool:
        return bool(self.samples) and self.samples[0][0] <= now - seconds

    def within(self, now: float, seconds: float) -> list[int]:
        """The recommendations in force over the last `seconds`: those made within it, and the one before it."""
        inside = [r for t, r in self.samples if t > now - seconds]
        before = [r for t, r in self.samples if t <= now - seconds]
        return inside + before[-1:]


def decide(policy: AutoscalingSpec, current: int, history: History, load: Load | None, now: float) -> Decision:
    """The replica count to set now. `history` takes the new sample (when `load` was read)."""
    if load is not None:
        history.add(now, recommendation(policy, load), keep=max(policy.scaleUpDelaySeconds,
                                                                policy.scaleDownDelaySeconds))
    if current < policy.minReplicas or current > policy.maxReplicas:
        bounded = min(max(current, policy.minReplicas), policy.maxReplicas)
        return Decision(bounded, "OutOfRange", f"replicas {current} brought within {policy.minReplicas}.."
                                               f"{policy.maxReplicas}")
    if load is None:
        return Decision(current, "LoadUnknown", "the routers' load could not be read; replicas left as they are")
    described = f"{load.in_flight:g} in flight, {load.waiting:g} waiting (target {policy.targetInFlightPerReplica:g} per replica)"
    if current == 0 and load.total > 0:
        wanted = recommendation(policy, load)
        return Decision(wanted, "ScaledFromZero", f"{described}: scaling from zero to {wanted}")
    if history.spans(now, policy.scaleUpDelaySeconds):
        up = min(history.within(now, policy.scaleUpDelaySeconds))
        if up > current:
            return Decision(up, "ScaledUp", f"{described} for {policy.scaleUpDelaySeconds}s: {current} -> {up}")
    if history.spans(now, policy.scaleDownDelaySeconds):
        down = max(history.within(now, policy.scaleDownDelaySeconds))
        if down < current:
            return Decision(down, "ScaledDown", f"{described} for {policy.scaleDownDelaySeconds}s: {current} -> {down}")
    return Decision(current, "Steady", f"{described}: {current} replicas")
