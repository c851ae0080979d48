"""handlers.failure_messages: each failed rank's log read once per crash (the previous instance of a
restarted container, else the current one), quoted in the message; a rank newly crash-looping posts one
Event. The Kube and kopf.event are fakes: no API server."""

import pytest

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import handlers
from kubellm.operator import resources as R
from kubellm.operator.status import CRASH_LOOP, TOO_MANY_RESTARTS
from kubellm.operator.supervision import RankFailure

OWNER = R.Owner("x", "ns", "uid")
SPEC = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "maxGroupRestarts": 1})


class FakeKube:
    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def pod_log(self, name, namespace, previous=False):
        self.calls.append((name, previous))
        return self.answers[previous]


def pod(uid, restarts):
    return {"metadata": {"name": f"x-g0-{uid}", "uid": uid}, "status": {"containerStatuses": [{"restartCount": restarts}]}}


@pytest.fixture
def fakes(monkeypatch):
    events = []
    monkeypatch.setattr(handlers.kopf, "event", lambda body, **kw: events.append(kw))
    monkeypatch.setattr(handlers, "_logs", {})

    def install(answers):
        kube = FakeKube(answers)
        monkeypatch.setattr(handlers, "_kube", kube)
        return kube
    return install, events


def test_a_crashed_containers_previous_log_is_read_once_and_quoted(fakes):
    install, events = fakes
    kube = install({True: ("boom: no such model\n", ""), False: ("", "")})
    failure = RankFailure(0, pod("a", 2), CRASH_LOOP)
    [(index, reason, message)] = handlers.failure_messages({}, OWNER, SPEC, (failure,))
    assert (index, reason) == (0, CRASH_LOOP) and "boom: no such model" in message and "previous" in message
    handlers.failure_messages({}, OWNER, SPEC, (failure,))
    assert kube.calls == [("x-g0-a", True)], "read again for the same crash"
    assert [e["reason"] for e in events] == ["RankCrashLooping"]
    # The next crash (restartCount 3) is read afresh.
    handlers.failure_messages({}, OWNER, SPEC, (RankFailure(0, pod("a", 3), CRASH_LOOP),))
    assert kube.calls[-1] == ("x-g0-a", True) and len(kube.calls) == 2


def test_no_previous_instance_falls_back_to_the_current_one_and_an_unreadable_log_says_why(fakes):
    install, events = fakes
    kube = install({True: ("", "400 Bad Request: previous terminated container not found"),
                    False: ("", "500 Internal Server Error: dial tcp: refused")})
    [(_, _, message)] = handlers.failure_messages({}, OWNER, SPEC, (RankFailure(0, pod("b", 1), TOO_MANY_RESTARTS, 1),))
    assert kube.calls == [("x-g0-b", True), ("x-g0-b", False)]
    assert "its log could not be read: 500 Internal Server Error" in message and "maxGroupRestarts" in message
    assert not events, "TooManyRestarts posts its Event when the group is left Failed, not here"


def test_a_rank_without_a_pod_reads_nothing(fakes):
    install, _ = fakes
    kube = install({})
    [(_, _, message)] = handlers.failure_messages({}, OWNER, SPEC, (RankFailure(0, None, TOO_MANY_RESTARTS, 1),))
    assert kube.calls == [] and "none left to name" in message
