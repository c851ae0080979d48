"""A bare GGUF file served as it is (runtime/hub/gguf_model.py): the model directory made from its metadata
serves the tokens of the Hugging Face directory it was written from."""

import json
import os
import shutil
from pathlib import Path

import pytest

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.hub import gguf_model
from kubellm.runtime.hub.embedded import resolve_model
from kubellm.runtime.hub.gguf_model import GGUFModelError
from quant_checkpoints import write_gguf, write_gguf_by_name_map
from tiny_hf_families import make_family_checkpoint
from tiny_models import make_checkpoint

PROMPTS = ["Hello 123", "The quick brown fox jumps over the lazy dog, and then"]
TEXTS = ["Hello world 1234567, tokens!", "<|im_start|>user\nhi there<|im_end|>\n", "  spaces\tand\nnewlines 09"]
CONFIG_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_CACHE", str(tmp_path / "cache"))


def _greedy(model, n=12):
    engine = LLMEngine(model, EngineConfig(device="cpu", block_size=4, num_kv_blocks=64, session_len=128),
                       show_progress=False)
    try:
        return [s.token_ids for s in engine.generate(PROMPTS, [GenerationConfig(max_new_tokens=n, ignore_eos=True)] * 2)]
    finally:
        engine.destroy()


def _bare(directory: Path, out: Path) -> Path:
    out.mkdir()
    shutil.copy(directory / "model.gguf", out / "model.gguf")
    return out / "model.gguf"


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("llama3", "Q8_0"), ("qwen2", "Q8_0"), ("qwen3", "Q4_1")])
def test_a_bare_gguf_serves_the_tokens_of_its_hugging_face_directory(arch, qtype, request, tmp_path):
    from transformers import AutoTokenizer

    # Qwen3 with a head size other than hidden / heads (as Qwen3-0.6B's 128 against 1024 / 16), and tied
    source = (make_checkpoint(tmp_path / arch, arch, tie_word_embeddings=True, head_dim=32) if arch == "qwen3"
              else request.getfixturevalue(f"tiny_{arch}"))
    directory, _ = write_gguf(source, tmp_path, qtype)
    file = _bare(directory, tmp_path / "bare")

    made = resolve_model(file)
    assert made.parent == Path(os.environ["KUBELLM_CACHE"]) / "models" / "gguf"
    assert (made / "model.gguf").samefile(file)   # linked, not copied
    config, original = (json.loads((d / "config.json").read_text()) for d in (made, source))
    assert {k: config.get(k) for k in CONFIG_FIELDS} == {k: original.get(k) for k in CONFIG_FIELDS}
    assert config["rms_norm_eps"] == pytest.approx(original["rms_norm_eps"], rel=1e-6)   # GGUF holds a float32
    # Llama 3's rope scaling comes back from the rope_freqs tensor llama.cpp writes in its place
    assert config.get("rope_scaling") == original.get("rope_scaling")
    ours, theirs = AutoTokenizer.from_pretrained(made), AutoTokenizer.from_pretrained(source)
    assert [ours(t).input_ids for t in TEXTS] == [theirs(t).input_ids for t in TEXTS]
    assert ours.chat_template == theirs.chat_template and ours.eos_token == theirs.eos_token
    assert _greedy(str(file)) == _greedy(str(directory))
    # a directory of one .gguf and no config.json is the same model
    assert resolve_model(file.parent) == made


def test_the_directory_is_made_once_per_file_and_again_when_the_file_changes(tiny_llama, tmp_path, monkeypatch):
    directory, _ = write_gguf(tiny_llama, tmp_path, "Q8_0")
    file = _bare(directory, tmp_path / "bare")
    first = resolve_model(file)

    def no_rewrite(*args, **kwargs):
        raise AssertionError("a complete directory was written again")

    monkeypatch.setattr(gguf_model, "write_model_dir", no_rewrite)
    assert resolve_model(str(file)) == first
    monkeypatch.undo()
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # replaced in place
    assert resolve_model(file) != first


