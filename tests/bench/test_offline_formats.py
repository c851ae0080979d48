"""`kubellm bench offline --formats`: which formats run, and the bytes each one's decode step reads."""

import pytest

from kubellm.bench.offline import FORMAT_OPTIONS, format_formats, format_rooflines, parse_formats
from kubellm.bench.progress import Progress


@pytest.mark.parametrize("text, device, expected", [
    ("auto", "cpu", ["float32", "int8", "q4"]), (None, "cpu", ["float32", "int8", "q4"]), ("auto", "cuda", []),
    ("none", "cpu", []), ("int8", "cpu", ["int8"]), (" q4 , float32", "cuda", ["q4", "float32"]),
])
def test_parse_formats(text, device, expected):
    assert parse_formats(text, device) == expected


def test_parse_formats_names_the_bad_one():
    with pytest.raises(ValueError, match="--formats: q3 unknown.*float32, int8, q4"):
        parse_formats("int8,q3", "cpu")


def test_each_format_reads_its_own_bytes(tiny_llama_tied, tmp_path):
    """On a Q4_0 GGUF (Q8_0 embedding tied to the LM head): float32 reads 4 bytes a weight, int8 about 1, Q4 about
    half of that on its linears; each format's decode is timed against the one bandwidth."""
    from tests.quant_checkpoints import write_gguf

    gguf_dir, _ = write_gguf(tiny_llama_tied, tmp_path / "gguf")
    out = format_rooflines(str(gguf_dir), list(FORMAT_OPTIONS), dict(max_batch_size=2), Progress("t", "x", None, enabled=False),
                           rounds=1, prompt_len=4, new_tokens=4)
    f = out["formats"]
    assert out["bandwidth_GBps"] > 0.1
    assert f["float32"]["weight_GB"] > 3 * f["int8"]["weight_GB"] > 3 * f["q4"]["weight_GB"] * 0.9
    assert all(d["decode_tok_s"] > 0 and 0 < d["roofline_fraction"] for d in f.values())
    text = format_formats(out)
    assert "int8" in text and "x float32" in text and "GB/s read" in text
