"""kubellm.metrics: the Prometheus text exposition format, written once for worker, router and operator."""

import threading
import urllib.error
import urllib.request

import pytest

from kubellm.metrics import CONTENT_TYPE, Registry, escape_label, format_value, parse, serve_metrics


def test_rendering_is_the_exposition_format():
    r = Registry()
    requests = r.counter("app_requests_total", "Requests by method and code.", ("method", "code"))
    r.counter("app_restarts_total", "Restarts.")
    r.gauge("app_temperature", "Degrees.").set(21.5)
    latency = r.histogram("app_latency_seconds", "Latency.", buckets=(1.0, 0.1), labelnames=("method",))
    requests.inc("Get", "OK")
    requests.inc("Get", "OK", amount=2)
    requests.inc("Get", "NOT_FOUND")
    for seconds in (0.05, 0.1, 0.5, 7.0):
        latency.observe(seconds, "Get")
    assert r.render() == (
        "# HELP app_requests_total Requests by method and code.\n"
        "# TYPE app_requests_total counter\n"
        'app_requests_total{method="Get",code="NOT_FOUND"} 1\n'
        'app_requests_total{method="Get",code="OK"} 3\n'
        "# HELP app_restarts_total Restarts.\n"
        "# TYPE app_restarts_total counter\n"
        "app_restarts_total 0\n"
        "# HELP app_temperature Degrees.\n"
        "# TYPE app_temperature gauge\n"
        "app_temperature 21.5\n"
        "# HELP app_latency_seconds Latency.\n"
        "# TYPE app_latency_seconds histogram\n"
        'app_latency_seconds_bucket{method="Get",le="0.1"} 2\n'
        'app_latency_seconds_bucket{method="Get",le="1"} 3\n'
        'app_latency_seconds_bucket{method="Get",le="+Inf"} 4\n'
        'app_latency_seconds_sum{method="Get"} 7.65\n'
        'app_latency_seconds_count{method="Get"} 4\n')


def test_unlabelled_histogram_is_there_before_any_observation():
    r = Registry()
    r.histogram("h_seconds", "H.", buckets=(0.5,))
    assert r.render().splitlines()[2:] == ['h_seconds_bucket{le="0.5"} 0', 'h_seconds_bucket{le="+Inf"} 0',
                                          "h_seconds_sum 0", "h_seconds_count 0"]


def test_histogram_buckets_are_cumulative_and_le_is_inclusive():
    r = Registry()
    h = r.histogram("h", "H.", buckets=(0.005, 0.01, 0.025, 120.0, float("inf")))  # +Inf is implied
    for seconds in (0.003, 0.007, 0.01, 200.0):
        h.observe(seconds)
    samples = parse(r.render())
    assert [samples[f'h_bucket{{le="{le}"}}'] for le in ("0.005", "0.01", "0.025", "120", "+Inf")] == [1, 3, 3, 3, 4]
    assert samples["h_count"] == h.count() == 4 and samples["h_sum"] == pytest.approx(200.02)
    assert list(samples).count('h_bucket{le="+Inf"}') == 1


def test_observe_many_is_observe_one_by_one():
    values = [0.003, 0.007, 0.01, 200.0, 0.02]
    one, many = Registry(), Registry()
    h_one = one.histogram("h", "H.", (0.005, 0.01, 0.025), ("m",))
    h_many = many.histogram("h", "H.", (0.005, 0.01, 0.025), ("m",))
    for v in values:
        h_one.observe(v, "a")
    h_many.observe_many(values[:2], "a")
    h_many.observe_many(values[2:], "a")
    h_many.observe_many([], "a")
    got, want = parse(many.render()), parse(one.render())
    assert got.pop('h_sum{m="a"}') == pytest.approx(want.pop('h_sum{m="a"}'))   # summed in another order
    assert got == want and h_many.count("a") == 5
    with pytest.raises(ValueError, match="takes labels"):
        h_many.observe_many([1.0])


def test_label_values_and_help_are_escaped():
    r = Registry()
    r.counter("c_total", 'Help with a \\ and a\nnewline "quoted".', ("path",)).inc('a\\b"c\nd')
    lines = r.render().splitlines()
    assert lines[0] == '# HELP c_total Help with a \\\\ and a\\nnewline "quoted".'
    assert lines[2] == 'c_total{path="a\\\\b\\"c\\nd"} 1'
    assert escape_label('"\\\n') == '\\"\\\\\\n'


def test_values():
    assert [format_value(v) for v in (3, 3.0, 0.25, 1e-4, float("inf"), float("-inf"), float("nan"), True)] == [
        "3", "3", "0.25", "0.0001", "+Inf", "-Inf", "NaN", "1"]
    assert format_value(2**60 + 1) == str(2**60 + 1)   # counts stay exact


def test_samples_from_a_function_and_gauge_removal():
    known = {"b": True, "a": False}
    r = Registry()
    r.gauge("up", "Up.", ("replica",), function=lambda: {(k,): int(v) for k, v in known.items()})
    r.counter("writes_total", "Writes.", function=lambda: 7)
    g = r.gauge("g", "G.", ("x",))
    g.set(2, "one")
    g.inc("one", amount=0.5)
    g.set(1, "two")
    g.remove("two")
    samples = parse(r.render())
    assert samples == {'up{replica="a"}': 0, 'up{replica="b"}': 1, "writes_total": 7, 'g{x="one"}': 2.5}
    assert r.render().index('up{replica="a"}') < r.render().index('up{replica="b"}')   # sorted by labels


def test_misuse_is_refused():
    r = Registry()
    c = r.counter("c_total", "C.", ("code",))
    with pytest.raises(ValueError):
        c.inc()                      # a label value missing
    with pytest.raises(ValueError):
        c.inc("OK", amount=-1)       # counters only go up
    with pytest.raises(ValueError):
        r.counter("c_total", "again")
    for bad in (lambda: r.gauge("no-dash", "x"), lambda: r.gauge("g", "x", ("le-x",)),
                lambda: r.histogram("h", "x", (1,), ("le",))):
        with pytest.raises(ValueError):
            bad()


def test_counting_is_thread_safe():
    r = Registry()
    c = r.counter("c_total", "C.", ("t",))
    h = r.histogram("h", "H.", (1.0,))

    def work():
        for _ in range(2000):
            c.inc("x")
            h.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value("x") == 8000 and h.count() == 8000


def test_served_over_http():
    r = Registry()
    r.counter("c_total", "C.").inc()
    server = serve_metrics(r.render, 0, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            assert parse(resp.read().decode()) == {"c_total": 1}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/", timeout=10)
        assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
