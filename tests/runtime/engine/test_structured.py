"""Structured outputs through the real engine: a tiny model with random weights (which on its own never writes
JSON) sampled at temperature 1 with random seeds, every output checked by an independent validator (jsonschema,
Python's re, json)."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.errors import RequestError

pytestmark = pytest.mark.model

SCHEMAS = [
    {"type": "object",
     "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "role": {"enum": ["admin", "user", "guest"]},
                    "active": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
     "required": ["name", "age", "role", "active", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1, "maxItems": 5},
    {"type": "object",
     "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                               "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                              "required": ["x", "y"], "additionalProperties": False},
                    "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"const": True}, "code": {"enum": [200, 404]}},
     "required": ["ok", "code"], "additionalProperties": False},
]
RNG = random.Random(18)   # the requests' seeds: random, and the same in every run
PROMPTS = ["Hello, world!", "The capital of France is", "Once upon a time", "def add(a, b):"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    e = LLMEngine(tiny_llama, EngineConfig(device="cpu", dtype="float32", session_len=256, max_batch_size=64,
                                           seed=0), show_progress=False)
    yield e
    e.destroy()


def sampled(**options) -> GenerationConfig:
    return GenerationConfig(**{"temperature": 1.0, "max_new_tokens": 160, "random_seed": RNG.getrandbits(62),
                               **options})


def run(engine, gens):
    return engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(gens))], gens)


def test_the_random_model_writes_no_json_unconstrained(engine):
    seqs = run(engine, [sampled(max_new_tokens=40) for _ in range(8)])
    for s in seqs:
        with pytest.raises(ValueError):
            json.loads(s.text)


def test_100_sampled_outputs_all_match_their_json_schemas(engine):
    gens = [sampled(guided_json=SCHEMAS[i % len(SCHEMAS)] if i % 2 else json.dumps(SCHEMAS[i % len(SCHEMAS)]))
            for i in range(100)]   # the schema as an object and as JSON text
    seqs = run(engine, gens)
    texts = set()
    for i, s in enumerate(seqs):
        assert s.finish_reason == "stop", (i, s.text)   # the grammar ended, then EOS: never cut by length
        jsonschema.validate(json.loads(s.text), SCHEMAS[i % len(SCHEMAS)])
        texts.add(s.text)
    assert len(texts) > 50   # sampled, not one fixed answer per schema


def test_regex_choice_grammar_and_json_mode_always_match(engine):
    regex = r"[a-z]{2,6}@(example|test)\.(com|org)"
    choices = ["yes", "no", "maybe so", 'say "hi"\n', "été"]
    grammar = 'root ::= term (("+" | "*") term)*\nterm ::= [0-9] | "(" root ")"'
    gens = ([sampled(guided_regex=regex) for _ in range(20)] + [sampled(guided_choice=choices) for _ in range(20)]
            + [sampled(guided_grammar=grammar) for _ in range(10)]
            # JSON mode bounds nothing (keys, strings, nesting): as OpenAI warns, a model must also be told to end.
            # This one is nudged to, through logit_bias on the closing characters (which the mask still governs).
            + [sampled(guided_json_object=True, logit_bias=closing_bias(engine)) for _ in range(20)])
    seqs = run(engine, gens)
    for s in seqs[:20]:
        assert re.fullmatch(regex, s.text), s.text
    assert all(s.text in choices for s in seqs[20:40]) and len({s.text for s in seqs[20:40]}) > 1
    for s in seqs[40:50]:
        assert re.fullmatch(r"[0-9()+*]+", s.text) and s.text.count("(") == s.text.count(")"), s.text
        eval(s.text)   # noqa: S307 - digits, parentheses, + and * only (checked above): an arithmetic expression
    for s in seqs[50:]:
        assert s.finish_reason == "stop" and isinstance(json.loads(s.text), dict), s.text


def closing_bias(engine) -> dict[int, float]:
    ids = engine.tokenizer.hf.convert_tokens_to_ids(['"', "}", "]", ","])
    return {i: 6.0 for i in ids if i is not None}


def test_constrained_and_free_requests_share_a_batch(engine):
    gens = [sampled(guided_choice=["left", "right"]), sampled(max_new_tokens=12), sampled(guided_regex="[0-9]{4}")]
    free_alone = engine.generate([PROMPTS[1]], [gens[1]])[0].token_ids   # run() gives row 1 PROMPTS[1]
    seqs = run(engine, gens)
    assert seqs[0].text in ("left", "right") and re.fullmatch("[0-9]{4}", seqs[2].text)
    assert seqs[1].token_ids == free_alone   # the masks touch only their own rows


def test_preemption_and_recompute_keep_the_grammar_state(tiny_llama):
    """A KV cache too small for the batch preempts sequences mid-JSON; recomputed, they continue where they were:
    the same tokens as without preemption (the matcher advances only on appended tokens)."""
    gens = [sampled(guided_json=SCHEMAS[0], max_new_tokens=100) for _ in range(6)]
    outputs = []
    for blocks in (None, 40):
        e = LLMEngine(tiny_llama, EngineConfig(device="cpu", dtype="float32", session_len=256, block_size=4,
                                               num_kv_blocks=blocks, max_num_batched_tokens=64), show_progress=False)
        try:
            seqs = e.generate(PROMPTS[:2] * 3, gens)
            outputs.append([s.token_ids for s in seqs])
            if blocks is not None:
                assert e.scheduler.num_preemptions > 0
            for s in seqs:
                jsonschema.validate(json.loads(s.text), SCHEMAS[0])
        finally:
            e.destroy()
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("options,message", [
    ({"guided_json": {"type": "nonsense"}}, r"guided_json: cannot be compiled: Unsupported type \"nonsense\""),
    ({"guided_json": "{not json"}, r"guided_json: not valid JSON"),
    ({"guided_json": "[1, 2]"}, r"guided_json: a JSON schema is an object, got list"),
    ({"guided_regex": "a(b"}, r"guided_regex: cannot be compiled: .*parenthesis"),
    ({"guided_grammar": "root ::= undefined_rule"}, r"guided_grammar: cannot be compiled: .*undefined_rule"),
    ({"logit_bias": {10 ** 6: 1.0}}, r"logit_bias: token id 1000000 is outside the vocabulary \[0, 448\)"),
])
def test_invalid_constraints_are_refused_naming_the_field(engine, options, message):
    with pytest.raises(RequestError, match=message):
        engine.add_request("Hello", GenerationConfig(**options))
    assert not engine.has_unfinished()


def test_a_schema_is_compiled_once(engine):
    structured = engine._structured_outputs()
    run(engine, [sampled(guided_json=SCHEMAS[3])])
    compiled = dict(structured._json_cache)
    run(engine, [sampled(guided_json=dict(reversed(SCHEMAS[3].items())))])   # same schema, other key order
    assert structured._json_cache.keys() == compiled.keys()
    assert all(structured._json_cache[k] is compiled[k] for k in compiled)


def test_a_server_compiles_off_the_engine_thread(engine):
    import threading

    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    gen = sampled(guided_json=schema)
    worker = threading.Thread(target=engine.prepare, args=([gen, gen],))   # as engine_calls does, in a thread
    worker.start()
    worker.join()
    structured = engine._structured_outputs()
    key = (json.dumps(schema, sort_keys=True), None)
    compiled = structured._json_cache[key]
    seq = engine.add_request("Hello", gen)   # found compiled
    assert structured._json_cache[key] is compiled and seq.grammar is not None
    engine.abort(seq.request_id)
    with pytest.raises(RequestError, match="guided_regex: cannot be compiled"):
        engine.prepare([GenerationConfig(guided_regex="(")])


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_masks_reach_rank_0s_sampler_in_a_parallel_group(tiny_llama, tp, pp):
    """Sampling happens on rank 0, where the grammars live: a tensor- or pipeline-parallel group gives the same
    constrained tokens as one process."""
    gens = [sampled(guided_json=SCHEMAS[i % 2], max_new_tokens=80) for i in range(4)]
    outputs = []
    for tp_, pp_ in ((1, 1), (tp, pp)):
        e = LLMEngine(tiny_llama, EngineConfig(device="cpu", dtype="float32", session_len=256, tensor_parallel=tp_,
                                               pipeline_parallel=pp_), show_progress=False)
        try:
            seqs = e.generate(PROMPTS, gens)
            for i, s in enumerate(seqs):
                jsonschema.validate(json.loads(s.text), SCHEMAS[i % 2])
            outputs.append([s.token_ids for s in seqs])
        finally:
            e.destroy()
    assert outputs[0] == outputs[1]