def test_across_filesystems_the_file_is_symlinked_never_copied(tiny_llama, tmp_path, monkeypatch):
    directory, _ = write_gguf(tiny_llama, tmp_path, "Q8_0")
    file = _bare(directory, tmp_path / "bare")

    def cross_device(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(gguf_model.os, "link", cross_device)
    made = resolve_model(file)
    assert (made / "model.gguf").is_symlink() and (made / "model.gguf").resolve() == file.resolve()


def test_a_hugging_face_directory_beside_its_gguf_is_served_as_it_is(tiny_llama, tmp_path):
    directory, _ = write_gguf(tiny_llama, tmp_path, "Q8_0")
    assert resolve_model(directory) == directory


FLOAT_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "use_qkv_bias")


@pytest.mark.parametrize("family,overrides", [("stablelm", {"partial_rotary_factor": 0.5}), ("phi3", {})])
def test_a_gguf_only_transformers_reads_is_served_float(family, overrides, tmp_path):
    """StableLM (q / k / v biases, layer norms, half of each head rotated: a rotary size transformers does not
    map) and Phi-3 (fused qkv_proj and gate_up_proj) have no block-for-block reader: the file alone becomes a
    float32 checkpoint once, by transformers' de-quantization, config and tokenizer read as for Llama."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = make_family_checkpoint(tmp_path / family, family, **overrides)
    file, reference = write_gguf_by_name_map(source, tmp_path / "gguf", "Q8_0")
    made = resolve_model(file)
    assert not list(made.glob("*.gguf")) and (made / "model.safetensors").is_file()
    config, original = (json.loads((d / "config.json").read_text()) for d in (made, source))
    assert {k: config.get(k) for k in FLOAT_FIELDS} == {k: original.get(k) for k in FLOAT_FIELDS}
    made_rope, original_rope = (AutoConfig.from_pretrained(d).rope_parameters for d in (made, source))
    assert made_rope.get("partial_rotary_factor", 1.0) == original_rope.get("partial_rotary_factor", 1.0)
    ids = torch.tensor([[5, 17, 42, 100, 7, 3]])
    with torch.inference_mode():
        got, want = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits for d in (made, reference))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)   # the de-quantized values, exactly
    assert _greedy(made) == _greedy(reference)


def _minimal_gguf(path: Path, arch: str, tokenizer: bool) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("make,message", [
    (lambda p: _minimal_gguf(p / "m.gguf", "llama", tokenizer=False), "holds no tokenizer (tokenizer.ggml.model"),
    (lambda p: _minimal_gguf(p / "m.gguf", "mamba", tokenizer=True), "architecture 'mamba' (general.architecture)"),
    (lambda p: (p / "m.gguf").write_bytes(b"GGUF not really") and p / "m.gguf", "is not a readable GGUF file"),
])
def test_a_gguf_that_cannot_be_served_alone_is_refused_naming_the_field(make, message, tmp_path):
    file = make(tmp_path)
    with pytest.raises(GGUFModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(file)
    assert not any((Path(os.environ["KUBELLM_CACHE"]) / "models" / "gguf").glob("*"))   # nothing half-made


def test_several_ggufs_and_no_config_name_the_files(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(GGUFModelError, match="holds 2 .gguf files .*a.Q4_0.gguf, a.Q8_0.gguf.*pass the file"):
        resolve_model(tmp_path)


def test_the_embedded_gguf_served_as_a_file_is_the_pulled_model(tmp_path):
    """SmolLM2's file alone: the metadata rules (its "smollm" digit split, ChatML template and <|im_end|> eos,
    the tied LM head) make the model `kubellm models pull` makes with its known-model fixes."""
    from transformers import AutoTokenizer

    from kubellm.runtime.hub.embedded import DEFAULT_MODEL, pull

    pulled = pull(DEFAULT_MODEL)
    file = tmp_path / "bare" / "smollm2.gguf"
    file.parent.mkdir()
    os.symlink(next(pulled.glob("*.gguf")), file)
    made = resolve_model(file)
    config, want = (json.loads((d / "config.json").read_text()) for d in (made, pulled))
    assert {k: config.get(k) for k in CONFIG_FIELDS} == {k: want.get(k) for k in CONFIG_FIELDS}
    ours, theirs = AutoTokenizer.from_pretrained(made), AutoTokenizer.from_pretrained(pulled)
    texts = [*TEXTS, "In 2024, 3.14159 * 42 = 131.95"]
    assert [ours(t).input_ids for t in texts] == [theirs(t).input_ids for t in texts]
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert _greedy(str(file), n=8) == _greedy(str(pulled), n=8)
