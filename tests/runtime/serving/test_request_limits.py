"""Nothing in one request takes a worker down: hostile inputs are refused naming the field, the limit and the fix
(INVALID_ARGUMENT on gRPC, a ValueError in the Python API), or handled cleanly (a huge top_k, a tiny temperature).

Three tiers over the same table of hostile requests (docs/grpc.md, "Request limits"):
- unit: the pure checks (config.py's request limits, GenerationConfig's validators, protocol.py, the servicer's
  parser, the sampler's clamps);
- model: the Python API, `pipeline()`, which raises the clear error and afterwards gives the same greedy text;
- multiprocess: a real `kubellm worker` process over gRPC: each hostile request ends INVALID_ARGUMENT naming the
  field, the worker stays SERVING, a stream running meanwhile completes, and a good request afterwards returns the
  same greedy text as before.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
from processes import free_port, wait_serving

from kubellm.runtime.config import (ConfigError, EngineConfig, generation_config, generation_problem,
                                    max_new_tokens_problem, prompt_count_problem)
from kubellm.runtime.errors import RequestError

NAN, INF = float("nan"), float("inf")
SESSION_LEN = 64
ENGINE = {"num_kv_blocks": 256, "block_size": 4, "max_batch_size": 8, "session_len": SESSION_LEN, "device": "cpu"}
GOOD = "The capital of France is"


# The hostile requests: (id, prompts, generation options, what the refusal must name). Prompts are a list (a batch).
HOSTILE = [
    ("temperature-nan", [GOOD], {"temperature": NAN}, ["temperature", "finite"]),
    ("temperature-inf", [GOOD], {"temperature": INF}, ["temperature", "finite"]),
    ("temperature-negative-inf", [GOOD], {"temperature": -INF}, ["temperature", "finite"]),
    ("top-p-nan", [GOOD], {"top_p": NAN}, ["top_p", "finite"]),
    ("top-p-inf", [GOOD], {"top_p": INF}, ["top_p", "finite"]),
    ("repetition-penalty-nan", [GOOD], {"repetition_penalty": NAN}, ["repetition_penalty", "finite"]),
    ("repetition-penalty-inf", [GOOD], {"repetition_penalty": INF}, ["repetition_penalty", "finite"]),
    ("logprobs-past-the-cap", [GOOD], {"logprobs": 21}, ["logprobs", "max_logprobs (20)"]),
    ("logprobs-huge", [GOOD], {"logprobs": 2 ** 31 - 1}, ["logprobs", "max_logprobs (20)"]),
    ("logprobs-negative", [GOOD], {"logprobs": -1}, ["logprobs"]),
    ("stop-words-thousands", [GOOD], {"stop_words": [f"w{i}" for i in range(5000)]},
     ["stop_words", "5000", "max_stop_words (256)"]),
    ("stop-word-too-long", [GOOD], {"stop_words": ["x" * 10_000]}, ["stop_words[0]", "max_word_chars (256)"]),
    ("stop-word-empty", [GOOD], {"stop_words": ["ok", ""]}, ["stop_words", "empty"]),
    ("bad-words-thousands", [GOOD], {"bad_words": [f"w{i}" for i in range(1000)]},
     ["bad_words", "max_bad_words (64)"]),
    ("max-new-tokens-zero", [GOOD], {"max_new_tokens": 0}, ["max_new_tokens"]),
    ("max-new-tokens-negative", [GOOD], {"max_new_tokens": -5}, ["max_new_tokens"]),
    ("random-seed-negative", [GOOD], {"random_seed": -1}, ["random_seed"]),
    ("top-k-negative", [GOOD], {"top_k": -1}, ["top_k"]),
    ("prompts-past-the-limit", [GOOD] * 257, {}, ["prompts", "257", "max_prompts_per_request (256)"]),
    ("prompt-text-huge", ["x" * 200_000], {}, ["prompts[0]", "characters", "session_len"]),
    ("prompt-tokens-past-session-len", [list(range(1, 65))], {}, ["prompts[0]", "64 tokens", "session_len"]),
    ("prompt-token-ids-huge", [[5] * 1_000_000], {}, ["prompts[0]", "1000000 tokens", "session_len"]),
    ("prompt-token-id-outside-vocab", [[5, 10 ** 9]], {}, ["prompts[0]", "outside the vocabulary"]),
    ("prompt-token-id-negative", [[5, -1]], {}, ["prompts[0]", "outside the vocabulary"]),
    ("chat-of-empty-messages", [[{"role": "user", "content": ""}] * 20_000], {}, ["prompts[0]", "characters"]),
    ("prompt-empty", [""], {}, ["prompts[0]", "empty"]),
    ("no-prompts", [], {}, ["prompts", "at least one"]),
]
HOSTILE_IDS = [case[0] for case in HOSTILE]

# Refused by a server only: the Python API, like LMDeploy's pipeline and vLLM's LLM, cuts max_new_tokens to the
# session instead (vLLM's server refuses prompt + max_tokens > max_model_len, and so does the worker).
SERVING_HOSTILE = [
    ("max-new-tokens-past-session-len", [GOOD], {"max_new_tokens": 2 ** 31 - 1},
     ["max_new_tokens", "session_len (64)", "at most"]),
    ("max-new-tokens-one-past-the-room", [list(range(5, 15))], {"max_new_tokens": SESSION_LEN - 9},
     ["max_new_tokens", "10 tokens", "65 in all", "at most 54 new tokens"]),
]

# Python strings may hold what no UTF-8 wire can carry: lone surrogates (JSON's "\ud800" decodes to one).
SURROGATES = [
    ("prompt-surrogate", ["abc\ud800"], {}, ["prompts[0]", "surrogate", "U+D800"]),
    ("chat-surrogate", [[{"role": "user", "content": "hi \udfff"}]], {}, ["prompts[0][0].content", "surrogate"]),
    ("stop-word-surrogate", [GOOD], {"stop_words": ["\ud83d"]}, ["stop_words", "surrogate"]),
    ("bad-word-surrogate", [GOOD], {"bad_words": ["ok", "x\udc00"]}, ["bad_words", "word 1", "surrogate"]),
]

# Asked for, not refused: the engine handles these cleanly.
HANDLED = [
    ("top-k-past-the-vocabulary", {"top_k": 10 ** 9, "temperature": 1.0, "random_seed": 3}),   # keeps every token
    ("top-k-int32-max", {"top_k": 2 ** 31 - 1, "temperature": 1.0, "random_seed": 3}),
    ("temperature-tiny", {"temperature": 1e-30, "random_seed": 3}),   # raised to 0.01, as vLLM does
    ("temperature-float32-max", {"temperature": 3.4e38, "random_seed": 3}),
    ("logprobs-at-the-cap", {"logprobs": 20}),
    ("min-new-tokens-huge", {"min_new_tokens": 2 ** 31 - 1}),   # EOS held off; session_len still ends it
    ("stop-words-at-the-limit", {"stop_words": [f"w{i:03d}" * 64 for i in range(256)]}),
    ("bad-words-at-the-limit", {"bad_words": [f"zq{i}" for i in range(64)]}),
    ("max-new-tokens-that-fits", {"max_new_tokens": 4}),
]
HANDLED_IDS = [case[0] for case in HANDLED]


def _assert_names(message: str, expected: list[str]) -> None:
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


# ================================================================ unit: the pure checks

@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_generation_floats_must_be_finite(field, value):
    with pytest.raises(ConfigError) as err:
        generation_config({field: value})
    _assert_names(str(err.value), [f"GenerationConfig.{field}", "finite", "NaN and infinity are refused"])


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_generation_floats_must_fit_float32(field):
    # The sampler computes in float32, where 1e39 would be infinity.
    with pytest.raises(ConfigError) as err:
        generation_config({field: 1e39})
    _assert_names(str(err.value), [f"GenerationConfig.{field}", "float32"])
    assert generation_config({field: 3.4e38}).model_dump()[field] == 3.4e38


@pytest.mark.parametrize("field", ["kv_cache_fraction", "cpu_memory_gb"])
def test_engine_floats_must_be_finite(field):
    with pytest.raises(ConfigError) as err:
        EngineConfig.build(**{field: NAN})
    _assert_names(str(err.value), [f"EngineConfig.{field}", "finite"])


def test_the_limits_are_engine_config_fields_with_their_defaults():
    config = EngineConfig()
    assert (config.max_prompts_per_request, config.max_logprobs, config.max_stop_words, config.max_bad_words,
            config.max_word_chars) == (256, 20, 256, 64, 256)
    custom = EngineConfig.build(max_prompts_per_request=8, max_logprobs=5)
    assert prompt_count_problem(9, custom) and not prompt_count_problem(8, custom)
    with pytest.raises(ConfigError, match="max_prompts_per_request"):
        EngineConfig.build(max_prompts_per_request=0)


@pytest.mark.parametrize("options, limits, expected", [
    ({"logprobs": 20}, {}, None),
    ({"logprobs": 21}, {}, ["logprobs: 21", "max_logprobs (20)", "ask for at most 20"]),
    ({"logprobs": 6}, {"max_logprobs": 5}, ["logprobs: 6", "max_logprobs (5)"]),
    ({"logprobs": 0}, {"max_logprobs": 0}, None),
    ({"stop_words": ["s"] * 256}, {}, None),
    ({"stop_words": ["s"] * 257}, {}, ["stop_words: 257 words", "max_stop_words (256)", "raise max_stop_words"]),
    ({"stop_words": ["a", "b", "c"]}, {"max_stop_words": 2}, ["stop_words: 3 words", "max_stop_words (2)"]),
    ({"bad_words": ["b"] * 64}, {}, None),
    ({"bad_words": ["b"] * 65}, {}, ["bad_words: 65 words", "max_bad_words (64)"]),
    ({"stop_words": ["x" * 256]}, {}, None),
    ({"stop_words": ["ok", "x" * 257]}, {}, ["stop_words[1]: 257 characters", "max_word_chars (256)", "shorten"]),
    ({"bad_words": ["x" * 11]}, {"max_word_chars": 10}, ["bad_words[0]: 11 characters", "max_word_chars (10)"]),
    ({}, {}, None),
])
def test_generation_problem(options, limits, expected):
    problem = generation_problem(generation_config(options), EngineConfig.build(**limits))
    if expected is None:
        assert problem is None
    else:
        _assert_names(problem, expected)


@pytest.mark.parametrize("prompt_len, options, required, expected", [
    (60, {}, False, None),                              # GenerationConfig's 256: cut to what fits
    (60, {"max_new_tokens": 1000}, False, None),        # the Python API's, or a deployment's default: cut too
    (10, {"max_new_tokens": 54}, True, None),           # 10 + 54 == session_len: fits exactly
    (10, {"max_new_tokens": 55}, True, ["max_new_tokens", "prompts[2] is 10 tokens", "65 in all",
                                        "session_len (64)", "at most 54 new tokens", "leave max_new_tokens unset"]),
    (63, {"max_new_tokens": 2}, True, ["at most 1 new tokens"]),
    (1, {"max_new_tokens": 10 ** 12}, True, ["max_new_tokens is 1000000000000"]),
])
def test_max_new_tokens_problem(prompt_len, options, required, expected):
    gen = generation_config(options)
    if required:
        gen = gen.with_max_new_tokens_required()
    assert gen.max_new_tokens_must_fit is required
    problem = max_new_tokens_problem(prompt_len, gen, SESSION_LEN, "prompts[2]")
    if expected is None:
        assert problem is None
    else:
        _assert_names(problem, expected)


def test_prompt_count_problem():
    assert prompt_count_problem(256, EngineConfig()) is None
    _assert_names(prompt_count_problem(10_000, EngineConfig()),
                  ["prompts: 10000 prompts", "max_prompts_per_request (256)", "split them"])


# ---------------------------------------------------------------- unit: proto -> prompts and configs (protocol.py)

grpc = pytest.importorskip("grpc")

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc  # noqa: E402
from kubellm.runtime.serving import protocol  # noqa: E402
from kubellm.runtime.serving.service import Unparsed, _parser  # noqa: E402


def to_proto_prompt(prompt) -> llm_pb2.Prompt:
    if isinstance(prompt, str):
        return llm_pb2.Prompt(text=prompt)
    if prompt and isinstance(prompt[0], dict):
        return llm_pb2.Prompt(chat=llm_pb2.Conversation(messages=[llm_pb2.ChatMessage(**m) for m in prompt]))
    return llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=prompt))


def to_request(prompts: list, options: dict) -> llm_pb2.GenerateRequest:
    """The request as a gRPC client sends it."""
    config = llm_pb2.GenerationConfig()
    for name, value in options.items():
        if isinstance(value, list):
            getattr(config, name).extend(value)
        else:
            setattr(config, name, value)
    return llm_pb2.GenerateRequest(prompts=[to_proto_prompt(p) for p in prompts], config=config)


def test_a_request_past_the_prompt_limit_is_refused_before_its_prompts_are_read():
    request = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=GOOD)] * 10_000)
    with pytest.raises(RequestError) as err:
        protocol.prompts_and_configs(request, {}, EngineConfig())
    assert isinstance(err.value, ValueError)
    assert protocol.status_of(err.value)[0] is grpc.StatusCode.INVALID_ARGUMENT
    _assert_names(str(err.value), ["max_prompts_per_request (256)"])
    prompts, gens = protocol.prompts_and_configs(request, {}, EngineConfig(max_prompts_per_request=10_000))
    assert len(prompts) == len(gens) == 10_000


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_proto_floats_end_invalid_argument(field, value):
    request = to_request([GOOD], {field: value})
    assert math.isnan(getattr(request.config, field)) or math.isinf(getattr(request.config, field))  # float32 kept it
    with pytest.raises(ConfigError) as err:
        protocol.prompts_and_configs(request, {}, EngineConfig())
    code, message = protocol.status_of(err.value)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and field in message and "finite" in message


def test_a_deployment_default_max_new_tokens_is_cut_but_a_requested_one_must_fit():
    # The deployment's default (spec.generation.maxNewTokens is always written) is not the caller's ask: the
    # engine cuts it to what session_len leaves, as vLLM cuts its default max_tokens. A requested one must fit.
    defaults = {"max_new_tokens": 256, "temperature": 0.5}
    [_], [gen] = protocol.prompts_and_configs(to_request([GOOD], {}), defaults, EngineConfig())
    assert (gen.max_new_tokens, gen.temperature, gen.max_new_tokens_must_fit) == (256, 0.5, False)
    assert max_new_tokens_problem(60, gen, SESSION_LEN) is None
    [_, _], gens = protocol.prompts_and_configs(to_request([GOOD, GOOD], {"max_new_tokens": 256}), defaults,
                                                EngineConfig())
    assert all(g.max_new_tokens_must_fit and g.temperature == 0.5 for g in gens)
    assert "session_len (64)" in max_new_tokens_problem(60, gens[1], SESSION_LEN)


def test_a_request_that_does_not_parse_becomes_unparsed():
    parse = _parser(llm_pb2.GenerateRequest)
    good = to_request([GOOD], {"max_new_tokens": 3})
    assert parse(good.SerializeToString()) == good
    for data in (BAD_UTF8, SURROGATE_UTF8, b"\xff\xff\xff\xff"):
        unparsed = parse(data)
        assert isinstance(unparsed, Unparsed)
        _assert_names(unparsed.message, ["not a valid kubellm.v1.GenerateRequest", "UTF-8"])


def _length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf length-delimited field, by hand: Python's protobuf refuses to write bad UTF-8."""
    size, n = bytearray(), len(payload)
    while True:
        size.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return bytes([field << 3 | 2]) + bytes(size) + payload


