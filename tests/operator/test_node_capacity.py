"""Node GPU capacity: listed once per TTL for every LLMDeployment, not per object per timer tick."""

import threading
import time
from types import SimpleNamespace

import pytest

from kubellm.operator.kube import NODE_CAPACITY_TTL, NodeGpuCapacity, largest_gpu_offer


def node(gpus=None, unschedulable=False):
    allocatable = {"cpu": "8"} | ({"nvidia.com/gpu": str(gpus)} if gpus is not None else {})
    return SimpleNamespace(spec=SimpleNamespace(unschedulable=unschedulable or None),
                           status=SimpleNamespace(allocatable=allocatable))


def test_largest_offer_of_a_schedulable_node():
    assert largest_gpu_offer([node(4), node(8), node(16, unschedulable=True), node()]) == 8
    assert largest_gpu_offer([node(), node(16, unschedulable=True)]) == 0 == largest_gpu_offer([])
    assert largest_gpu_offer([SimpleNamespace(spec=SimpleNamespace(unschedulable=False),
                                              status=SimpleNamespace(allocatable=None))]) == 0


def test_one_list_per_ttl_for_all_callers():
    nodes, lists, now = [node(8)], [], [100.0]

    def list_nodes():
        lists.append(now[0])
        return list(nodes)

    capacity = NodeGpuCapacity(list_nodes, clock=lambda: now[0])
    assert capacity.ttl == NODE_CAPACITY_TTL
    assert [capacity.largest() for _ in range(50)] == [8] * 50   # 50 objects' refreshes: one list
    nodes.append(node(16))
    now[0] += NODE_CAPACITY_TTL - 0.1
    assert capacity.largest() == 8 and len(lists) == 1           # not yet stale
    now[0] += 0.1
    assert capacity.largest() == 16 and lists == [100.0, 100.0 + NODE_CAPACITY_TTL]


def test_a_failed_list_is_retried_by_the_next_call():
    calls = []

    def list_nodes():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("API server unavailable")
        return [node(2)]

    capacity = NodeGpuCapacity(list_nodes)
    with pytest.raises(RuntimeError):
        capacity.largest()
    assert capacity.largest() == 2 and len(calls) == 2


def test_concurrent_refreshes_share_one_list():
    lists = []

    def slow_list():
        lists.append(1)
        time.sleep(0.2)
        return [node(4)]

    capacity = NodeGpuCapacity(slow_list)
    results = []
    threads = [threading.Thread(target=lambda: results.append(capacity.largest())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [4] * 8 and len(lists) == 1
