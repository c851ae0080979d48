"""The fuzzer's requests (bench/fuzz_inputs.py): seeded, valid ones valid by the gateway's own schemas, and the
mix covering every route and RPC with each kind of hostile input."""

from __future__ import annotations

import collections
import functools
import json
import random

import jsonschema
from google.protobuf.message import DecodeError

from kubellm.bench.fuzz_inputs import (GRPC_MUTATIONS, HOSTILE_VALUES, Raw, SchemaValues, dumps, make_case,
                                       request_schemas, valid_case)
from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.openapi import openapi_document

DOC = openapi_document("fuzz")
N = 1500


@functools.cache
def _cases(seed=0, n=N):
    return tuple(make_case(DOC, seed, i, deployment="fuzz", terminate=True) for i in range(n))


def test_request_i_of_seed_s_is_the_same_every_time():
    assert _cases(5, 200) == _cases(5, 200)
    assert _cases(5, 200) != _cases(6, 200)


def test_raw_json_is_written_verbatim():
    assert dumps({"a": Raw("NaN"), "b": [1, Raw("1e400")], "c": "é"}) == '{"a":NaN,"b":[1,1e400],"c":"\\u00e9"}'


def test_valid_bodies_match_their_schemas():
    schemas = DOC["components"]["schemas"]
    for route, (path, schema) in request_schemas(DOC).items():
        name = schema["$ref"].rsplit("/", 1)[1]
        rng = random.Random(route)
        validator = jsonschema.Draft202012Validator({**schemas[name], "components": DOC["components"]})
        for _ in range(100):
            validator.validate(SchemaValues(DOC, rng).value(schema))
    for i in range(40):
        case = valid_case(DOC, 0, i)
        assert case.valid
        if case.rpc:
            assert llm_pb2.GenerateRequest.FromString(case.payload).prompts
        else:
            json.loads(case.body)


def test_the_mix_covers_every_route_rpc_and_hostile_kind():
    cases = _cases()
    routes = collections.Counter(c.route for c in cases)
    for route in (*request_schemas(DOC), "GET /health", "GET /metrics", "GET /openapi.json", "GET /v1/models",
                  "gRPC Generate", "gRPC GenerateStream", "gRPC ModelInfo", "gRPC Terminate", "gRPC Health.Check",
                  "gRPC Reflection"):
        assert routes[route] > 0, route
    kinds = {c.kind for c in cases}
    for label, _ in HOSTILE_VALUES:
        assert f"field:{label}" in kinds, label
    for label in GRPC_MUTATIONS:
        assert f"field:{label}" in kinds, label
    for kind in ("raw:invalid-utf8", "raw:deep-array", "raw:zeros-past-limit", "http:bad-chunks", "raw:bit-flips",
                 "raw:huge-length-prefix", "body:top-k-huge", "body:stop-5000", "body:logprobs-past-cap"):
        assert kind in kinds, kind
    assert 0.2 < sum(c.valid for c in cases) / len(cases) < 0.4   # mostly hostile, enough valid traffic


def test_terminate_is_never_sent_where_it_would_be_honoured():
    assert any(c.rpc.endswith("/Terminate") for c in _cases())
    cases = (make_case(DOC, 0, i, deployment="fuzz", terminate=False) for i in range(N))
    assert not any(c.rpc.endswith("/Terminate") for c in cases)


def test_typed_mutations_still_serialize_and_raw_ones_often_do_not_parse():
    cases = [c for c in _cases() if c.rpc.endswith("/Generate") or c.rpc.endswith("/GenerateStream")]
    unparsable = 0
    for case in cases:
        try:
            llm_pb2.GenerateRequest.FromString(case.payload)
        except DecodeError:
            unparsable += 1
            assert case.kind.startswith("raw:"), case.kind
    assert unparsable > 10