# GenerateRequest{prompts: [Prompt{text: <bytes>}]} with bytes that are not UTF-8 / a UTF-8-encoded surrogate.
BAD_UTF8 = _length_delimited(1, _length_delimited(1, b"abc\xff\xfe"))
SURROGATE_UTF8 = _length_delimited(1, _length_delimited(1, b"abc\xed\xa0\x80"))


# ---------------------------------------------------------------- unit: the sampler's clamps

def test_the_sampler_clamps_top_k_and_top_logprobs():
    torch = pytest.importorskip("torch")
    from kubellm.runtime.executor.sampler import SamplingBatch, sample
    from kubellm.runtime.executor.step import SamplingParams

    vocab = 8   # fewer tokens than the logprobs cap, and than any top_k below
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(1.0, False, top_k, 1.0, seed, 0, [], logprobs=20)
              for seed, top_k in enumerate([10 ** 30, 2 ** 31, vocab + 1])]
    out = sample(logits, SamplingBatch.from_params(params, "cpu"))   # 10**30 fits no int64: clamped, not raised
    assert all(0 <= t < vocab for t in out.token_ids)
    assert [len(top) for top in out.top_logprobs] == [vocab] * 3
    # top_k past the vocabulary keeps every token: the same tokens as top_k=0 (all) for the same seeds.
    everything = [SamplingParams(1.0, False, 0, 1.0, seed, 0, []) for seed in range(3)]
    assert sample(logits, SamplingBatch.from_params(everything, "cpu")).token_ids == out.token_ids


