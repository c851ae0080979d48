"""The routing policies' pure decisions (runtime/serving/balancing.py), table by table."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.balancing import (
    POLICIES,
    HashRing,
    LeastLoaded,
    PrefixAffinity,
    RoundRobin,
    bounded_capacity,
    hash64,
    make_balancer,
    prompt_prefix,
    ring_ids,
)


@dataclass(eq=False)
class R:
    address: str
    in_flight: int = 0
    name: str = ""

    def __repr__(self):
        return f"{self.address}({self.in_flight})"


def replicas(*loads: int) -> list[R]:
    return [R(f"10.0.0.{i}:50051", load) for i, load in enumerate(loads)]


def names(order) -> list[int]:
    return [int(r.address.split(".")[3].split(":")[0]) for r in order]


def text_request(text: str) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=text)])


# --------------------------------------------------------------------------- small pieces


@pytest.mark.parametrize("total, n, factor, capacity", [
    (0, 2, 1.25, 1),     # idle: the first request may go anywhere (ceil(0.625))
    (1, 2, 1.25, 2),     # ceil(1.25)
    (3, 2, 1.25, 3),     # ceil(2.5)
    (3, 2, 1.0, 2),      # factor 1: exactly the mean, rounded up
    (9, 1, 1.1, 11),     # ceil(11.000000000000002) would be 12: the float error is rounded away
    (10, 4, 2.0, 6),     # ceil(5.5)
    (0, 1, 1.0, 1),      # a lone replica always has room
])
def test_bounded_capacity(total, n, factor, capacity):
    assert bounded_capacity(total, n, factor) == capacity


@pytest.mark.parametrize("loads, factor", list(itertools.product(
    [(0, 0), (5, 0), (3, 3), (9, 1, 0), (4, 4, 4, 4), (0, 0, 0, 12)], [1.0, 1.25, 2.0])))
def test_some_replica_is_always_within_the_bound(loads, factor):
    assert any(load < bounded_capacity(sum(loads), len(loads), factor) for load in loads)


def test_hash64_is_stable_across_processes():
    # Two router processes must agree: a fixed value, not Python's per-process salted hash().
    import subprocess
    import sys
    code = "from kubellm.runtime.serving.balancing import hash64; print(hash64(b'system prompt'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "random"}).stdout.strip()
    assert int(other) == hash64(b"system prompt")


@pytest.mark.parametrize("prompt, length, expected", [
    (llm_pb2.Prompt(text="You are a helpful assistant. Hi"), 8, b"You are "),
    (llm_pb2.Prompt(text="short"), 256, b"short"),
    (llm_pb2.Prompt(text="h\u00e9llo"), 2, "h\u00e9".encode()),                 # characters, not bytes
    (llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=[5, 6, 7, 8])), 2, None),   # checked below
    (llm_pb2.Prompt(chat=llm_pb2.Conversation(messages=[
        llm_pb2.ChatMessage(role="system", content="Be brief."),
        llm_pb2.ChatMessage(role="user", content="Hello")])), 1000, b"<system>\nBe brief.\n<user>\nHello\n"),
    (llm_pb2.Prompt(chat=llm_pb2.Conversation(messages=[
        llm_pb2.ChatMessage(role="system", content="Be brief."),
        llm_pb2.ChatMessage(role="user", content="Hello")])), 12, b"<system>\nBe "),
])
def test_prompt_prefix(prompt, length, expected):
    got = prompt_prefix(llm_pb2.GenerateRequest(prompts=[prompt]), length)
    if prompt.HasField("token_ids"):
        from array import array
        assert got == array("i", [5, 6]).tobytes()
        assert got != prompt_prefix(llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(
            token_ids=llm_pb2.TokenIds(ids=[5, 9, 7]))]), length)
    else:
        assert got == expected


def test_prompt_prefix_uses_the_first_prompt_and_none_without_one():
    two = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text="first"), llm_pb2.Prompt(text="second")])
    assert prompt_prefix(two, 100) == b"first"
    assert prompt_prefix(llm_pb2.GenerateRequest(), 100) is None
    # role matters: the same words as system and as user are different prefixes
    as_system = llm_pb2.Prompt(chat=llm_pb2.Conversation(messages=[llm_pb2.ChatMessage(role="system", content="x")]))
    as_user = llm_pb2.Prompt(chat=llm_pb2.Conversation(messages=[llm_pb2.ChatMessage(role="user", content="x")]))
    assert prompt_prefix(llm_pb2.GenerateRequest(prompts=[as_system]), 100) != \
        prompt_prefix(llm_pb2.GenerateRequest(prompts=[as_user]), 100)


# --------------------------------------------------------------------------- the ring


def test_ring_walk_holds_every_address_once():
    ring = HashRing(["a:1", "b:1", "c:1"])
    for key in (0, 1, 2**63, 2**64 - 1, hash64(b"x")):
        walk = ring.walk(key)
        assert sorted(walk) == ["a:1", "b:1", "c:1"]
    assert HashRing([]).walk(5) == ()


def test_ring_shares_keys_evenly():
    ring = HashRing([f"10.0.0.{i}:50051" for i in range(4)])
    counts = {}
    for k in range(4000):
        first = ring.walk(hash64(str(k).encode()))[0]
        counts[first] = counts.get(first, 0) + 1
    assert len(counts) == 4 and min(counts.values()) > 4000 / 4 * 0.7, counts


def test_ring_is_consistent_when_a_replica_joins_or_leaves():
    """Removing a replica moves only its own keys; adding one takes keys only for itself."""
    addresses = [f"10.0.0.{i}:50051" for i in range(5)]
    before, without, more = HashRing(addresses), HashRing(addresses[:4]), HashRing([*addresses, "10.0.0.9:50051"])
    keys = [hash64(str(k).encode()) for k in range(2000)]
    for key in keys:
        owner = before.walk(key)[0]
        if owner != addresses[4]:
            assert without.walk(key)[0] == owner
        assert more.walk(key)[0] in (owner, "10.0.0.9:50051")
    moved = sum(more.walk(k)[0] != before.walk(k)[0] for k in keys)
    assert 0 < moved < len(keys) / 3   # about 1/6 of the keys go to the newcomer


@pytest.mark.parametrize("named, expected", [
    ({"a:1": "g0", "b:1": "g1"}, {"a:1": "g0", "b:1": "g1"}),     # known, unique names
    ({"a:1": "", "b:1": "g1"}, {"a:1": "a:1", "b:1": "g1"}),      # not learned yet: the address
    ({"a:1": "g0", "b:1": "g0"}, {"a:1": "a:1", "b:1": "b:1"}),   # two claim one name: addresses
])
def test_ring_ids(named, expected):
    assert ring_ids([R(address, name=name) for address, name in named.items()]) == expected


def test_a_replica_back_at_a_new_address_takes_back_its_own_keys():
    """A pod restarted with a new IP but its stable name: its keys come back to it, the others' stay."""
    balancer = PrefixAffinity()
    before = [R("10.0.0.1:50051", name="llm-g0-0:50051"), R("10.0.0.2:50051", name="llm-g1-0:50051")]
    after = [R("10.0.0.9:50051", name="llm-g0-0:50051"), before[1]]
    keys = [balancer.key(text_request(f"system prompt {i}")) for i in range(40)]
    balancer.update(before)
    owners = [balancer.order(before, k)[0].name for k in keys]
    balancer.update(after)
    assert [balancer.order(after, k)[0].name for k in keys] == owners
    assert {"llm-g0-0:50051", "llm-g1-0:50051"} == set(owners)


