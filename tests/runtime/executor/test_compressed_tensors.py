"""compressed-tensors checkpoints (llm-compressor's format), written by the compressed-tensors library on tiny
models: int4 / int8 packed (W4A16, W8A16, symmetric and with zero points, group and channel scales), int8 as
it is (int-quantized) and FP8 (float-quantized). The reference is the library's own de-quantization of the
same model (ModelCompressor.decompress_model); with the reference kernels kubellm's greedy tokens equal it.
transformers' own FP8 checkpoints (quant_method: fp8), read by the same FP8 path, are at the end."""

import pytest
import torch

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor.layers.quantization import QuantizationError, QuantPlan, plan_quantization
from quant_checkpoints import write_compressed_tensors, write_fp8

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then"]
EXACT = {  # name -> write_compressed_tensors options; each is served exactly as the library de-quantizes it
    "w4a16-group": {}, "w4a16-group-asym": {"symmetric": False}, "w4a16-channel": {"strategy": "channel"},
    "w4a16-actorder-weight": {"actorder": "weight"}, "w8a16-group": {"bits": 8},
    "w8a8-int-channel": {"fmt": "int-quantized", "bits": 8, "strategy": "channel"},
    "fp8-channel": {"fmt": "float-quantized", "kind": "float", "bits": 8, "strategy": "channel"},
    "fp8-tensor": {"fmt": "float-quantized", "kind": "float", "bits": 8, "strategy": "tensor"},
}


def _engine(path, tp=1, **kw):
    config = EngineConfig(device="cpu", tensor_parallel=tp, block_size=4, num_kv_blocks=64, session_len=128, **kw)
    return LLMEngine(path, config, show_progress=False)


def _greedy(path, tp=1, **kw):
    engine = _engine(path, tp, **kw)
    try:
        gens = [GenerationConfig(max_new_tokens=12, ignore_eos=True)] * len(PROMPTS)
        return [s.token_ids for s in engine.generate(PROMPTS, gens)]
    finally:
        engine.destroy()


@pytest.fixture(scope="module")
def written(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed-tensors")
    cache = {}

    def get(name, **options):
        if name not in cache:
            cache[name] = write_compressed_tensors(tiny_llama, out, **(options or EXACT.get(name, {})))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(EXACT))
