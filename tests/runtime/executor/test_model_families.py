"""Families beyond Llama (OPT, GPT-2, Phi, Falcon, Mixtral) under tensor and pipeline parallel,
plus their checks: Falcon's valid sizes and ALiBi refusal, Hub-style checkpoint names, the
unsupported-architecture error. Greedy tokens against transformers: test_engine_hf.py."""

import json
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file
from parity import PROMPTS, assert_matches_hf, encode, engine_for, run

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.executor.rank_group import param_bytes, valid_tensor_parallel_sizes
from kubellm.runtime.engine.engine import LLMEngine

PARALLEL_PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then",
                    "Once upon a time, there was a little girl who lived in a village near the forest."]
_single_cache: dict = {}


pytestmark = pytest.mark.multiprocess


def _engine(path, tp=1, pp=1):
    # max_num_batched_tokens=16 chunks the longest prompt's prefill and mixes it with decodes.
    config = EngineConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu", block_size=4, num_kv_blocks=64,
                          max_num_batched_tokens=16, session_len=128)
    return LLMEngine(path, config, show_progress=False)


def _generate(engine):
    gens = [GenerationConfig(max_new_tokens=6 + 2 * i, ignore_eos=True) for i in range(len(PARALLEL_PROMPTS))]
    return [s.token_ids for s in engine.generate(PARALLEL_PROMPTS, gens)]


def _single(path):
    """One-process tokens and parameter bytes (the reference test_engine_hf.py checks against HF)."""
    if path not in _single_cache:
        engine = _engine(path)
        try:
            _single_cache[path] = _generate(engine), param_bytes(engine.runner.model)
        finally:
            engine.destroy()
    return _single_cache[path]


def test_tp2_matches_one_process_with_weights_split(tiny_family):
    expected, total = _single(tiny_family)
    engine = _engine(tiny_family, tp=2)
    try:
        assert _generate(engine) == expected
        per_rank = [param_bytes(engine.runner.model), *engine.executor.worker_param_bytes]
        # Norms, positions, routers and replicated KV heads stay whole; the rest is halved.
        assert all(0.45 * total < b < 0.7 * total for b in per_rank), (per_rank, total)
    finally:
        engine.destroy()


def test_pp2_matches_one_process_with_layers_split(tiny_family):
    expected, total = _single(tiny_family)
    engine = _engine(tiny_family, pp=2)
    try:
        stage = engine.runner.stage
        assert stage.is_first and not stage.is_last
        assert _generate(engine) == expected
        first, last = param_bytes(engine.runner.model), engine.executor.worker_param_bytes[0]
        assert first < total and last < total
    finally:
        engine.destroy()


def test_falcon_valid_tensor_parallel_sizes_replicate_kv_heads():
    from transformers import FalconConfig

    falcon_7b = FalconConfig(hidden_size=4544, num_attention_heads=71, multi_query=True,
                             new_decoder_architecture=False)
    assert valid_tensor_parallel_sizes(falcon_7b) == [1, 71]  # one KV head, copied to every rank
    falcon_40b = FalconConfig(hidden_size=8192, num_attention_heads=128, num_kv_heads=8,
                              new_decoder_architecture=True)
    assert valid_tensor_parallel_sizes(falcon_40b) == [1, 2, 4, 8, 16, 32, 64, 128]
    # Llama-style configs keep the head gcd rule: KV heads are never copied there.
    llama = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, intermediate_size=64)
    assert valid_tensor_parallel_sizes(llama) == [1, 2]


def test_tp_size_that_splits_no_family_heads_is_refused(tiny_family):
    with pytest.raises(ValueError, match=r"tensor_parallel: 3 .* valid sizes are \[1, 2, 4\]|"
                                         r"tensor_parallel: 3 .* valid sizes are \[1, 2\]"):
        _engine(tiny_family, tp=3)


def test_falcon_with_alibi_is_refused(tmp_path):
    from tiny_models import make_checkpoint

    path = make_checkpoint(tmp_path / "falcon_alibi", "falcon_mq", alibi=True)
    with pytest.raises(ValueError, match=r"alibi=True .* not supported"):
        engine_for(path)


