"""`python -m kubellm.bench.kv_quant`: its flag and the agreement it reports (pure; the runs themselves are the
engine's, tested in tests/runtime/engine/test_kv_quant_engine.py), the attention error it measures, and one
whole run on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from kubellm.bench import kv_quant


@pytest.mark.parametrize("value, expected", [("int8,int4", ["int8", "int4"]), (" int4 ", ["int4"])])
def test_kinds_flag(value, expected):
    assert kv_quant.parse_kinds(value) == expected


@pytest.mark.parametrize("value", ["int2", "", "int8,fp8"])
def test_bad_kinds_name_the_flag_and_the_choices(value):
    with pytest.raises(ValueError, match=r"--kinds .*one or more of int8, int4"):
        kv_quant.parse_kinds(value)


def test_agreement_counts_tokens_before_the_first_difference_and_their_logprobs():
    base = {"kv_cache_dtype": "auto", "blocks": 100, "tokens": [[1, 2, 3, 4], [5, 6, 7, 8]],
            "logprobs": [[-0.1, -0.2, -0.3, -0.4], [-1.0, -1.0, -1.0, -1.0]]}
    int4 = {"kv_cache_dtype": "int4", "blocks": 320, "tokens": [[1, 2, 9, 4], [5, 6, 7, 8]],
            "logprobs": [[-0.1, -0.25, -2.0, -0.4], [-1.5, -1.0, -1.0, -1.0]]}
    result = kv_quant.compare(base, int4)
    # prompt 0 agrees on 2 tokens (the 4th equal again does not count), prompt 1 on all 4
    assert result["agreed_tokens"] == [2, 4] and result["agreement"] == 6 / 8
    assert result["logprob_diff_max"] == pytest.approx(0.5)
    assert result["logprob_diff_mean"] == pytest.approx((0.05 + 0.5) / 6)
    assert result["blocks"] == {"base": 100, "int4": 320} and result["blocks_ratio"] == 3.2


def _records(outliers: bool):
    generator = torch.Generator().manual_seed(0)
    records = []
    for _ in range(2):   # two "layers", GQA 2 over head size 64
        q, k, v = (torch.randn(48, heads, 64, generator=generator, dtype=torch.float64) for heads in (4, 2, 2))
        if outliers:
            k[..., :2] = k[..., :2] * 4 + 10
        records.append((q, k, v, 64 ** -0.5))
    return records


def test_causal_attention_is_sdpas():
    q, k, v, scale = _records(outliers=False)[0]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True)
    torch.testing.assert_close(kv_quant._causal_attention(q, k, v, scale), expected.transpose(0, 1))


def test_attention_error_is_smaller_with_rotated_keys_and_with_more_bits():
    errors = {kind: kv_quant.attention_error(_records(outliers=True), kind) for kind in ("int8", "int4")}
    for kind, error in errors.items():
        assert 0 < error["rotated"] < 0.8 * error["plain"], (kind, error)
    assert errors["int8"]["plain"] < errors["int4"]["plain"] / 5
    # without outlier dimensions there is little for the rotation to spread
    calm = kv_quant.attention_error(_records(outliers=False), "int8")
    assert calm["plain"] < errors["int8"]["plain"] / 2


@pytest.mark.model
def test_the_bench_runs_every_cache_and_records_attention_from_the_float_ones_answers(tiny_llama, capsys):
    assert kv_quant.main(["--model", str(tiny_llama), "--new-tokens", "6", "--json", "--memory-gb", "0.01",
                          "--quantization", "none"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"int8", "int4"}
    for kind, result in results.items():
        assert len(result["agreed_tokens"]) == len(kv_quant.PROMPTS)
        assert result["blocks"]["base"] > 0 and result["blocks"][kind] >= result["blocks"]["base"]
        assert 0 < result["attention_error"]["rotated"] and 0 < result["attention_error"]["plain"]
    assert results["int8"]["attention_error"]["plain"] < results["int4"]["attention_error"]["plain"]