# ================================================================ model: the Python API

@pytest.fixture(scope="module")
def pipe(tiny_llama):
    pytest.importorskip("torch")
    import kubellm

    p = kubellm.pipeline(tiny_llama, show_progress=False, **ENGINE)
    yield p
    p.destroy()


@pytest.fixture(scope="module")
def greedy_text(pipe):
    return pipe([GOOD], max_new_tokens=8)[0].text


@pytest.mark.model
@pytest.mark.parametrize("case", HOSTILE + SURROGATES, ids=HOSTILE_IDS + [c[0] for c in SURROGATES])
def test_pipeline_refuses_hostile_requests_and_keeps_working(pipe, greedy_text, case):
    _, prompts, options, expected = case
    started = time.monotonic()
    with pytest.raises(ValueError) as err:   # RequestError or ConfigError: both ValueErrors
        pipe(prompts, **options)
    assert isinstance(err.value, (RequestError, ConfigError))
    _assert_names(str(err.value), expected)
    assert time.monotonic() - started < 5, "refusing must not cost the time the request asked for"
    blocks = pipe.engine.block_manager
    assert not pipe.engine.has_unfinished() and blocks.num_free == blocks.num_blocks   # nothing left behind
    assert pipe([GOOD], max_new_tokens=8)[0].text == greedy_text


