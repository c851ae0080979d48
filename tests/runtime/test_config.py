"""Config validation (field-naming errors), DeepSpeed-MII / LMDeploy aliases, and layering."""

from __future__ import annotations

import re

import pytest

from kubellm.runtime.config import ConfigError, EngineConfig, GenerationConfig, generation_config


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    "options, field",
    [
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_length": 1}, "max_length"),
        ({"logprobs": -1}, "logprobs"),   # the cap (max_logprobs) is the engine's: test_request_limits.py
        ({"stop_words": ["ok", ""]}, "stop_words"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
def test_generation_config_bad_values_name_the_field(options, field):
    with pytest.raises(ConfigError) as info:
        GenerationConfig.build(**options)
    msg = str(info.value)
    assert field in msg
    # Only the offending field is blamed.
    others = {"top_p", "temperature", "max_new_tokens", "min_new_tokens", "top_k", "max_length", "logprobs"} - {field}
    assert not any(f"GenerationConfig.{o}:" in msg for o in others), msg
    # The bad value is echoed back so a person can find it.
    assert repr(next(iter(options.values()))) in msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        GenerationConfig.build(top_p=0)


def test_good_boundary_values_are_accepted():
    g = GenerationConfig.build(top_p=1.0, temperature=0, top_k=0, max_new_tokens=1, min_new_tokens=0,
                               logprobs=0, max_length=2)
    assert (g.top_p, g.temperature, g.top_k, g.max_new_tokens, g.logprobs, g.max_length) == (1.0, 0.0, 0, 1, 0, 2)
    g = GenerationConfig.build(top_p=1e-6, logprobs=20)
    assert g.top_p == 1e-6 and g.logprobs == 20


def test_misspelled_option_is_reported_as_unknown():
    with pytest.raises(ConfigError) as info:
        GenerationConfig.build(temprature=0.5)
    msg = str(info.value)
    assert "temprature" in msg
    assert "unknown option" in msg


def test_several_errors_are_all_reported():
    with pytest.raises(ConfigError) as info:
        GenerationConfig.build(top_p=2, top_k=-3)
    msg = str(info.value)
    assert "top_p" in msg and "top_k" in msg


def test_engine_config_bad_values_name_the_field():
    for options, field in [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"block_size": 0}, "block_size"),
        ({"kv_cache_fraction": 0}, "kv_cache_fraction"),
        ({"kv_cache_fraction": 1.5}, "kv_cache_fraction"),
        ({"max_num_batched_tokens": 8}, "max_num_batched_tokens"),
        ({"dtype": "float8"}, "dtype"),
        ({"tensor_parallel": 0}, "tensor_parallel"),
        ({"max_batch_sise": 4}, "max_batch_sise"),
    ]:
        with pytest.raises(ConfigError) as info:
            EngineConfig.build(**options)
        assert field in str(info.value), (options, str(info.value))
    with pytest.raises(ConfigError, match="unknown option"):
        EngineConfig.build(max_batch_sise=4)


def test_validate_assignment():
    g = GenerationConfig()
    with pytest.raises(ValueError):
        g.top_p = 0


def test_updated_validates_and_keeps_other_fields():
    g = GenerationConfig.build(top_k=5, temperature=0.7)
    h = g.updated(top_p=0.5)
    assert (h.top_k, h.temperature, h.top_p) == (5, 0.7, 0.5)
    assert g.top_p == 1.0  # the original is untouched
    with pytest.raises(ConfigError, match="top_p"):
        g.updated(top_p=3)


# ---------------------------------------------------------------- aliases


def test_max_length_is_its_own_field():
    g = GenerationConfig.build(max_length=50)
    assert g.max_length == 50
    assert g.max_new_tokens == GenerationConfig().max_new_tokens  # not turned into max_new_tokens
    g = GenerationConfig.build(max_length=50, max_new_tokens=10)
    assert (g.max_length, g.max_new_tokens) == (50, 10)


@pytest.mark.parametrize("stop, words", [("x", ["x"]), ("END", ["END"]), (["a", "bc"], ["a", "bc"]), (None, [])])
def test_stop_alias(stop, words):
    assert GenerationConfig.build(stop=stop).stop_words == words
    assert generation_config(stop=stop).stop_words == words


def test_stop_does_not_override_explicit_stop_words():
    assert GenerationConfig.build(stop="x", stop_words=["y"]).stop_words == ["y"]


def test_do_sample_alias():
    assert GenerationConfig.build(do_sample=False, temperature=0.9).temperature == 0.0
    assert GenerationConfig.build(do_sample=False).greedy
    g = GenerationConfig.build(do_sample=True)
    assert g.temperature == 1.0 and not g.greedy
    assert GenerationConfig.build(do_sample=True, temperature=0.3).temperature == 0.3