def test_unsupported_architecture_lists_the_supported_ones():
    from kubellm.runtime.executor.models import model_class

    with pytest.raises(ValueError, match=r"unsupported architecture \['QWenLMHeadModel'\].*supported: .*"
                                         r"OPTForCausalLM.*GPT2LMHeadModel.*PhiForCausalLM.*FalconForCausalLM"):
        model_class(SimpleNamespace(architectures=["QWenLMHeadModel"], model_type="qwen"))


@pytest.mark.parametrize("arch,strip", [("gpt2", "transformer."), ("opt", "model.")])
def test_hub_style_names_without_prefix_load(tmp_path, arch, strip):
    """openai-community/gpt2 and facebook/opt-* store names without the wrapper prefix (GPT-2 also
    its causal-mask buffers); they load to the same tokens as transformers gives."""
    from tiny_models import make_checkpoint

    path = make_checkpoint(tmp_path / arch, arch, tie_word_embeddings=True)
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {name.removeprefix(strip): t for name, t in tensors.items()}
    assert renamed.keys() != tensors.keys()
    if arch == "gpt2":
        import torch
        renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    hub = tmp_path / f"{arch}_hub"
    hub.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (hub / f.name).write_bytes(f.read_bytes())
    save_file(renamed, str(hub / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((hub / "config.json").read_text())["architectures"]
    engine = engine_for(hub)
    ids = encode(engine, PROMPTS[:3])
    assert_matches_hf(path, ids, run(engine, ids))


def _transformers_falcon_split(config, weight, bias, x, monkeypatch):
    """transformers' own q / k / v of Falcon's fused projection, each [batch, seq, query heads, head_dim]:
    `FalconAttention._split_heads` until transformers 5.24; since 5.25 the split is inline in `forward`, so it is
    read where forward hands q / k / v to attention (ALiBi on: no rotary in between)."""
    import copy

    import torch
    from transformers.models.falcon import modeling_falcon

    config = copy.deepcopy(config)
    config.alibi, config._attn_implementation = True, "eager"
    hf = modeling_falcon.FalconAttention(config, layer_idx=0)
    if hasattr(hf, "_split_heads"):
        q, k, v = hf._split_heads(torch.nn.functional.linear(x, weight, bias))
        return q, *(t.expand_as(q) for t in (k, v))
    seen = {}

    class Seen(Exception):
        pass

    def attention(module, query, key, value, *args, **kwargs):   # [batch, heads, seq, head_dim]
        seen.update(q=query, k=key, v=value)
        raise Seen

    monkeypatch.setattr(modeling_falcon, "eager_attention_forward", attention)
    with torch.no_grad():
        hf.query_key_value.weight.copy_(weight)
        hf.query_key_value.bias.copy_(bias)
        with pytest.raises(Seen):
            hf(x, attention_mask=None)
    q = seen["q"].transpose(1, 2)
    per_query = q.shape[2] // seen["k"].shape[1]
    return q, *(seen[n].transpose(1, 2).repeat_interleave(per_query, dim=2) for n in ("k", "v"))


@pytest.mark.parametrize("layout", ["new_gqa", "new_one_kv", "multi_query", "per_head"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_falcon_qkv_shards_match_transformers_split(monkeypatch, layout, tp):
    """Every rank's q/k/v rows of the fused query_key_value, KV heads copied where tp exceeds
    them, equal to what transformers' FalconAttention._split_heads gives its query heads."""
    import torch
    from transformers import FalconConfig
    from transformers.models.falcon.modeling_falcon import FalconAttention as HFAttention

    import kubellm.runtime.executor.models.falcon as falcon

    kw = dict(new_gqa=dict(new_decoder_architecture=True, num_kv_heads=2),
              new_one_kv=dict(new_decoder_architecture=True, num_kv_heads=1),
              multi_query=dict(new_decoder_architecture=False, multi_query=True),
              per_head=dict(new_decoder_architecture=False, multi_query=False))[layout]
    config = FalconConfig(hidden_size=64, num_attention_heads=4, bias=True, **kw)
    hf = HFAttention(config, layer_idx=0)
    torch.manual_seed(0)
    weight, bias = torch.randn_like(hf.query_key_value.weight), torch.randn_like(hf.query_key_value.bias)
    x = torch.randn(1, 3, 64)
    heads, d = 4, 16
    q_ref, k_ref, v_ref = _transformers_falcon_split(config, weight, bias, x, monkeypatch)
    monkeypatch.setattr(falcon, "tp_size", lambda: tp)
    for rank in range(tp):
        monkeypatch.setattr(falcon, "tp_rank", lambda: rank)
        qkv = falcon.FalconQKV(config, d)
        qkv.weight_loader(qkv.weight, weight)
        qkv.weight_loader(qkv.bias, bias)
        hq, hkv = qkv.num_heads, qkv.num_kv_heads
        q, k, v = qkv(x[0]).split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(3, hq, d), k.view(3, hkv, d), v.view(3, hkv, d)
        for h in range(hq):
            g = rank * hq + h  # the global query head
            torch.testing.assert_close(q[:, h], q_ref[0, :, g])
            torch.testing.assert_close(k[:, h // (hq // hkv)], k_ref[0, :, g])
            torch.testing.assert_close(v[:, h // (hq // hkv)], v_ref[0, :, g])


def test_moe_dense_path_for_graph_capture_equals_the_sparse_path():
    """Decode CUDA graphs cannot sync to learn which experts a step needs; the dense path they
    capture (every expert, weight 0 where not chosen) must give the sparse path's numbers."""
    import torch

    from kubellm.runtime.executor.layers.moe import SparseMoE

    torch.manual_seed(0)
    moe = SparseMoE(num_experts=4, top_k=2, hidden_size=32, intermediate_size=48)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(7, 32)
    weights, chosen = moe.route(x)
    assert chosen.unique().numel() > 2  # tokens go to different experts
    sparse = moe.sparse(x, weights, chosen)
    torch.testing.assert_close(moe.dense(x, weights, chosen), sparse, rtol=1e-5, atol=1e-5)
    # And both are the top-2 mixture computed directly.
    expected = torch.stack([sum(w * moe.expert(e, x[t:t + 1])[0] for w, e in zip(weights[t], chosen[t].tolist()))
                            for t in range(7)])
    torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(moe(x), sparse)


def test_triton_path_gives_the_reference_tokens(tiny_family, monkeypatch):
    """The families use the same kernels as Llama (paged attention, KV write, rotary incl. Phi's
    partial one, SiLU-mul in the experts): on the Triton path (interpreted on CPU; on a GPU
    test_engine_hf.py runs it directly) the same greedy tokens as the references."""
    import torch
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on a GPU, test_engine_hf.py itself runs the Triton path")
    from kubellm.kernels import attention_triton, triton_support

    if not triton_support.interpreting():
        pytest.skip("CPU tensors need Triton's interpreter")
    prompts, gen = [list(range(3, 30)), [5, 17, 42]], GenerationConfig(max_new_tokens=4, logprobs=0)

    def generate(mode):
        monkeypatch.setenv("KUBELLM_KERNELS", mode)
        engine = engine_for(tiny_family, num_kv_blocks=64, max_batch_size=4, max_num_batched_tokens=16)
        seqs = engine.generate(prompts, [gen] * len(prompts))
        return [s.generated_ids for s in seqs], [s.logprobs for s in seqs]

    ref_ids, ref_logprobs = generate("reference")
    calls = []
    kernel = attention_triton.paged_decode_attention
    monkeypatch.setattr(attention_triton, "paged_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids, logprobs = generate("triton")
    assert calls and ids == ref_ids
    for got, expected in zip(logprobs, ref_logprobs):
        assert got == pytest.approx(expected, abs=1e-4)
