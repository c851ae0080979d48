"""The fuzz tier (`kubellm bench fuzz`, bench/fuzz.py) at CI's size: 600 generated hostile requests through REST
(every route, bodies from /openapi.json, mutated and raw) and gRPC (every RPC, mutated fields and bytes) against
2 real tiny-model workers behind a real router. Nothing may answer 5xx or a server-error code, hang past its
deadline, die or grow by 50 MB, and a greedy request gives the same text afterwards. The full run is
`kubellm bench fuzz --requests 10000` (docs/benchmarks.md). The checks' own rules are unit tests below."""

from __future__ import annotations

import grpc
import pytest

from kubellm.bench.fuzz import CLIENT_ERRORS, _rest_status, _sse_problem, format_fuzz, fuzz


@pytest.mark.parametrize("status, valid, failed", [
    (200, True, False), (400, False, False), (413, False, False), (429, False, False), (404, False, False),
    (400, True, True),     # a body valid by the schema must not be refused
    (500, False, True), (503, False, True), (504, False, True),
])
def test_rest_statuses(status, valid, failed):
    assert _rest_status(status, "{}", valid).failed is failed


def test_an_error_event_after_200_fails_unless_it_is_a_client_error():
    ok = 'data: {"error": {"message": "m", "type": "invalid_request_error", "code": "invalid_argument"}}\n\n'
    bad = 'data: {"error": {"message": "m", "type": "internal_error", "code": "internal"}}\n\n'
    assert _sse_problem(ok + "data: [DONE]") is None
    assert "internal" in _sse_problem(bad + "data: [DONE]")
    assert grpc.StatusCode.INTERNAL not in CLIENT_ERRORS and grpc.StatusCode.UNAVAILABLE not in CLIENT_ERRORS


@pytest.mark.multiprocess
@pytest.mark.fuzz
def test_600_hostile_requests_leave_the_deployment_serving_the_same_text():
    pytest.importorskip("torch")
    result = fuzz(600, seed=0, warmup=40)
    report = format_fuzz(result)
    print(report)
    assert result["ok"], report
    counts = result["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == 600
    for route in ("POST /v1/completions", "POST /v1/chat/completions", "POST /mii/{deployment_name}",
                  "gRPC Generate", "gRPC GenerateStream"):
        assert counts[route].get("200", 0) + counts[route].get("OK", 0) > 0, (route, counts[route])
        assert sum(n for s, n in counts[route].items() if s not in ("200", "OK")) > 0, (route, counts[route])
    assert all(result["alive"].values()) and len(result["alive"]) == 3   # the router and both workers
    assert result["greedy"]["before"][0]   # a real text, compared after
