"""What one request and one caller may cost (serving/limits.py, the gateway's body checks; docs/limits.md): the
token bucket and its bounded memory as table tests on an explicit clock, the limits' own validation, the body
parser's refusals, and the REST gateway's 413 / 429 / 400s over real HTTP on loopback (an in-process upstream
that answers from the request it gets, so the checks seen are the gateway's alone)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.gateway import BadRequest, build_app, parse_json_body
from kubellm.runtime.serving.limits import Limits, RateLimiter, caller_key, host_of


# --------------------------------------------------------------------------- the token bucket


@pytest.mark.parametrize("rate, burst, times, want", [
    # A full bucket admits `burst` at once, then one per 1/rate seconds.
    (1.0, 3, [0, 0, 0, 0], [None, None, None, 1.0]),
    (2.0, 1, [0, 0, 0.25, 0.5], [None, 0.5, 0.25, None]),
    # Idle time refills, up to the burst and no further.
    (1.0, 2, [0, 0, 10, 10, 10], [None, None, None, None, 1.0]),
    # A refusal takes nothing: waiting the time it named is enough.
    (4.0, 1, [0, 0.1, 0.25], [None, 0.15, None]),
])
def test_bucket(rate, burst, times, want):
    limiter = RateLimiter(rate, burst)
    got = [limiter.wait_time("k", now=t) for t in times]
    assert [None if w is None else round(w, 6) for w in got] == want


def test_buckets_are_per_key():
    limiter = RateLimiter(1.0, 1)
    assert limiter.wait_time("a", now=0) is None
    assert limiter.wait_time("a", now=0) == 1.0
    assert limiter.wait_time("b", now=0) is None   # another caller has its own bucket


def test_memory_is_bounded_under_a_flood_of_keys():
    limiter = RateLimiter(1.0, 5, max_keys=100)
    for i in range(100_000):   # a flood of distinct addresses within one second
        limiter.wait_time(f"addr:10.0.{i >> 8}.{i & 255}", now=i * 1e-5)
    assert len(limiter) == 100
    # The most recent callers are the ones kept: their spent tokens still count.
    assert limiter.wait_time("addr:10.0.0.1", now=1.0) is None   # long evicted: a full bucket again
    for _ in range(5):
        limiter.wait_time("hot", now=1.0)
    assert limiter.wait_time("hot", now=1.0) is not None


def test_idle_buckets_are_dropped_once_full_again():
    limiter = RateLimiter(2.0, 4)   # full again after 2 s idle
    for key in "abc":
        limiter.wait_time(key, now=0)
    assert len(limiter) == 3
    limiter.wait_time("d", now=1.9)
    assert len(limiter) == 4
    limiter.wait_time("d", now=2.0)
    assert len(limiter) == 1   # a, b, c refilled: forgetting them changes nothing


@pytest.mark.parametrize("key_id, address, want", [
    ("3f2a9c1e", "127.0.0.1", "key:3f2a9c1e"),
    (None, "127.0.0.1", "addr:127.0.0.1"),
    (None, "ipv4:10.1.2.3:50544", "addr:10.1.2.3"),     # a gRPC peer: the port changes per connection
    (None, "ipv6:[::1]:50544", "addr:::1"),
    (None, "::1", "addr:::1"),                          # aiohttp's request.remote
    (None, "unix:/tmp/sock", "addr:unix:/tmp/sock"),
    (None, None, "addr:"),
])
def test_caller_key(key_id, address, want):
    assert caller_key(key_id, address) == want


def test_host_of_keeps_what_it_does_not_know():
    assert host_of("localhost") == "localhost"


@pytest.mark.parametrize("options, words", [
    ({"max_request_bytes": 0}, ["max_request_bytes", "--max-request-bytes", "1 or more"]),
    ({"max_request_bytes": 2 ** 31}, ["--max-request-bytes", "gRPC's largest message"]),
    ({"max_streams_per_connection": -1}, ["--max-streams-per-connection"]),
    ({"max_prompts_per_request": True}, ["--max-prompts-per-request"]),
    ({"rate_limit": 0}, ["--rate-limit", "more than 0"]),
    ({"rate_limit": float("nan")}, ["--rate-limit"]),
    ({"rate_limit": 5, "rate_limit_burst": 0}, ["--rate-limit-burst"]),
    ({"rate_limit_burst": 3}, ["--rate-limit-burst", "needs rate_limit"]),
])
def test_limits_refused(options, words):
    with pytest.raises(ValueError) as caught:
        Limits(**options)
    assert all(w in str(caught.value) for w in words), caught.value


def test_limits_defaults_and_burst():
    limits = Limits()
    assert (limits.max_request_bytes, limits.max_streams_per_connection, limits.rate_limit) == (1 << 20, 100, None)
    assert limits.rate_limiter() is None
    assert Limits(rate_limit=2.5).burst == 3 and Limits(rate_limit=0.2).burst == 1
    assert Limits(rate_limit=2, rate_limit_burst=10).rate_limiter().burst == 10


# --------------------------------------------------------------------------- the body parser


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "\xff\xfe"}', ["not UTF-8", "byte 12"]),
    (b"\xef\xbb\xbf{}", ["not valid JSON"]),                                     # a BOM is not JSON
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),                    # RecursionError in json
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, ["nested too deeply"]),
    (b'{"temperature": NaN}', ["NaN is not JSON"]),
    (b'{"temperature": -Infinity}', ["-Infinity is not JSON"]),
    (b'{"temperature": 1e400}', ["beyond a double's range"]),
    (b'{"seed": ' + b"9" * 5000 + b"}", ["not valid JSON", "digits"]),           # int() refuses 4300+ digits
    (b'{"prompt": "a\\ud800"}', ["lone surrogate"]),
    (b'["prompt"]', ["must be a JSON object"]),
    (b"", ["not valid JSON"]),
    (b'{"prompt": "hi"', ["not valid JSON"]),
])
def test_bodies_refused(raw, words):
    with pytest.raises(BadRequest) as caught:
        parse_json_body(raw)
    assert caught.value.status == 400
    assert all(w in caught.value.message for w in words), caught.value.message


def test_bodies_accepted():
    assert parse_json_body('{"prompt": "é 💥", "t": 1e308, "n": -0}'.encode()) == {"prompt": "é 💥", "t": 1e308, "n": 0}


# --------------------------------------------------------------------------- the gateway over HTTP


class Recording:
    """An upstream that answers every request with one response per prompt and keeps the last request."""

    deployment_name = "limits"
    replicas = (object(),)

    def __init__(self, session_len: int = 64):
        self.model_info = llm_pb2.ModelInfoResponse(session_len=session_len)
        self.requests: list = []

    def healthy_replicas(self):
        return list(self.replicas)

    async def forward_unary(self, method, request, metadata=(), timeout=None):
        self.requests.append(request)
        return llm_pb2.GenerateResponse(responses=[llm_pb2.Response(text="ok", index=i, finish_reason="stop")
                                                   for i in range(len(request.prompts))])

    async def forward_stream(self, request, metadata=(), timeout=None):
        self.requests.append(request)
        yield llm_pb2.GenerateStreamResponse(text="ok", finish_reason="stop")

    async def metrics_handler(self, request):
        return web.Response(text="")


def served(limits: Limits | None = None, upstream=None):
    """Run `check(client, upstream)` against build_app on a loopback port."""
    upstream = upstream or Recording()

    def run(check):
        async def main():
            async with TestClient(TestServer(build_app(upstream, limits=limits))) as client:
                return await check(client, upstream)
        return asyncio.run(main())
    return run


async def _post(client, path, data, **kw):
    reply = await client.post(path, data=data, **kw)
    return reply.status, dict(reply.headers), json.loads(await reply.text())


def test_body_past_the_limit_is_413_naming_the_limit_and_the_field():
    async def check(client, upstream):
        big = json.dumps({"prompt": "x" * 2000}).encode()
        status, _, body = await _post(client, "/v1/completions", big)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        assert all(w in body["error"]["message"] for w in (f"{len(big)} bytes", "1000 bytes", "spec.limits.maxRequestBytes",
                                                           "--max-request-bytes"))

        async def chunks():   # no Content-Length: refused once the body read passes the limit
            for _ in range(20):
                yield b"x" * 100
        status, _, body = await _post(client, "/mii/limits", chunks())
        assert status == 413 and "larger than this gateway's limit of 1000 bytes" in body["error"]["message"]
        status, _, _ = await _post(client, "/v1/completions", json.dumps({"prompt": "x" * 900}).encode())
        assert status == 200   # just under the limit
        assert len(upstream.requests) == 1
    served(Limits(max_request_bytes=1000))(check)


def test_rate_limit_is_429_with_retry_after_in_openai_shape():
    async def check(client, upstream):
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        answers = [await _post(client, "/v1/completions", body) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 429]
        status, headers, error = answers[2]
        assert headers["Retry-After"] == "2"   # 1 token at 0.5/s: about 2 s, rounded up
        assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["type"] == "requests"
        assert "0.5 requests per second per key" in error["error"]["message"]
        # Probes, scrapes, the schema and model lists are not counted.
        for path in ("/health", "/metrics", "/openapi.json", "/v1/models"):
            assert (await client.get(path)).status == 200
        status, _, _ = await _post(client, "/mii/limits", json.dumps({"prompts": ["a"]}).encode())
        assert status == 429   # every generation route draws on the same bucket
        assert len(upstream.requests) == 2
    served(Limits(rate_limit=0.5, rate_limit_burst=2))(check)


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": ["hi"] * 9}, "prompt", ["9 prompts", "max_prompts_per_request (8", "spec.limits.maxPromptsPerRequest"]),
    ("/v1/completions", {"prompt": [[5, 6]] * 9}, "prompt", ["9 prompts"]),
    ("/mii/limits", {"prompts": ["hi"] * 9}, "prompts", ["9 prompts"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 64}, "max_tokens", ["session_len is 64", "at most 63"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100},
     "max_completion_tokens", ["session_len is 64"]),
    ("/mii/limits", {"prompts": ["hi"], "max_new_tokens": 10 ** 6}, "max_new_tokens", ["session_len is 64"]),
    ("/v1/completions", {"prompt": "hi", "n": 129}, "n", ["must be <= 128"]),
])
def test_request_limits_are_400_naming_the_limit(path, body, param, words):
    async def check(client, upstream):
        status, _, error = await _post(client, path, json.dumps(body).encode())
        assert status == 400 and error["error"]["param"] == param, error
        assert all(w in error["error"]["message"] for w in words), error
        assert upstream.requests == []   # refused before anything was sent on
    served(Limits(max_prompts_per_request=8))(check)


def test_what_fits_passes():
    async def check(client, upstream):
        status, _, reply = await _post(client, "/v1/completions", json.dumps({"prompt": ["hi"] * 8, "max_tokens": 63})
                                       .encode())
        assert status == 200 and len(reply["choices"]) == 8
        assert upstream.requests[-1].config.max_new_tokens == 63
    served(Limits(max_prompts_per_request=8))(check)


def test_session_len_unknown_leaves_the_check_to_the_worker():
    upstream = Recording()
    upstream.model_info = None   # a router before any replica answered ModelInfo

    async def check(client, upstream):
        status, _, _ = await _post(client, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 5000})
                                   .encode())
        assert status == 200 and upstream.requests[-1].config.max_new_tokens == 5000
    served(upstream=upstream)(check)


def test_bad_bodies_over_http_are_400_whatever_the_charset():
    async def check(client, upstream):
        for data, headers in ((b'{"prompt": "\xff"}', {"Content-Type": "application/json; charset=bogus-9"}),
                              (b'{"prompt": "\xff"}', {"Content-Type": "application/json; charset=latin-1"}),
                              (b"[" * 200_000, {}), (b'{"prompt": "hi", "temperature": NaN}', {})):
            status, _, error = await _post(client, "/v1/completions", data, headers=headers)
            assert status == 400 and error["error"]["type"] == "invalid_request_error", (data[:20], error)
        assert upstream.requests == []
    served()(check)