# --------------------------------------------------------------------------- the policies


def test_round_robin_is_0101_over_the_healthy():
    rr, pool = RoundRobin(), replicas(0, 0)
    assert [names(rr.order(pool))[0] for _ in range(4)] == [0, 1, 0, 1]
    assert names(rr.order(pool)) == [0, 1]   # first = its turn, then the rest (the retries)
    assert rr.order([]) == []


@pytest.mark.parametrize("loads, expected_first", [
    ((0, 0, 0), None),       # all idle: in turn (checked below)
    ((3, 0, 5), 1),
    ((2, 2, 1), 2),
    ((1, 0, 0), None),       # 1 and 2 tie: they alternate
])
def test_least_loaded_picks_the_fewest_in_flight(loads, expected_first):
    ll, pool = LeastLoaded(), replicas(*loads)
    firsts = [names(ll.order(pool))[0] for _ in range(6)]
    least = min(loads)
    tied = [i for i, load in enumerate(loads) if load == least]
    if expected_first is not None:
        assert firsts == [expected_first] * 6
    else:
        assert set(firsts) == set(tied) and firsts[0] != firsts[1]   # ties taken in turn
    order = ll.order(pool)
    assert sorted(names(order)) == list(range(len(loads)))   # every replica, for the retries
    assert [r.in_flight for r in order] == sorted(r.in_flight for r in order)


def test_least_loaded_alternates_sequential_requests():
    ll, pool = LeastLoaded(), replicas(0, 0)
    assert [names(ll.order(pool))[0] for _ in range(4)] == [0, 1, 0, 1]


def _affinity(pool, **kw) -> PrefixAffinity:
    balancer = PrefixAffinity(**kw)
    balancer.update(pool)
    return balancer


def test_prefix_affinity_sends_a_prefix_to_one_replica_and_prefixes_spread():
    pool = replicas(0, 0, 0)
    balancer = _affinity(pool, prefix_length=32)
    system = "You are a careful assistant who answers in French. "
    firsts = {names(balancer.order(pool, balancer.key(text_request(system + f"question {i}"))))[0]
              for i in range(20)}
    assert len(firsts) == 1      # the user turn lies beyond prefix_length: one replica for all
    spread = {names(balancer.order(pool, balancer.key(text_request(f"system prompt number {i:03d}. hi"))))[0]
              for i in range(60)}
    assert spread == {0, 1, 2}   # different prefixes share the replicas


