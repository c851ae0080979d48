"""How the router orders the replicas for one request: the routing policies, as pure decisions (no grpc).

    balancer = make_balancer("prefix_affinity", prefix_length=256, load_factor=1.25)
    balancer.update(replicas)                        # whenever the leaders or their names change
    key = balancer.key(request)                      # a kubellm.v1 GenerateRequest; None if not needed
    attempts = balancer.order(healthy, key)          # first = the choice, then the retries in order

A replica is anything with `address`, `name` (what it calls itself; "" while unknown) and `in_flight`
(requests the router has sent it that have not ended: the router counts them itself, it never asks
a worker).

- round_robin: in turn over the healthy replicas, one step per request (DeepSpeed-MII's 0,1,0,1).
- least_loaded: fewest in flight first; ties in turn, so idle replicas still alternate.
- prefix_affinity: consistent hashing with bounded load (CHWBL; Mirrokni et al. 2016, as KubeAI does).
  The request's key hashes its leading `prefix_length` characters of prompt text (token ids for a
  token-id prompt), so requests sharing a system prompt reach the replica that has it in its prefix
  cache. Walking the ring from the key, the first healthy replica with fewer in flight than
  ceil(load_factor * (total in flight + 1) / healthy replicas) takes it: the bound stops a popular
  prefix from flooding one replica. The ring holds every known replica (healthy or not) with
  `VIRTUAL_NODES` points each, so a replica leaving or failing moves only its own keys. A replica's
  place on the ring is its name (a pod's stable hostname:port) when known and unique, else its
  address: a restarted pod with a new IP takes back its own keys, and routers agree on the ring.

Every order holds every healthy replica once, so a failed attempt before the first token is retried
on the next one, whatever the policy.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from array import array
from collections.abc import Sequence
from typing import Protocol

POLICIES = ("round_robin", "least_loaded", "prefix_affinity")
VIRTUAL_NODES = 100   # ring points per replica: enough that 2-10 replicas share the keys evenly


class Balanced(Protocol):
    address: str
    name: str
    in_flight: int


def ring_ids(replicas: Sequence[Balanced]) -> dict[str, str]:
    """address -> place on the ring: the replica's name where it is known and no other replica has it."""
    names = [getattr(r, "name", "") for r in replicas]
    return {r.address: name if name and names.count(name) == 1 else r.address for r, name in zip(replicas, names)}


def bounded_capacity(total_in_flight: int, replicas: int, load_factor: float) -> int:
    """CHWBL's bound: a replica takes one more request while its in-flight count is below this.
    With load_factor >= 1 the capacities add up to more than the requests, so one always has room."""
    # round(): 1.1 * 10 is 11.000000000000002 in floats, whose ceiling would loosen the bound by one.
    return math.ceil(round(load_factor * (total_in_flight + 1) / replicas, 9))


