"""Which replica groups a deployment keeps, pure: scale-down removes the least-loaded groups, not the highest
indices, and scale-up fills the lowest free indices.

A group is one StatefulSet `<name>-g<index>`; its index is its identity (pod names, DNS, the headless
Service), so the kept set may have gaps after a scale-down (e.g. g0 and g2).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping


def choose_groups(existing: Collection[int], replicas: int, load: Mapping[int, float] | None = None,
                  serving: Collection[int] = ()) -> tuple[list[int], list[int]]:
    """(indices to keep or create, sorted; indices to remove, sorted) for `replicas` groups.

    Removed first: groups that do not serve (nothing to drain), then the fewest requests in flight
    (`load`, from the routers), then the highest index (ties, or no load known)."""
    load = load or {}
    existing = sorted(set(existing))
    if len(existing) > replicas:
        order = sorted(existing, key=lambda i: (i in serving, load.get(i, 0.0), -i))
        remove = set(order[:len(existing) - replicas])
        return [i for i in existing if i not in remove], sorted(remove)
    keep, index = list(existing), 0
    while len(keep) < replicas:
        if index not in existing:
            keep.append(index)
        index += 1
    return sorted(keep), []
