"""The requests of `kubellm bench fuzz`: valid bodies drawn from the gateway's own /openapi.json schemas, the
same bodies mutated field by field, raw bytes, and gRPC messages of every RPC mutated field by field or as
bytes. Pure and seeded: request `i` of seed `s` is the same on every run (no torch, no network).

    doc = json.load(urlopen(base + "/openapi.json"))
    case = make_case(doc, seed=0, index=17, deployment="fuzz", terminate=False)
    case.route, case.kind, case.body / case.payload

Valid values are conservative (a few words, a handful of tokens), so that a valid body is answered 2xx by a
tiny model whatever its session_len; everything else is meant to be refused (4xx, a client-error status) or
ignored, never to crash, hang or leak.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

from kubellm.bench.workload import WORDS
from kubellm.protos.v1 import llm_pb2

MiB = 1 << 20


# --------------------------------------------------------------------------- JSON with raw tokens


@dataclass(frozen=True)
class Raw:
    """JSON text put into a body as is: what json.dumps cannot write (NaN, 1e400, 5000 digits, deep nesting,
    a lone surrogate's escape)."""
    text: str


def dumps(value) -> str:
    """json.dumps, with Raw values written verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


# --------------------------------------------------------------------------- valid values from a schema


class SchemaValues:
    """Valid, small instances of an OpenAPI 3.1 document's schemas (JSON Schema 2020-12's keywords the
    gateway's document uses: type, enum, const, oneOf, anyOf, required, properties, items, min/max, lengths,
    examples)."""

    def __init__(self, document: dict, rng: random.Random, optional_share: float = 0.3):
        self.doc, self.rng, self.optional_share = document, rng, optional_share

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            node = self.doc
            for part in schema["$ref"].lstrip("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def value(self, schema: dict):
        rng, schema = self.rng, self.resolve(schema)
        if "examples" in schema:
            return rng.choice(schema["examples"])
        if "enum" in schema:
            return rng.choice(schema["enum"])
        if "const" in schema:
            return schema["const"]
        if "oneOf" in schema or ("anyOf" in schema and "type" not in schema):
            return self.value(rng.choice(schema.get("oneOf") or schema["anyOf"]))
        kind = schema.get("type", "object")
        if isinstance(kind, list):
            kind = rng.choice(kind)
        if kind == "object":
            return self.object(schema)
        if kind == "array":
            lo = schema.get("minItems", 0)
            n = rng.randint(lo, max(lo, min(schema.get("maxItems", 3), 3)))
            return [self.value(schema.get("items", {})) for _ in range(n)]
        if kind == "string":
            n = rng.randint(max(1, schema.get("minLength", 0)), 4)
            return " ".join(rng.choice(WORDS) for _ in range(n))
        if kind == "integer":
            lo = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
            return rng.randint(lo, min(schema.get("maximum", lo + 8), lo + 8))
        if kind == "number":
            lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
            hi = min(schema.get("maximum", lo + 2), lo + 2)
            value = round(rng.uniform(lo, hi), 3)
            return value if value > schema.get("exclusiveMinimum", -math.inf) else (lo + hi) / 2
        if kind == "boolean":
            return rng.random() < 0.5
        return None   # "null"

    def object(self, schema: dict) -> dict:
        rng = self.rng
        props = schema.get("properties", {})
        required = list(schema.get("required", []))
        if "anyOf" in schema:   # MII: prompts or prompt
            required += rng.choice(schema["anyOf"]).get("required", [])
        out = {}
        for name, sub in props.items():
            if name in required or rng.random() < self.optional_share:
                out[name] = self.value(sub)
        if "prompts" in out and "prompt" in out:   # MII takes prompts first; keep one
            out.pop("prompt")
        return out


def request_schemas(document: dict) -> dict[str, tuple[str, dict]]:
    """`"POST /path"` -> (the path as sent, its request body's schema) for every documented POST route."""
    out = {}
    for path, item in document["paths"].items():
        post = item.get("post")
        if not post or "requestBody" not in post:
            continue
        sent = path
        for param in item.get("parameters", []):
            sent = sent.replace("{" + param["name"] + "}", param["schema"]["enum"][0])
        out[f"POST {path}"] = (sent, post["requestBody"]["content"]["application/json"]["schema"])
    return out


def get_routes(document: dict) -> list[str]:
    return [path for path, item in document["paths"].items() if "get" in item]


# --------------------------------------------------------------------------- hostile values


def _deep(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


# Each: (name, a value to put in place of a field). Wrong types, huge and edge numbers, raw JSON numbers
# that Python's json would make non-finite, huge and odd strings, deep nesting.
HOSTILE_VALUES = [
    ("string", lambda rng: "not a number"),
    ("empty-string", lambda rng: ""),
    ("number", lambda rng: 12.5),
    ("negative", lambda rng: -1),
    ("zero", lambda rng: 0),
    ("huge-int", lambda rng: 10 ** 30),
    ("int64-max", lambda rng: 2 ** 63 - 1),
    ("int32-edge", lambda rng: 2 ** 31),
    ("huge-float", lambda rng: 1e308),
    ("tiny-float", lambda rng: 5e-324),
    ("bool", lambda rng: True),
    ("null", lambda rng: None),
    ("list", lambda rng: [1, "two", None]),
    ("object", lambda rng: {"nested": {"deeper": [1]}}),
    ("nan", lambda rng: Raw("NaN")),
    ("infinity", lambda rng: Raw("-Infinity")),
    ("1e400", lambda rng: Raw("1e400")),
    ("5000-digits", lambda rng: Raw("9" * 5000)),
    ("surrogate", lambda rng: Raw('"a\\ud800b"')),
    ("surrogate-low", lambda rng: Raw('"\\udfff"')),
    ("nul-and-controls", lambda rng: "a\x00b\x01\x1b[31m"),
    ("huge-string", lambda rng: "x" * rng.choice((10_000, 300_000))),
    ("string-past-limit", lambda rng: "y" * (MiB + 10)),
    ("deep-nesting", lambda rng: _deep(rng.choice((500, 5_000, 100_000)))),
    ("thousands-of-words", lambda rng: [f"w{i}" for i in range(rng.choice((257, 5_000)))]),
    ("long-word", lambda rng: ["z" * 10_000]),
    ("many-prompts", lambda rng: ["hi"] * rng.choice((257, 5_000))),
    ("token-ids-out-of-vocab", lambda rng: [2 ** 31 - 1, -5]),
    ("emoji", lambda rng: "💥" * 100),
]

# Whole bodies of a hostile shape, whatever the route.
HOSTILE_BODIES = [
    ("top-k-huge", {"top_k": 2 ** 31 - 1}),
    ("top-k-past-int32", {"top_k": 10 ** 12}),
    ("temperature-nan", {"temperature": Raw("NaN")}),
    ("temperature-inf", {"temperature": Raw("Infinity")}),
    ("temperature-past-float32", {"temperature": 1e39}),
    ("top-p-zero", {"top_p": 0}),
    ("repetition-penalty-zero", {"repetition_penalty": 0}),
    ("logprobs-past-cap", {"logprobs": 1000, "top_logprobs": 1000}),
    ("stop-5000", {"stop": [f"s{i}" for i in range(5000)]}),
    ("stop-words-5000", {"stop_words": [f"s{i}" for i in range(5000)]}),
    ("bad-words-1000", {"bad_words": [f"b{i}" for i in range(1000)]}),
    ("max-tokens-past-session", {"max_tokens": 10 ** 6, "max_new_tokens": 10 ** 6}),
    ("max-tokens-int32-max", {"max_tokens": 2 ** 31 - 1, "max_new_tokens": 2 ** 31 - 1}),
    ("n-many", {"n": 64}),
    ("best-of", {"best_of": 8}),
    ("echo", {"echo": True}),
    ("seed-negative", {"seed": -7}),
    ("min-tokens-huge", {"min_tokens": 10 ** 6, "min_new_tokens": 10 ** 6}),
    ("max-length-one", {"max_length": 1}),
    ("stream-string", {"stream": "yes"}),
    ("stream-options-odd", {"stream": True, "stream_options": [1]}),
    ("model-odd", {"model": {"$ne": 1}}),
    ("unknown-fields", {"frobnicate": True, "__proto__": {"x": 1}, "constructor": None}),
]


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One request: REST (`method`, `path`, `body` bytes, `headers`, `chunked`), raw HTTP bytes (`raw_http`) or
    gRPC (`rpc` full method name, `payload` bytes, `stream`). `valid`: built to be answered 2xx / OK."""
    route: str
    kind: str
    valid: bool = False
    method: str = "POST"
    path: str = ""
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    chunked: bool = False
    raw_http: bytes | None = None
    rpc: str = ""
    payload: bytes = b""
    stream: bool = False


def make_case(document: dict, seed: int, index: int, *, deployment: str, terminate: bool = True) -> Case:
    """Request `index` of the run seeded `seed` (`terminate`: Terminate may be sent, the router refusing it)."""
    rng = random.Random(f"{seed}:{index}")
    if rng.random() < 0.62:
        return _rest_case(document, rng, deployment)
    return _grpc_case(rng, terminate)


def valid_case(document: dict, seed: int, index: int) -> Case:
    """A valid request of a route in turn (every POST route and Generate / GenerateStream): the warm-up."""
    rng = random.Random(f"valid:{seed}:{index}")
    posts = request_schemas(document)
    routes = sorted(posts) + ["gRPC Generate", "gRPC GenerateStream"]
    route = routes[index % len(routes)]
    if route.startswith("gRPC"):
        name = route.split()[1]
        return Case(route, "valid", valid=True, rpc=LLM + name, payload=valid_generate(rng).SerializeToString(),
                    stream=name == "GenerateStream")
    path, schema = posts[route]
    return Case(route, "valid", valid=True, path=path, body=_json(SchemaValues(document, rng).value(schema)))


def _json(body) -> bytes:
    return dumps(body).encode("utf-8", "surrogatepass")


def _rest_case(doc: dict, rng: random.Random, deployment: str) -> Case:
    posts = request_schemas(doc)
    roll = rng.random()
    if roll < 0.05:   # the GET routes, and the POST routes with the wrong method
        path = rng.choice(get_routes(doc) + ["/v1/completions", "/nope", "/v1/models/../../etc/passwd"])
        return Case(f"GET {path}", "get", valid=path in get_routes(doc), method="GET", path=path)
    key = rng.choice(sorted(posts))
    path, schema = posts[key]
    values = SchemaValues(doc, rng)
    schema = values.resolve(schema)
    body = values.value(schema)
    if roll < 0.27:
        return Case(key, "valid", valid=True, path=path, body=_json(body))
    if roll < 0.67:   # one field (documented or not) given a hostile value
        name = rng.choice([*schema.get("properties", {}), "frobnicate"])
        label, make = rng.choice(HOSTILE_VALUES)
        body[name] = make(rng)
        return Case(key, f"field:{label}", path=path, body=_json(body))
    if roll < 0.80:
        label, extra = rng.choice(HOSTILE_BODIES)
        return Case(key, f"body:{label}", path=path, body=_json({**body, **extra}))
    if roll < 0.95:
        return _raw_body_case(key, path, body, rng, deployment)
    return _raw_http_case(key, path, rng)


def _raw_body_case(key: str, path: str, body: dict, rng: random.Random, deployment: str) -> Case:
    good = _json(body)
    choices = {
        "invalid-utf8": lambda: good[:-2] + b'\xff\xfe\xc3"}',
        "overlong-utf8": lambda: b'{"prompt": "\xc0\xaf", "prompts": "\xed\xa0\x80"}',
        "random-bytes": lambda: rng.randbytes(rng.choice((1, 64, 4096))),
        "truncated": lambda: good[:rng.randint(0, max(0, len(good) - 1))],
        "empty": lambda: b"",
        "top-level-array": lambda: b"[" + good + b"]",
        "top-level-string": lambda: b'"hello"',
        "bom": lambda: b"\xef\xbb\xbf" + good,
        "utf16": lambda: dumps(body).encode("utf-16"),
        "deep-object": lambda: b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "deep-array": lambda: b"[" * 200_000 + b"]" * 200_000,
        "zeros-past-limit": lambda: b"\0" * (MiB + 1),
        "duplicate-keys": lambda: good[:-1] + b', "prompt": 5, "messages": 7}',
        "wrong-deployment": lambda: good,
    }
    label = rng.choice(sorted(choices))
    data = choices[label]()
    headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/json; charset=latin-1",
                                           "application/json; charset=bogus-9", "multipart/form-data"])}
    if label == "wrong-deployment" and path.startswith("/mii/"):
        path = "/mii/" + rng.choice(["other", deployment + "x", "%00", "a" * 300])
    chunked = label == "zeros-past-limit" and rng.random() < 0.5   # no Content-Length: read up to the limit
    return Case(key, f"raw:{label}", path=path, body=data, headers=headers, chunked=chunked)


def _raw_http_case(key: str, path: str, rng: random.Random) -> Case:
    choices = {
        "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),   # a TLS hello
        "bad-request-line": b"POST\r\n\r\n",
        "huge-header": b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        "lying-length": b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":1}",
        "bad-chunks": b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        "negative-length": b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        "huge-length": b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n{}",
        "long-path": b"GET /" + b"a" * 50_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "http09": b"GET /health\r\n",
        "pipelined": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 20),
    }
    label = rng.choice(sorted(choices))
    return Case(key, f"http:{label}", raw_http=choices[label], path=path)


# --------------------------------------------------------------------------- gRPC

LLM = "/kubellm.v1.LLM/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def valid_generate(rng: random.Random) -> llm_pb2.GenerateRequest:
    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))

    prompts = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.random()
        if kind < 0.6:
            prompts.append(llm_pb2.Prompt(text=text()))
        elif kind < 0.8:
            prompts.append(llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=[rng.randint(3, 30) for _ in range(4)])))
        else:
            prompts.append(llm_pb2.Prompt(chat=llm_pb2.Conversation(messages=[
                llm_pb2.ChatMessage(role="user", content=text())])))
    config = llm_pb2.GenerationConfig(max_new_tokens=rng.randint(1, 8))
    if rng.random() < 0.5:
        config.temperature = rng.choice((0.0, 0.7, 1.0))
    if rng.random() < 0.3:
        config.top_k = rng.randint(0, 50)
    if rng.random() < 0.3:
        config.top_p = rng.choice((0.5, 0.9, 1.0))
    if rng.random() < 0.2:
        config.stop_words.extend(rng.sample(WORDS, 2))
    if rng.random() < 0.2:
        config.logprobs = rng.randint(0, 5)
    if rng.random() < 0.2:
        config.random_seed = rng.randint(0, 2 ** 40)
    return llm_pb2.GenerateRequest(prompts=prompts, config=config, request_id=f"fuzz-{rng.randint(0, 10 ** 6)}")


def _set(config, name, value):
    try:
        setattr(config, name, value)
    except (ValueError, TypeError, OverflowError):
        pass   # what protobuf itself refuses cannot be sent typed; the raw mutations cover the wire


# Each mutates a valid GenerateRequest in place: the hostile values a typed client can send.
GRPC_MUTATIONS = {
    "temperature-nan": lambda r, rng: _set(r.config, "temperature", math.nan),
    "temperature-inf": lambda r, rng: _set(r.config, "temperature", math.inf),
    "temperature-negative": lambda r, rng: _set(r.config, "temperature", -1.0),
    "top-p-zero": lambda r, rng: _set(r.config, "top_p", 0.0),
    "top-p-nan": lambda r, rng: _set(r.config, "top_p", math.nan),
    "top-p-two": lambda r, rng: _set(r.config, "top_p", 2.0),
    "top-k-max": lambda r, rng: _set(r.config, "top_k", 2 ** 31 - 1),
    "top-k-negative": lambda r, rng: _set(r.config, "top_k", -(2 ** 31)),
    "repetition-penalty-inf": lambda r, rng: _set(r.config, "repetition_penalty", math.inf),
    "max-new-tokens-max": lambda r, rng: _set(r.config, "max_new_tokens", 2 ** 31 - 1),
    "max-new-tokens-negative": lambda r, rng: _set(r.config, "max_new_tokens", -1),
    "min-new-tokens-max": lambda r, rng: _set(r.config, "min_new_tokens", 2 ** 31 - 1),
    "max-length-zero": lambda r, rng: _set(r.config, "max_length", 0),
    "logprobs-past-cap": lambda r, rng: _set(r.config, "logprobs", rng.choice((21, 1000, 2 ** 31 - 1))),
    "logprobs-negative": lambda r, rng: _set(r.config, "logprobs", -3),
    "seed-negative": lambda r, rng: _set(r.config, "random_seed", -(2 ** 63)),
    "stop-words-5000": lambda r, rng: r.config.stop_words.extend(f"w{i}" for i in range(5000)),
    "stop-word-long": lambda r, rng: r.config.stop_words.append("q" * 20_000),
    "stop-word-empty": lambda r, rng: r.config.stop_words.append(""),
    "bad-words-1000": lambda r, rng: r.config.bad_words.extend(f"b{i}" for i in range(1000)),
    "no-prompts": lambda r, rng: r.ClearField("prompts"),
    "empty-prompt": lambda r, rng: r.prompts.add(),
    "prompts-300": lambda r, rng: r.prompts.extend(llm_pb2.Prompt(text="hi") for _ in range(300)),
    "prompt-huge": lambda r, rng: r.prompts.add(text="word " * 100_000),
    "prompt-past-limit": lambda r, rng: r.prompts.add(text="x" * (MiB + 100)),
    "token-ids-out-of-vocab": lambda r, rng: r.prompts.add(token_ids=llm_pb2.TokenIds(ids=[2 ** 31 - 1, -1])),
    "token-ids-many": lambda r, rng: r.prompts.add(token_ids=llm_pb2.TokenIds(ids=[5] * 100_000)),
    "chat-empty": lambda r, rng: r.prompts.add(chat=llm_pb2.Conversation()),
    "chat-odd-roles": lambda r, rng: r.prompts.add(chat=llm_pb2.Conversation(messages=[
        llm_pb2.ChatMessage(role=role, content="hi") for role in ("assistant", "", "tool", "x" * 1000)])),
    "chat-many": lambda r, rng: r.prompts.add(chat=llm_pb2.Conversation(messages=[
        llm_pb2.ChatMessage(role="user", content="hi") for _ in range(5000)])),
    "text-controls": lambda r, rng: r.prompts.add(text="\x00\x01\x7f\u202e\ufeff"),
    "request-id-huge": lambda r, rng: setattr(r, "request_id", "r" * 100_000),
}


def _raw_mutations(good: bytes, rng: random.Random) -> dict[str, bytes]:
    def flip():
        data = bytearray(good or b"\0")
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    return {
        "bit-flips": flip(),
        "truncated": good[:rng.randint(0, max(0, len(good) - 1))],
        "random": rng.randbytes(rng.choice((1, 16, 1024))),
        "huge-length-prefix": b"\x0a\xff\xff\xff\xff\x0f" + good,   # field 1, a 4 GiB length
        "invalid-utf8-text": b"\x0a\x05\x0a\x03\xff\xfe\xfd",     # prompts[0].text = 3 bytes, not UTF-8
        "surrogate-text": b"\x0a\x05\x0a\x03\xed\xa0\x80",        # UTF-8-encoded U+D800
        "deep-nesting": b"\x0a\x02\x12\x00" * 1 + (b"\x12\x7f" * 64),
        "unknown-fields": good + b"\xf8\xff\xff\xff\x0f\x01" + b"\x9a\x05\x03abc",
        "empty": b"",
        "past-limit": b"\0" * (MiB + 1),
    }


def _grpc_case(rng: random.Random, terminate: bool) -> Case:
    roll = rng.random()
    if roll < 0.08:   # the other RPCs
        other = [("ModelInfo", LLM + "ModelInfo", llm_pb2.ModelInfoRequest().SerializeToString(), False),
                 ("Health.Check", HEALTH_CHECK, rng.choice((b"", b"\x0a\x0ekubellm.v1.LLM", b"\x0a\x04nope",
                                                             b"\x0a\x03\xff\xfe\xfd")), False),
                 ("Reflection", REFLECTION, rng.choice((b"\x3a\x00", b"\x1a\x0ekubellm.v1.LLM", b"\x22\x05nope!",
                                                       rng.randbytes(12))), True),
                 ("Unknown", LLM + "Frobnicate", b"", False)]
        if terminate:
            other.append(("Terminate", LLM + "Terminate", rng.choice((b"", rng.randbytes(8))), False))
        name, method, payload, stream = rng.choice(other)
        valid = name == "ModelInfo" or (name == "Health.Check" and payload in (b"", b"\x0a\x0ekubellm.v1.LLM"))
        return Case(f"gRPC {name}", "rpc", valid=valid, rpc=method, payload=payload, stream=stream)
    stream = rng.random() < 0.4
    name = "GenerateStream" if stream else "Generate"
    request = valid_generate(rng)
    if roll < 0.3:
        return Case(f"gRPC {name}", "valid", valid=True, rpc=LLM + name, payload=request.SerializeToString(),
                    stream=stream)
    if roll < 0.78:
        label = rng.choice(sorted(GRPC_MUTATIONS))
        GRPC_MUTATIONS[label](request, rng)
        return Case(f"gRPC {name}", f"field:{label}", rpc=LLM + name, payload=request.SerializeToString(),
                    stream=stream)
    raws = _raw_mutations(request.SerializeToString(), rng)
    label = rng.choice(sorted(raws))
    return Case(f"gRPC {name}", f"raw:{label}", rpc=LLM + name, payload=raws[label], stream=stream)
