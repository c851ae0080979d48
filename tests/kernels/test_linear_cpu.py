"""Float linears on oneDNN-packed weights (kernels/linear_cpu.py) and the engine's use of them on CPU
(layers/cpu_weights.py): same results as F.linear, nothing held twice, a tied head still looked up by row."""

import pytest
import torch
import torch.nn.functional as F

from kubellm.kernels import linear_cpu

pytestmark = pytest.mark.skipif(not linear_cpu.available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [0, 1, 3, 16, 77])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_packed_linear_equals_f_linear(rows, dtype, tol):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(130, 70, generator=gen).to(dtype)   # not a multiple of any block size
    b = torch.randn(130, generator=gen).to(dtype)
    x = torch.randn(2, rows, 70, generator=gen).to(dtype)   # a leading batch dimension is kept
    packed = linear_cpu.pack(w)
    assert packed.is_mkldnn and packed.shape == w.shape
    for bias in (None, b):
        got, want = linear_cpu.linear(x, packed, bias), F.linear(x, w, bias)
        assert got.shape == want.shape == (2, rows, 130) and got.dtype == dtype
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # a non-contiguous input (a slice of the rows) is multiplied as its values say
    wide = torch.randn(5, 140, generator=gen).to(dtype)[:, ::2]
    torch.testing.assert_close(linear_cpu.linear(wide, packed, None), F.linear(wide, w), atol=tol, rtol=tol)


def test_plain_weights_fall_through_to_f_linear():
    w, x = torch.randn(4, 3), torch.randn(2, 3)
    assert torch.equal(linear_cpu.linear(x, w, None), F.linear(x, w))
    assert not linear_cpu.can_pack(torch.randn(4, 3, dtype=torch.float16))
    assert not linear_cpu.can_pack(linear_cpu.pack(w))   # packed once only
    assert not linear_cpu.can_pack(torch.randn(4))


def _engine(path, **options):
    """parity.py's engine (float32, small blocks) on CPU."""
    from parity import engine_for

    return engine_for(path, device="cpu", **options)


def _parity_prompts(engine):
    from parity import PROMPTS, encode

    return encode(engine, PROMPTS)


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.model
def test_engine_packs_every_float_linear_once_and_keeps_a_tied_table_plain(tiny_llama_tied, monkeypatch):
    from parity import assert_matches_hf, run

    from kubellm.runtime.executor.layers.linear import LinearBase

    engine = _engine(tiny_llama_tied)
    try:
        model = engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, LinearBase)]
        assert linears and all(m.weight.is_mkldnn for m in linears)
        embedding, head = model.model.embed_tokens, model.lm_head
        assert not embedding.weight.is_mkldnn and head.weight is embedding.weight   # still tied, looked up by row
        assert head.packed_weight is not None and head.packed_weight.is_mkldnn
        prompts = _parity_prompts(engine)
        assert_matches_hf(tiny_llama_tied, prompts, run(engine, prompts))   # transformers' tokens and logprobs
        packed_bytes = _param_bytes(model)
    finally:
        engine.destroy()
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    engine = _engine(tiny_llama_tied)
    try:
        model = engine.runner.model
        assert not any(m.weight.is_mkldnn for m in model.modules() if isinstance(m, LinearBase))
        assert engine.runner.model.lm_head.packed_weight is None
        assert_matches_hf(tiny_llama_tied, prompts, run(engine, prompts))
        assert _param_bytes(model) == packed_bytes    # a packed weight replaces its plain one: same bytes
    finally:
        engine.destroy()


@pytest.mark.model
def test_untied_head_is_packed_in_place(tiny_llama):
    engine = _engine(tiny_llama)
    try:
        head = engine.runner.model.lm_head
        assert head.weight.is_mkldnn and head.packed_weight is None
        assert not engine.runner.model.model.embed_tokens.weight.is_mkldnn
    finally:
        engine.destroy()


@pytest.mark.model
@pytest.mark.parametrize("tied", [True, False])
def test_gguf_served_as_float_packs_its_linears_and_only_a_tied_table_gets_a_copy(tiny_llama, tiny_llama_tied,
                                                                                  tmp_path, tied):
    """quantization='float' on a GGUF: every linear multiplies on a packed weight; the embedding table stays plain
    for lookups, and gets a packed copy on its first matmul only when it is also the LM head."""
    pytest.importorskip("gguf")
    from parity import run
    from quant_checkpoints import write_gguf

    gguf_dir, _ = write_gguf(tiny_llama_tied if tied else tiny_llama, tmp_path, "Q8_0")
    engine = _engine(gguf_dir, quantization="float")
    try:
        run(engine, _parity_prompts(engine)[:2])
        weights = {name: m for name, m in engine.runner.model.named_modules() if type(m).__name__ == "QuantizedWeight"}
        table = weights["model.embed_tokens.quantized"]
        assert not table.weight.is_mkldnn
        assert (table.packed is not None) == tied
        others = [m for name, m in weights.items() if name != "model.embed_tokens.quantized"]
        assert others and all(m.form == "float" and m.weight.is_mkldnn for m in others)
    finally:
        engine.destroy()
