"""Kube.pod_log, the failed rank's log for the GroupFailed condition: bounded, and never raises."""

import pytest
from kubernetes.client.exceptions import ApiException

from kubellm.operator.kube import LOG_LIMIT_BYTES, LOG_TAIL_LINES, Kube


class FakeCore:
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        self.calls.append((name, namespace, kwargs))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def kube_with(answer) -> tuple[Kube, FakeCore]:
    k = object.__new__(Kube)   # no API server: only the core client is used
    k.core = FakeCore(answer)
    return k, k.core


def test_reads_the_tail_of_the_worker_container_bounded_and_with_a_timeout():
    k, core = kube_with("a\nb\n")
    assert k.pod_log("x-g0-1", "ns", previous=True) == ("a\nb\n", "")
    [(name, namespace, kwargs)] = core.calls
    assert (name, namespace, kwargs["container"], kwargs["previous"]) == ("x-g0-1", "ns", "worker", True)
    assert kwargs["tail_lines"] == LOG_TAIL_LINES and kwargs["limit_bytes"] == LOG_LIMIT_BYTES
    assert 0 < kwargs["_request_timeout"] <= 5


@pytest.mark.parametrize("error, words", [
    (ApiException(status=400, reason="Bad Request"), ["400 Bad Request"]),
    (ApiException(status=500, reason="Internal Server Error"), ["500"]),
    (TimeoutError("read timed out"), ["TimeoutError", "read timed out"]),
    (ConnectionRefusedError("refused"), ["ConnectionRefusedError"]),
])
def test_a_log_that_cannot_be_read_says_why_and_never_raises(error, words):
    k, _ = kube_with(error)
    text, why = k.pod_log("x-g0-1", "ns")
    assert text == "" and all(w in why for w in words), why


def test_the_api_servers_message_is_quoted():
    err = ApiException(status=500, reason="Internal Server Error")
    err.body = '{"kind":"Status","message":"Get \\"https://10.0.0.9:10250/containerLogs/ns/p/worker\\": dial tcp: refused"}'
    _, why = kube_with(err)[0].pod_log("p", "ns")
    assert why.startswith("500 Internal Server Error: Get ") and "10250" in why