def test_greedy_tokens_equal_the_librarys_dequantized_model(written, name, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = written(name)
    assert _greedy(checkpoint) == _greedy(reference)


def test_layers_hold_the_packed_forms(written):
    """CPU path: W4A16 stays int4 (torch's int4pack), W8A16 int8, FP8 de-quantized to float."""
    forms = {}
    for name in ("w4a16-group", "w8a16-group", "fp8-channel"):
        engine = _engine(written(name)[0])
        try:
            forms[name] = engine.runner.model.model.layers[0].self_attn.qkv_proj.quantized.form
        finally:
            engine.destroy()
    assert forms == {"w4a16-group": "int4_cpu", "w8a16-group": "int8_cpu", "fp8-channel": "float"}


def test_asymmetric_int8_is_the_librarys_model_requantized_per_channel(written, monkeypatch):
    """The int8 kernels are symmetric: zero points other than 128 are folded in by re-quantizing each output
    channel, which is int8 on load of the library's de-quantized model, logit for logit."""
    from kubellm.runtime.executor.step import SeqChunk, StepBatch

    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = written("w8a16-asym", bits=8, symmetric=False)
    logits = []
    for path, options in ((checkpoint, {}), (reference, {"quantization": "int8"}), (reference, {})):
        engine = _engine(path, **options)
        try:
            batch = StepBatch(chunks=[SeqChunk(start=0, token_ids=[5, 17, 42, 100], block_table=[0, 1], samples=True)])
            logits.append(engine.runner.forward(batch)[0].float())
        finally:
            engine.destroy()
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert not torch.allclose(logits[0], logits[2], atol=1e-3)   # not the float model: re-quantized


# llm-compressor recipes often keep some layers float: a q_proj (one shard of the fused q / k / v) and every
# down_proj by a regular expression
IGNORED = ("model.layers.0.self_attn.q_proj", "re:.*down_proj$")


@pytest.mark.parametrize("name,options,packed", [
    ("w4a16-ignore", {}, "int4_cpu"),
    # int8 / FP8 values are stored under `weight`, as the kept-float layers are: told apart by dtype
    ("w8a8-int-ignore", {"fmt": "int-quantized", "bits": 8, "strategy": "channel"}, "int8_cpu"),
    ("fp8-ignore", {"fmt": "float-quantized", "kind": "float", "bits": 8, "strategy": "channel"}, "float"),
])
def test_layers_the_recipe_ignored_are_served_float_and_the_rest_packed(written, name, options, packed, monkeypatch):
    from kubellm.runtime.executor.layers.linear import LinearBase

    checkpoint, reference = written(name, ignore=IGNORED, **options)
    engine = _engine(checkpoint)   # the CPU path
    try:
        forms = {name: m.quantized.form for name, m in engine.runner.model.named_modules()
                 if isinstance(m, LinearBase)}
    finally:
        engine.destroy()
    assert forms["model.layers.0.self_attn.qkv_proj"] == "float"   # one float shard: the fused layer exact float
    assert forms["model.layers.1.self_attn.qkv_proj"] == packed
    assert {f for n, f in forms.items() if n.endswith("down_proj")} == {"float"}
    assert {f for n, f in forms.items() if n.endswith(("o_proj", "gate_up_proj"))} == {packed}
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    assert _greedy(checkpoint) == _greedy(reference)


@pytest.mark.multiprocess
def test_ignored_layers_under_tp2_give_one_process_tokens(written, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, _ = written("w4a16-ignore", ignore=IGNORED)
    assert _greedy(checkpoint, tp=2) == _greedy(checkpoint)
    assert _greedy(checkpoint, tp=2, quantization="int8") == _greedy(checkpoint, quantization="int8")


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["w4a16-group-asym", "w8a16-group", "fp8-channel"])
def test_tp2_gives_one_process_tokens(written, name, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, _ = written(name)
    assert _greedy(checkpoint, tp=2) == _greedy(checkpoint)


# -- the plan: a pure decision ----------------------------------------------------------------------
def _qc(weights=None, fmt="pack-quantized", **extra):
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
               **(weights or {})}
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": fmt}}, **extra}


@pytest.mark.parametrize("qc,want", [
    (_qc(), QuantPlan("compressed-tensors", "native", 4, 128, scheme="pack-quantized")),
    (_qc({"symmetric": False, "strategy": "channel", "num_bits": 8}),
     QuantPlan("compressed-tensors", "native", 8, -1, scheme="pack-quantized", strategy="channel", symmetric=False)),
    (_qc({"actorder": "group"}), QuantPlan("compressed-tensors", "native", 4, 128, act_order=True,
                                           scheme="pack-quantized")),
    (_qc({"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 128]}, "float-quantized"),
     QuantPlan("compressed-tensors", "native", 8, 0, scheme="float-quantized", strategy="block", block=(128, 128))),
    # layers the quantizer ignored are stored float; the loader serves them float (test below)
    (_qc(ignore=["lm_head", "re:.*down_proj$"]), QuantPlan("compressed-tensors", "native", 4, 128,
                                                           scheme="pack-quantized")),
])
def test_plan(qc, want):
    assert plan_quantization(None, qc, "safetensors", "llama") == want


@pytest.mark.parametrize("qc,message", [
    (_qc(sparsity_config={"format": "sparse-24-bitmask"}), r"quantization_config.sparsity_config"),
    (_qc({"num_bits": 2}), r"weights: type 'int', num_bits 2; the pack-quantized format is read for .* 4 or 8"),
    (_qc(fmt="marlin-24"), r"quantization_config.format: 'marlin-24'"),
    (_qc({"strategy": "block"}), r"weights.strategy: 'block'"),
    (_qc({"group_size": None}), r"weights.group_size: None"),
    ({**_qc(), "config_groups": {"a": {"targets": ["Linear"], "weights": {"num_bits": 4}},
                                 "b": {"targets": ["Linear"], "weights": {"num_bits": 8}}}},
     r"config_groups: .* 2 group\(s\) with different weight schemes"),
    ({**_qc(), "config_groups": {"a": {"targets": ["re:.*q_proj"], "weights": _qc()["config_groups"]["group_0"]
                                       ["weights"]}}}, r"targets: \[\['re:.\*q_proj'\]\]"),
])
def test_plan_refusals_name_the_field(qc, message):
    with pytest.raises(QuantizationError, match=message):
        plan_quantization(None, qc, "safetensors", "llama")


def test_actorder_group_checkpoints_with_g_idx(written, tmp_path, monkeypatch):
    """Older llm-compressor releases wrote actorder 'group': groups scattered over the input, weight_g_idx
    naming each column's (compressed-tensors 0.20 writes only 'weight'). Made here from the library's W4A16
    checkpoint with its own packing functions: every Linear's columns and its reference's permuted alike."""
    import json
    import shutil

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = written("w4a16-group")
    out, ref_out = tmp_path / "actorder", tmp_path / "actorder-reference"
    shutil.copytree(checkpoint, out)
    shutil.copytree(reference, ref_out)
    state, ref_state = load_file(str(out / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    for name in [n for n in state if n.endswith(".weight_packed")]:
        base = name.removesuffix(".weight_packed")
        shape = state[f"{base}.weight_shape"].tolist()
        inverse = torch.argsort(torch.randperm(shape[1], generator=gen))   # column k takes old column inverse[k]
        q = unpack_from_int32(state[name], 4, torch.Size(shape))
        state[name] = pack_to_int32(q[:, inverse].contiguous(), 4)
        state[f"{base}.weight_g_idx"] = (inverse // 32).to(torch.int32)
        ref_state[f"{base}.weight"] = ref_state[f"{base}.weight"][:, inverse].contiguous()
    save_file(state, str(out / "model.safetensors"))
    save_file(ref_state, str(ref_out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (out / "config.json").write_text(json.dumps(config))
    assert _greedy(out) == _greedy(ref_out)
    assert _greedy(out) != _greedy(checkpoint)   # the permutation made another model: g_idx was needed


# -- transformers' FP8 checkpoints (quant_method: fp8) ------------------------------------------------------
# FineGrainedFP8, as DeepSeek's and Qwen's *-FP8 releases store them: e4m3 weights, `weight_scale_inv` per
# block of `weight_block_size`; and AutoFP8's (one `weight_scale` per tensor, a static `input_scale`). The same
# reader as float-quantized above: greedy tokens equal the de-quantized reference (quant_checkpoints.write_fp8),
# and transformers, reading the same file with its own FP8 de-quantizer, gives the same logits.
IDS = [5, 17, 42, 100, 7]
# blocks of 16 divide every tiny projection; 48 and 36 leave partial last blocks (64 and 128 are not multiples)
LAYOUTS = {"block16": (16, 16), "block48": (48, 48), "block36": (36, 36), "tensor": None}


def _logits_and_forms(path, **kw):
    from kubellm.runtime.executor.step import SeqChunk, StepBatch

    engine = _engine(path, **kw)
    try:
        batch = StepBatch(chunks=[SeqChunk(start=0, token_ids=IDS, block_table=list(range(4)), samples=True)])
        forms = {m.form for m in engine.runner.model.modules() if type(m).__name__ == "QuantizedWeight"}
        return engine.runner.forward(batch)[0].float(), forms
    finally:
        engine.destroy()


@pytest.fixture(scope="module")
def fp8_written(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8")
    return {name: write_fp8(tiny_llama, out, block) for name, block in LAYOUTS.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fp8_greedy_tokens_equal_the_dequantized_reference(fp8_written, name, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = fp8_written[name]
    assert _greedy(checkpoint) == _greedy(reference)


def test_transformers_reads_the_same_fp8_checkpoint_alike(fp8_written):
    """An independent reader: transformers' FineGrainedFP8 de-quantizes on a machine without a GPU."""
    from transformers import AutoModelForCausalLM

    checkpoint, _ = fp8_written["block16"]
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([IDS])).logits[0, -1]
    got, forms = _logits_and_forms(checkpoint)
    assert forms == {"float"}
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=0)


@pytest.mark.parametrize("name,forms", [("block16", {"fp8"}), ("tensor", {"fp8"}), ("block48", {"fp8"}),
                                        ("block36", {"float"})])
def test_fp8_stays_fp8_where_a_kernel_multiplies_it(fp8_written, name, forms, monkeypatch):
    """With the reference kernels, as with Triton on an sm89+ GPU, the e4m3 bytes are what a layer keeps (one
    byte a weight, and a float32 scale per block's columns), and the logits are the de-quantized reference's.
    Blocks of 48 columns over 64 / 128 inputs are kept with a scale per 16 (gcd(48, 64)); blocks of 36 would
    need one per 4 columns (gcd 4), more bytes than bf16, so those layers are de-quantized instead."""
    from kubellm.runtime.executor.layers.quantization.packed import QuantizedWeight

    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = fp8_written[name]
    engine = _engine(checkpoint)
    try:
        weights = [m for m in engine.runner.model.modules() if isinstance(m, QuantizedWeight)]
        assert {w.form for w in weights} == forms
        for w in weights:
            if w.form == "fp8":
                assert w.qweight.dtype == torch.float8_e4m3fn and w.scales.dtype == torch.float32
                assert w.nbytes <= 1.25 * w.qweight.numel()   # + a float32 scale per 16 columns at most
    finally:
        engine.destroy()
    got, _ = _logits_and_forms(checkpoint)
    want, _ = _logits_and_forms(reference)
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max(), rtol=0)


@pytest.mark.multiprocess
def test_fp8_kept_under_tp2_gives_one_process_tokens(fp8_written, monkeypatch):
    """Blocks of 16: every rank's rows and columns start on a block, so each rank keeps its FP8 slices."""
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = fp8_written["block16"]
    assert _greedy(checkpoint, tp=2) == _greedy(reference)


def test_fp8_served_int8_on_request(fp8_written):
    checkpoint, reference = fp8_written["block48"]
    got, forms = _logits_and_forms(checkpoint, quantization="int8")
    want, _ = _logits_and_forms(reference, quantization="int8")
    assert forms == {"int8_cpu"}
    assert torch.allclose(got, want, atol=1e-5)   # int8 of the same de-quantized weights


@pytest.mark.multiprocess
def test_tp2_slices_that_cut_blocks_give_one_process_tokens(fp8_written, monkeypatch):
    """Blocks of 48 rows over a rank's 32 q rows or 64 MLP rows: a rank's slice starts inside a block."""
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, _ = fp8_written["block48"]
    assert _greedy(checkpoint, tp=2) == _greedy(checkpoint)


def test_a_transformers_backend_family_reads_fp8(tmp_path, monkeypatch):
    from tiny_hf_families import make_family_checkpoint

    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = write_fp8(make_family_checkpoint(tmp_path / "gemma", "gemma"), tmp_path, (16, 16))
    assert _greedy(checkpoint) == _greedy(reference)


FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}


@pytest.mark.parametrize("qc,want", [
    ({**FP8, "weight_block_size": [128, 128]},
     QuantPlan("fp8", "native", 8, 0, scheme="float-quantized", strategy="block", block=(128, 128))),
    ({"quant_method": "fp8", "activation_scheme": "static"},
     QuantPlan("fp8", "native", 8, -1, scheme="float-quantized", strategy="tensor")),
])
def test_fp8_plan(qc, want):
    assert plan_quantization(None, qc, "safetensors", "qwen2") == want


@pytest.mark.parametrize("block", [[128], [0, 128], "128x128"])
def test_a_malformed_block_size_is_refused_naming_it(block):
    with pytest.raises(QuantizationError, match=r"quantization_config.weight_block_size: .* must be \[rows, columns\]"):
        plan_quantization(None, {**FP8, "weight_block_size": block}, "safetensors", "llama")


def test_a_block_size_the_scales_do_not_cover_is_refused_naming_the_tensor(fp8_written, tmp_path):
    """Scales written for blocks of 48 read as blocks of 16 (config.json edited): too few of them, an error
    that names the scale tensor and the block size, not an index error."""
    import json
    import shutil

    checkpoint = shutil.copytree(fp8_written["block48"][0], tmp_path / "wrong-block")
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16, 16]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"weight_scale_inv in model.safetensors: weight_scale_inv: shape "
                                                r"\(\d+, \d+\) has too few blocks .* check the block size"):
        _engine(checkpoint)


@pytest.mark.parametrize("device,capability,mode,kept", [
    ("cuda", (9, 0), "auto", True),        # Hopper: Triton's e4m3 conversion
    ("cuda", (8, 9), "auto", True),        # Ada
    ("cuda", (8, 0), "auto", False),       # Ampere: no e4m3 in Triton, de-quantized on load
    ("cuda", (8, 0), "reference", True),
    ("cpu", None, "auto", False),          # the CPU's float linear beats de-quantizing per call
    ("cpu", None, "triton", False),
    ("cpu", None, "reference", True),
])
def test_fp8_is_kept_where_a_kernel_multiplies_it(device, capability, mode, kept, monkeypatch):
    from kubellm.runtime.executor.layers.quantization import packed

    monkeypatch.setenv("KUBELLM_KERNELS", mode)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: capability)
    assert packed.fp8_kept(torch.device(device)) is kept


def test_fused_fp8_shards_stay_fp8_when_their_groups_agree():
    from kubellm.runtime.executor.layers.quantization.packed import FloatRows, Fp8Rows, combine

    gen = torch.Generator().manual_seed(7)

    def shard(rows, groups):
        return Fp8Rows(torch.randn(rows, 64, generator=gen).to(torch.float8_e4m3fn), torch.rand(rows, groups))
    q, k, v = shard(32, 4), shard(16, 4), shard(16, 2)
    qk = combine([(32, k), (0, q)])
    assert isinstance(qk, Fp8Rows) and qk.qweight.shape == (48, 64)
    assert torch.equal(qk.dequantize(), torch.cat([q.dequantize(), k.dequantize()]))
    for mixed in ([(0, q), (32, v)], [(0, q), (32, FloatRows(torch.randn(16, 64)))]):
        rows = combine(mixed)   # other groups, or a shard kept float: exact float for the whole layer
        assert isinstance(rows, FloatRows)
        assert torch.equal(rows.weight[:32], q.dequantize())