def test_greedy_property():
    assert GenerationConfig().greedy  # temperature 0 by default
    assert GenerationConfig.build(temperature=0.8, top_k=1).greedy
    assert not GenerationConfig.build(temperature=0.8, top_k=2).greedy


def test_cache_max_entry_count_alias():
    e = EngineConfig.build(cache_max_entry_count=0.5)
    assert e.kv_cache_fraction == 0.5
    assert e.cache_max_entry_count == 0.5
    with pytest.raises(ConfigError, match="kv_cache_fraction"):
        EngineConfig.build(cache_max_entry_count=0)
    assert EngineConfig.build().kv_cache_fraction == 0.8


# ---------------------------------------------------------------- layering


def test_later_layers_win():
    g = generation_config({"temperature": 0.5, "top_k": 4}, {"temperature": 0.9})
    assert (g.temperature, g.top_k) == (0.9, 4)
    g = generation_config({"temperature": 0.5}, {"temperature": 0.9}, temperature=0.2)
    assert g.temperature == 0.2  # keyword options are the last layer


def test_none_and_empty_layers_are_ignored():
    g = generation_config(None, {"top_k": 3}, None, {})
    assert g.top_k == 3
    assert generation_config() == GenerationConfig()


def test_object_layer_contributes_only_explicitly_set_fields():
    g = generation_config({"max_new_tokens": 7}, GenerationConfig(top_k=3))
    assert g.max_new_tokens == 7
    assert g.top_k == 3
    # An object's explicit fields do override earlier dicts.
    g = generation_config({"top_k": 9, "temperature": 0.4}, GenerationConfig(top_k=3))
    assert (g.top_k, g.temperature) == (3, 0.4)
    # An explicitly set default value still counts as set.
    g = generation_config({"max_new_tokens": 7}, GenerationConfig(max_new_tokens=256))
    assert g.max_new_tokens == 256


def test_object_then_options():
    base = GenerationConfig.build(temperature=0.7, stop="END")
    g = generation_config(base, top_p=0.9)
    assert (g.temperature, g.top_p, g.stop_words) == (0.7, 0.9, ["END"])
    assert generation_config(base, temperature=0).temperature == 0.0


def test_aliases_work_in_layers():
    g = generation_config({"stop_words": ["a"]}, {"stop": "b"})
    assert g.stop_words == ["b"]
    g = generation_config({"temperature": 0.8}, {"do_sample": False})
    assert g.temperature == 0.0
    g = generation_config({"temperature": 0.8}, GenerationConfig.build(do_sample=False))
    assert g.temperature == 0.0


def test_layering_validates_the_result():
    with pytest.raises(ConfigError, match="top_p"):
        generation_config({"top_p": 0.5}, top_p=0)
    with pytest.raises(ConfigError, match="unknown option"):
        generation_config({"temprature": 0.5})


def test_do_sample_true_keeps_an_earlier_temperature():
    assert generation_config(GenerationConfig.build(temperature=0.7), do_sample=True).temperature == 0.7
    assert generation_config({"temperature": 0.7}, do_sample=True).temperature == 0.7
    assert generation_config(do_sample=True).temperature == 1.0
    assert generation_config({"temperature": 0.7}, do_sample=False).temperature == 0.0


@pytest.mark.parametrize("seed", [-1, 2 ** 63])
def test_random_seed_out_of_range_names_the_field(seed):
    with pytest.raises(ConfigError, match="random_seed"):
        GenerationConfig.build(random_seed=seed)


@pytest.mark.parametrize("field, value, message", [
    ("guided_regex", "a" * 40_000, r"guided_regex: a regex of 40000 characters, more than 32768"),
    ("guided_grammar", "root ::= " + "x" * 40_000, r"guided_grammar: a grammar of 40009 characters"),
    ("guided_choice", ["y" * 20_000, "z" * 20_000], r"guided_choice: a choice list of 40000 characters"),
    ("guided_json", {"enum": ["w" * 70_000]}, r"guided_json: a JSON schema of \d+ characters, more than 65536"),
])
def test_huge_structured_output_constraints_are_refused_before_any_compile(field, value, message):
    """The gRPC path has no gateway in front: the engine's own check bounds the grammar compiler's work."""
    from kubellm.runtime.config import generation_problem

    assert re.search(message, generation_problem(GenerationConfig(**{field: value}), EngineConfig()))
    small = {"guided_regex": "[a-z]+", "guided_grammar": 'root ::= "x"', "guided_choice": ["a"],
             "guided_json": {"type": "object"}}[field]
    assert generation_problem(GenerationConfig(**{field: small}), EngineConfig()) is None