@pytest.mark.model
@pytest.mark.parametrize("case", HANDLED, ids=HANDLED_IDS)
def test_pipeline_handles_extreme_but_valid_requests(pipe, greedy_text, case):
    _, options = case
    [r] = pipe([GOOD], **{"max_new_tokens": 6, **options})
    assert r.finish_reason in ("stop", "length")
    assert pipe([GOOD], max_new_tokens=8)[0].text == greedy_text


@pytest.mark.model
def test_pipeline_a_prompt_too_long_by_characters_is_refused_before_tokenizing(pipe):
    # 8 million characters would take seconds to tokenize on the engine thread; the bound refuses it at once.
    started = time.monotonic()
    with pytest.raises(RequestError, match="characters"):
        pipe("lorem ipsum " * 700_000)
    assert time.monotonic() - started < 2
    limit = (SESSION_LEN - 1) * pipe.tokenizer.max_token_chars
    with pytest.raises(RequestError, match="tokens but session_len"):   # within the bound: tokenized, then refused
        pipe("x " * (limit // 2))


@pytest.mark.model
@pytest.mark.parametrize("options", [{}, {"max_new_tokens": 2 ** 31 - 1}], ids=["unset", "huge"])
def test_pipeline_cuts_max_new_tokens_to_the_session(pipe, options):
    # As LMDeploy's pipeline and vLLM's LLM do; a server refuses a requested one instead (SERVING_HOSTILE).
    prompt = list(range(5, 5 + SESSION_LEN - 3))   # room for 3 new tokens
    [r] = pipe([prompt], ignore_eos=True, **options)
    assert (r.generated_length, r.finish_reason) == (3, "length")


# ================================================================ multiprocess: a real `kubellm worker` over gRPC

@pytest.fixture(scope="module")
def worker_address(tiny_llama, tmp_path_factory):
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("limits")
    (folder / "engine.json").write_text(json.dumps({**ENGINE, "dtype": "float32"}))
    (folder / "generation.json").write_text(json.dumps({"max_new_tokens": 256}))   # as spec.generation writes it
    port = free_port()
    log = open(folder / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "worker", "--model", str(tiny_llama),
                             "--config", str(folder / "engine.json"), "--generation-defaults",
                             str(folder / "generation.json"), "--port", str(port), "--host", "127.0.0.1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, timeout=120)
        yield address
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=60) == 0, (folder / "worker.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.fixture(scope="module")
def channel(worker_address):
    with grpc.insecure_channel(worker_address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return llm_pb2_grpc.LLMStub(channel)


GREEDY = {"max_new_tokens": 8, "temperature": 0.0}


def _greedy(stub) -> str:
    [r] = stub.Generate(to_request([GOOD], GREEDY), timeout=60).responses
    return r.text


@pytest.fixture(scope="module")
def served_greedy(stub):
    return _greedy(stub)


def _health(channel) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kubellm.v1.LLM"),
                                                      timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _refusal(call) -> tuple:
    try:
        result = call()
        if not hasattr(result, "responses"):
            list(result)   # a stream: read it to its end
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", HOSTILE + SERVING_HOSTILE, ids=HOSTILE_IDS + [c[0] for c in SERVING_HOSTILE])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_worker_refuses_hostile_requests_invalid_argument(stub, channel, served_greedy, case, rpc):
    _, prompts, options, expected = case
    request = to_request(prompts, options)
    code, message = _refusal(lambda: getattr(stub, rpc)(request, timeout=30))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    _assert_names(message, expected)
    assert _health(channel) == "SERVING"


@pytest.mark.multiprocess
@pytest.mark.parametrize("data", [BAD_UTF8, SURROGATE_UTF8, b"\xff\xff\xff\xff"], ids=["bad-utf8", "surrogate", "corrupt"])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_worker_refuses_bytes_that_do_not_parse(channel, served_greedy, data, rpc):
    # What a router forwards unparsed: bytes that are no GenerateRequest (proto3 strings must be UTF-8).
    method = channel.unary_unary if rpc == "Generate" else channel.unary_stream
    call = method(f"/kubellm.v1.LLM/{rpc}")   # no serializers: the bytes go as they are
    code, message = _refusal(lambda: call(data, timeout=30))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    _assert_names(message, ["not a valid kubellm.v1.GenerateRequest"])
    assert _health(channel) == "SERVING"


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", HANDLED, ids=HANDLED_IDS)
def test_worker_handles_extreme_but_valid_requests(stub, case):
    _, options = case
    [r] = stub.Generate(to_request([GOOD], {"max_new_tokens": 6, **options}), timeout=60).responses
    assert r.finish_reason in ("stop", "length") and r.generated_length >= 1


@pytest.mark.multiprocess
def test_worker_a_deployment_default_is_cut_to_the_session_and_a_requested_one_refused(stub):
    prompt = list(range(5, 5 + SESSION_LEN - 3))   # room for 3 new tokens; the deployment's default is 256
    [r] = stub.Generate(to_request([prompt], {"ignore_eos": True}), timeout=60).responses
    assert (r.generated_length, r.finish_reason) == (3, "length")
    code, message = _refusal(lambda: stub.Generate(to_request([prompt], {"max_new_tokens": 4}), timeout=30))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "at most 3 new tokens" in message


@pytest.mark.multiprocess
def test_worker_serves_the_same_greedy_text_after_the_barrage_and_a_stream_meanwhile_completes(
        stub, channel, served_greedy):
    # A stream runs while every hostile request of the table arrives: it completes, unharmed.
    streamed: dict = {}

    def stream():
        parts = list(stub.GenerateStream(to_request([GOOD], GREEDY), timeout=60))
        streamed["text"] = "".join(p.text for p in parts)

    thread = threading.Thread(target=stream)
    thread.start()
    codes = [_refusal(lambda request=to_request(prompts, options): stub.Generate(request, timeout=30))[0]
             for _, prompts, options, _ in HOSTILE + SERVING_HOSTILE]
    thread.join(60)
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert streamed["text"] == served_greedy
    assert _health(channel) == "SERVING"
    assert _greedy(stub) == served_greedy
