"""Quantized weights under tensor and pipeline parallel, real rank processes over gloo on CPU: each rank
reads its slices of the packed tensors, and the group gives one process's greedy tokens (reference
kernels, so every rank computes in float32 as the single process does)."""

import pytest

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from quant_checkpoints import write_awq, write_gguf, write_gptq, write_q4_k_m

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then",
           "Once upon a time, there was a little girl who lived in a village near the forest."]

pytestmark = pytest.mark.multiprocess


def _engine(path, tp=1, pp=1, **kw):
    config = EngineConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu", block_size=4, num_kv_blocks=96,
                          max_num_batched_tokens=16, session_len=128, **kw)
    return LLMEngine(path, config, show_progress=False)


def _run(path, tp=1, pp=1, **kw):
    """(greedy tokens, rank 0's packed qkv rows and o_proj columns)."""
    engine = _engine(path, tp, pp, **kw)
    try:
        gens = [GenerationConfig(max_new_tokens=8 + i, ignore_eos=True) for i in range(len(PROMPTS))]
        tokens = [s.token_ids for s in engine.generate(PROMPTS, gens)]
        attn = engine.runner.model.model.layers[0].self_attn
        q = attn.qkv_proj.quantized, attn.o_proj.quantized
        return tokens, (q[0].out_features, q[1].qweight.shape[1])
    finally:
        engine.destroy()


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized-parallel")
    return {"int8": (tiny_llama, {"quantization": "int8"}), "awq": (write_awq(tiny_llama, out)[0], {}),
            "gguf": (write_gguf(tiny_llama, out, "Q4_1")[0], {}),
            # o_proj's 256 columns in one Q4_K super-block: each rank keeps its 4 sub-blocks of it
            "gguf-Q4_K_M": (write_q4_k_m(out)[0], {}),
            "gptq-act-order": (write_gptq(tiny_llama, out, group_size=16, desc_act=True)[0], {}),
            "gptq-8bit": (write_gptq(tiny_llama, out, bits=8, sym=True)[0], {})}


@pytest.mark.parametrize("name", ["int8", "awq", "gguf", "gguf-Q4_K_M", "gptq-8bit"])
def test_tp2_reads_its_slices_and_gives_one_process_tokens(checkpoints, name, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    path, options = checkpoints[name]
    single, (rows, cols) = _run(path, **options)
    sharded, (rows2, cols2) = _run(path, tp=2, **options)
    assert sharded == single
    assert rows2 == rows // 2            # column-parallel: half the output channels
    assert cols2 == cols // 2            # row-parallel: half the input columns (packed two per byte for int4)


@pytest.mark.parametrize("name", ["awq", "gguf"])
def test_pp2_gives_one_process_tokens(checkpoints, name, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    path, options = checkpoints[name]
    assert _run(path, pp=2, **options)[0] == _run(path, **options)[0]


def test_act_order_under_tp2_and_pp2_gives_one_process_tokens(checkpoints, monkeypatch):
    """act-order groups are scattered over the input, so a row-parallel rank holds parts of every group: it
    reads all groups' scales and pads its parts (here groups of 16 over o_proj's 64 columns, 32 a rank)."""
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    path, _ = checkpoints["gptq-act-order"]
    single, (rows, _) = _run(path)
    sharded, (rows2, _) = _run(path, tp=2)
    assert sharded == single and rows2 == rows // 2
    assert _run(path, pp=2)[0] == single


def test_a_group_that_splits_a_row_parallel_shard_is_refused_naming_group_size(tiny_llama, tmp_path):
    # o_proj's 64 input columns over 2 ranks are 32 each: AWQ groups of 64 cannot be cut there
    path, _ = write_awq(tiny_llama, tmp_path, group_size=64)
    with pytest.raises(ValueError, match=r"group_size: 64 does not divide this rank's 32 input columns"):
        _engine(path, tp=2)


# -- beyond the Llama family ------------------------------------------------------------------------------
def _tokens(path, tp=1, pp=1, **kw):
    engine = _engine(path, tp, pp, **kw)
    try:
        gens = [GenerationConfig(max_new_tokens=8 + i, ignore_eos=True) for i in range(len(PROMPTS))]
        return [s.token_ids for s in engine.generate(PROMPTS, gens)]
    finally:
        engine.destroy()


@pytest.mark.parametrize("arch,fmt,impl", [("mixtral", "gptq-act-order", "auto"), ("qwen3", "awq", "auto"),
                                           ("llama", "awq", "transformers"), ("gpt2", "int8", "auto"),
                                           ("falcon", "int8", "auto")])
def test_other_families_under_tp2_and_pp2_give_one_process_tokens(arch, fmt, impl, tmp_path, monkeypatch):
    """Mixtral's experts (row-parallel w2 summed before one all-reduce), Qwen3 (q / k norms whole on every rank),
    the transformers backend (its base_model_tp_plan's linears quantized), GPT-2's transposed Conv1D rows,
    Falcon's gathered query_key_value rows."""
    from tiny_models import make_checkpoint

    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    src = make_checkpoint(tmp_path / arch, arch)
    options, path = {"model_impl": impl}, src
    if fmt == "int8":
        options["quantization"] = "int8"
    elif fmt == "awq":
        path = write_awq(src, tmp_path, group_size=16)[0]
    else:
        path = write_gptq(src, tmp_path, group_size=16, desc_act=True)[0]
    single = _tokens(path, **options)
    assert _tokens(path, tp=2, **options) == single
    assert _tokens(path, pp=2, **options) == single