def test_prefix_affinity_order_is_the_ring_walk_over_healthy_replicas():
    pool = replicas(0, 0, 0)
    balancer = _affinity(pool)
    key = balancer.key(text_request("abc"))
    walk = balancer.ring.walk(key)
    assert [r.address for r in balancer.order(pool, key)] == list(walk)
    # the key's replica fails: its keys go to the next one on the ring, the rest keep theirs
    healthy = [r for r in pool if r.address != walk[0]]
    assert [r.address for r in balancer.order(healthy, key)] == list(walk[1:])


@pytest.mark.parametrize("loads_by_walk, factor, chosen", [
    # loads in ring-walk order (first = the key's own replica) -> index in that walk that takes the request
    ((0, 0), 1.25, 0),
    ((1, 0), 1.25, 0),     # capacity ceil(1.25*2/2)=2: 1 < 2, stays
    ((2, 0), 1.25, 1),     # capacity ceil(1.25*3/2)=2: full, spills to the next on the ring
    ((2, 0), 2.0, 0),      # a looser bound keeps it: capacity 3
    ((3, 3, 0), 1.25, 2),  # capacity ceil(1.25*7/3)=3: both full, the third takes it
    ((4, 1, 1), 1.0, 1),   # capacity 3: the next on the walk with room, not the least loaded
    ((5, 5), 1.0, 0),      # capacity 6: equal loads never spill
])
def test_prefix_affinity_bound_spills_to_the_next_on_the_ring(loads_by_walk, factor, chosen):
    pool = replicas(*([0] * len(loads_by_walk)))
    balancer = _affinity(pool, load_factor=factor)
    key = balancer.key(text_request("a shared system prompt"))
    walk = balancer.ring.walk(key)
    by_address = {r.address: r for r in pool}
    for address, load in zip(walk, loads_by_walk):
        by_address[address].in_flight = load
    order = [r.address for r in balancer.order(pool, key)]
    assert order[0] == walk[chosen]
    assert order[1:] == [a for a in walk if a != walk[chosen]]   # retries keep the ring order


def test_prefix_affinity_bound_spreads_a_flood():
    """One prefix, many requests in flight at once: no replica gets more than the bound."""
    pool = replicas(0, 0)
    balancer = _affinity(pool, load_factor=1.25)
    key = balancer.key(text_request("the one system prompt everyone uses"))
    own = balancer.ring.walk(key)[0]
    for n in range(40):
        chosen = balancer.order(pool, key)[0]
        assert chosen.in_flight < bounded_capacity(n, 2, 1.25)
        chosen.in_flight += 1
    loads = {r.address: r.in_flight for r in pool}
    assert max(loads.values()) <= 25 and loads[own] == max(loads.values()) > 20   # ceil(1.25 * 40 / 2) = 25


def test_prefix_affinity_without_a_key_is_round_robin():
    pool = replicas(0, 0)
    balancer = _affinity(pool)
    assert [names(balancer.order(pool, None))[0] for _ in range(4)] == [0, 1, 0, 1]
    assert balancer.key(llm_pb2.GenerateRequest()) is None


def test_prefix_affinity_replica_unknown_to_the_ring_is_still_used():
    pool = replicas(0, 0)
    balancer = _affinity(pool[:1])
    key = balancer.key(text_request("x"))
    assert sorted(names(balancer.order(pool, key))) == [0, 1]


def test_every_policy_orders_every_healthy_replica_once():
    rng = random.Random(0)
    for policy in POLICIES:
        balancer = make_balancer(policy)
        pool = replicas(*(rng.randint(0, 5) for _ in range(4)))
        balancer.update(pool)
        for i in range(20):
            healthy = [r for r in pool if rng.random() < 0.7]
            order = balancer.order(healthy, balancer.key(text_request(f"p{i}")))
            assert sorted(map(id, order)) == sorted(map(id, healthy)), policy


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "random"}, "--policy: 'random' is not one of round_robin, least_loaded, prefix_affinity"),
    ({"prefix_length": 0}, "--prefix-length: must be an integer >= 1"),
    ({"prefix_length": 2.5}, "--prefix-length"),
    ({"load_factor": 0.9}, "--load-factor: must be a number >= 1"),
    ({"load_factor": float("nan")}, "--load-factor"),
    ({"load_factor": float("inf")}, "--load-factor"),
])
def test_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_balancer(**{"policy": "prefix_affinity", **kwargs})


def test_make_balancer_builds_each_policy():
    assert type(make_balancer("round_robin")) is RoundRobin
    assert type(make_balancer("least_loaded")) is LeastLoaded
    balancer = make_balancer("prefix_affinity", prefix_length=64, load_factor=2)
    assert (balancer.prefix_length, balancer.load_factor) == (64, 2.0)