def hash64(data: bytes) -> int:
    """A hash that every router process computes alike (unlike hash(), which is salted per process),
    so that two routers of one deployment send a prefix to the same replica."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prompt_prefix(request, prefix_length: int) -> bytes | None:
    """The bytes hashed for a GenerateRequest: its first prompt's leading `prefix_length` characters
    (chat: the messages in order, role and content, as rendered text; token ids: the first
    `prefix_length` ids). None when the request has no prompt (nothing to be affine to)."""
    if not request.prompts:
        return None
    prompt = request.prompts[0]
    kind = prompt.WhichOneof("kind")
    if kind == "token_ids":
        return array("i", prompt.token_ids.ids[:prefix_length]).tobytes()
    if kind == "chat":
        parts, size = [], 0
        for message in prompt.chat.messages:   # stop once the prefix is long enough: a long history costs nothing
            part = f"<{message.role}>\n{message.content}\n"
            parts.append(part)
            size += len(part)
            if size >= prefix_length:
                break
        text = "".join(parts)[:prefix_length]
    else:
        text = prompt.text[:prefix_length]
    return text.encode("utf-8", "surrogatepass")


class HashRing:
    """`VIRTUAL_NODES` points per replica id on a 64-bit ring; `walk(key)` gives the ids in the order
    met going clockwise from the key, each once."""

    def __init__(self, ids: Sequence[str], virtual_nodes: int = VIRTUAL_NODES):
        points = sorted((hash64(f"{node}#{i}".encode()), node) for node in dict.fromkeys(ids)
                        for i in range(virtual_nodes))
        self._hashes = [h for h, _ in points]
        self._owners = [a for _, a in points]
        self._size = len(dict.fromkeys(ids))
        self._walks: dict[int, tuple[str, ...]] = {}  # point index -> its walk: few keys, computed once each

    def walk(self, key: int) -> tuple[str, ...]:
        if not self._hashes:
            return ()
        start = bisect.bisect_left(self._hashes, key) % len(self._hashes)
        walk = self._walks.get(start)
        if walk is None:
            seen: dict[str, None] = {}
            owners, n = self._owners, len(self._owners)
            i = start
            while len(seen) < self._size:
                seen.setdefault(owners[i], None)
                i = (i + 1) % n
            walk = self._walks[start] = tuple(seen)
        return walk


class RoundRobin:
    needs_key = False

    def __init__(self):
        self._turn = 0

    def update(self, replicas: Sequence[Balanced]) -> None:
        pass

    def key(self, request) -> int | None:
        return None

    def order(self, healthy: list, key: int | None = None) -> list:
        if not healthy:
            return []
        start = self._turn % len(healthy)
        self._turn += 1
        return healthy[start:] + healthy[:start]


class LeastLoaded(RoundRobin):
    def order(self, healthy: Sequence[Balanced], key: int | None = None) -> list:
        if not healthy:
            return []
        least = min(r.in_flight for r in healthy)
        tied = [r for r in healthy if r.in_flight == least]
        first = tied[self._turn % len(tied)]   # equally idle replicas take turns, as round robin would
        self._turn += 1
        return [first, *sorted((r for r in healthy if r is not first), key=_in_flight)]


def _in_flight(replica: Balanced) -> int:
    return replica.in_flight


class PrefixAffinity(RoundRobin):
    needs_key = True

    def __init__(self, prefix_length: int = 256, load_factor: float = 1.25, virtual_nodes: int = VIRTUAL_NODES):
        super().__init__()
        self.prefix_length = prefix_length
        self.load_factor = load_factor
        self.virtual_nodes = virtual_nodes
        self.ring = HashRing([], virtual_nodes)
        self._ids: dict[str, str] = {}

    def update(self, replicas: Sequence[Balanced]) -> None:
        ids = ring_ids(replicas)
        if ids != self._ids:   # the same replicas: keep the ring and its cached walks
            self._ids = ids
            self.ring = HashRing(list(ids.values()), self.virtual_nodes)

    def key(self, request) -> int | None:
        prefix = prompt_prefix(request, self.prefix_length)
        return None if prefix is None else hash64(prefix)

    def order(self, healthy: Sequence[Balanced], key: int | None = None) -> list:
        if key is None or not healthy:   # nothing to be affine to (ModelInfo, an empty request)
            return super().order(healthy)
        ids = self._ids
        by_id = {ids.get(r.address, r.address): r for r in healthy}
        ordered = [by_id.pop(i) for i in self.ring.walk(key) if i in by_id]
        ordered += by_id.values()   # healthy but not on the ring (update() not called with it)
        capacity = bounded_capacity(sum(r.in_flight for r in ordered), len(ordered), self.load_factor)
        for i, replica in enumerate(ordered):
            if replica.in_flight < capacity:
                return [replica, *ordered[:i], *ordered[i + 1:]] if i else ordered
        return ordered   # unreachable with load_factor >= 1 (the capacities cover every request)


def make_balancer(policy: str = "round_robin", *, prefix_length: int = 256, load_factor: float = 1.25):
    """The balancer of `policy`; bad values raise ValueError naming the flag and what it takes."""
    if policy not in POLICIES:
        raise ValueError(f"--policy: {policy!r} is not one of {', '.join(POLICIES)}")
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 1:
        raise ValueError(f"--prefix-length: must be an integer >= 1 (got {prefix_length!r})")
    if isinstance(load_factor, bool) or not isinstance(load_factor, (int, float)) or not load_factor >= 1 \
            or math.isinf(load_factor):
        raise ValueError(f"--load-factor: must be a number >= 1, e.g. 1.25 (got {load_factor!r}); "
                         "1 keeps every replica at the mean, larger lets a prefix's replica take more")
    if policy == "round_robin":
        return RoundRobin()
    if policy == "least_loaded":
        return LeastLoaded()
    return PrefixAffinity(prefix_length, float(load_factor))
