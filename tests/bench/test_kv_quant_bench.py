"""`python -m kubellm.bench.kv_quant`: its flag and the agreement it reports (pure; the runs themselves are the
engine's, tested in tests/runtime/engine/test_kv_quant_engine.py)."""

from __future__ import annotations

import pytest

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
