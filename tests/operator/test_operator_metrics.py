"""The operator's /metrics: counters, phases of watched deployments, served over HTTP."""

import urllib.error
import urllib.request

import pytest

from kubellm.operator.metrics import OperatorMetrics
from kubellm.metrics import parse


def test_operator_metrics_are_served_and_track_phases():
    metrics = OperatorMetrics(writes=lambda: 7)
    metrics.reconciled("create")
    metrics.reconciled("create")
    metrics.restarted("failure")
    metrics.phase("ns", "a", "Ready")
    metrics.phase("ns", "b", "Progressing")
    metrics.phase("ns", "b", "Ready")
    metrics.phase("ns", "c", "Failed")
    metrics.phase("ns", "c", None)   # deleted: no longer counted
    server = metrics.serve(0, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            samples = parse(resp.read().decode())
        assert samples['kubellm_operator_reconciles_total{reason="create"}'] == 2
        assert samples['kubellm_operator_group_restarts_total{cause="failure"}'] == 1
        assert samples["kubellm_operator_writes_total"] == 7
        assert samples['kubellm_operator_llmdeployments{phase="Ready"}'] == 2
        assert samples['kubellm_operator_llmdeployments{phase="Failed"}'] == 0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/other", timeout=10)
        assert err.value.code == 404
    finally:
        server.shutdown()
